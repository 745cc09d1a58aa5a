"""bench/memory.py runs both variants in fresh processes and records each stage's anonymous memory."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_memory_bench_records_every_stage_of_both_variants(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--image-size", "16", "--batch-size", "4", "--steps", "1",
                           "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["anonymous_mb"]) == {"plain", "checkpointing"}
    from fedssl_flower.warm_exec import PRELOAD

    for variant, r in result["anonymous_mb"].items():
        assert list(r["imports"]) == list(PRELOAD), variant
        stages = [r["start"], *r["imports"].values(), r["app_modules"], r["model"]]
        assert all(0 < s for s in stages) and r["imports"]["torch"] > r["start"], variant  # torch's import is visible
        assert r["ssl_seconds"] > 0 and r["finetune_seconds"] > 0
    assert "checkpointing: preload" in proc.stdout and f"wrote {out}" in proc.stdout
