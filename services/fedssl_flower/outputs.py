"""The run folder: what a run leaves on the aggregator's disk, written as it goes.

    <runs-dir>/<run-id>/
      metrics.csv                 one row per round x (hospital | aggregated), appended each round
      rounds.jsonl                the full round records (per-class metrics, confusion matrices)
      weights/<phase>-round-NNN.safetensors   the global model after each round
      summary.json                model, classes, data, hospitals, final metrics (rewritten each round)
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from fedssl_core import names, weights

AGGREGATED = "aggregated"

CSV_COLUMNS = [
    "phase", "round", "hospital", names.M_EXAMPLES, names.M_LOSS,
    *(names.ssl_loss_key(task) for task in names.SSL_TASKS), names.M_FINETUNE_LOSS,
    names.M_ACCURACY, names.M_BALANCED_ACCURACY, names.M_MACRO_AUC, names.M_TEST_EXAMPLES,
    names.LOCAL_ONLY_PREFIX + names.M_ACCURACY, names.LOCAL_ONLY_PREFIX + names.M_BALANCED_ACCURACY,
    names.LOCAL_ONLY_PREFIX + names.M_MACRO_AUC, "duration_seconds", "bytes_sent", "bytes_received",
]
# A generative run's (task=generate) rounds: the GAN's losses and each hospital's scores of the
# global generator, beside its local-only generator's.
GENERATE_CSV_COLUMNS = [
    "phase", "round", "hospital", names.M_EXAMPLES, names.M_GENERATOR_LOSS, names.M_DISCRIMINATOR_LOSS,
    *names.GENERATIVE_SCORES, names.M_TEST_EXAMPLES, *(names.LOCAL_ONLY_PREFIX + k for k in names.GENERATIVE_SCORES),
    "duration_seconds", "bytes_sent", "bytes_received",
]


class RunFolder:
    def __init__(self, root: str | os.PathLike[str], run_id: str) -> None:
        self.path = Path(root) / str(run_id)
        (self.path / "weights").mkdir(parents=True, exist_ok=True)
        self.csv_path = self.path / "metrics.csv"

    def append_round(self, record: dict[str, Any]) -> None:
        """Append one round: CSV rows for the aggregate and each hospital, and the JSON record."""
        rows = []
        base = {"phase": record["phase"], "round": record["round"]}
        agg = dict(record["aggregated"])
        agg.update({"duration_seconds": record.get("duration_seconds"), "bytes_sent": record.get("bytes_sent"),
                    "bytes_received": record.get("bytes_received")})
        rows.append({**base, "hospital": AGGREGATED, **agg})
        for hospital, metrics in sorted(record["hospitals"].items()):
            rows.append({**base, "hospital": hospital, **metrics})
        new = not self.csv_path.exists()
        buf = io.StringIO()
        columns = GENERATE_CSV_COLUMNS if record["phase"] == names.PHASE_GENERATE else CSV_COLUMNS
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        self._append(self.csv_path, buf.getvalue())
        self._append(self.path / "rounds.jsonl", json.dumps(record) + "\n")

    @staticmethod
    def _append(path: Path, text: str) -> None:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    def weights_path(self, phase: str, rnd: int) -> Path:
        return self.path / "weights" / f"{phase}-round-{rnd:03d}.safetensors"

    def save_weights(self, phase: str, rnd: int, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        return weights.save_file(self.weights_path(phase, rnd), state, metadata)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return weights.atomic_write(self.path / "summary.json", json.dumps(summary, indent=2, default=str).encode())
