"""Translation between Flower records and plain Python/PyTorch values, in one place.

Message content keys, and how metrics, configs and weights travel: weights as an
ArrayRecord of numpy arrays (encoded by `compression`), metrics as a MetricRecord (scalars
and flat lists; the confusion matrix is flattened row-major), the rest as a ConfigRecord.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedssl_core import names

from . import compression

# RecordDict keys of fedssl messages.
WEIGHTS = "weights"  # ArrayRecord: the model groups sent or returned
CONFIG = "config"  # ConfigRecord: instructions (server → hospital)
METRICS = "metrics"  # MetricRecord: the round's local training metrics
LOCAL_METRICS = "local_only_metrics"  # MetricRecord: the hospital's local-only model
EVAL_METRICS = "eval_metrics"  # MetricRecord: the received global model scored on held-out data
LOCAL_WEIGHTS = "local_only_weights"  # ArrayRecord: the local-only classifier, sent once when register-local-models asks
LOCAL_EVAL_METRICS = "local_only_eval_metrics"  # MetricRecord: the local-only model scored likewise
HOSPITAL_BATCHNORM = "hospital_batchnorm"  # ArrayRecord: the final encoder's BatchNorm statistics over the hospital's images
SERVED_EVAL_METRICS = "served_eval_metrics"  # MetricRecord: the final classifier scored as :predict?hospital= serves the hospital
FEDERATION_LABEL_COUNTS = "federation-label-counts"  # CONFIG key (JSON list): every hospital's training images per class, summed
INFO = "info"  # ConfigRecord: hospital facts (name, ssl task, audit JSON)
PROXIMAL_MU = "proximal-mu"  # CONFIG key: FedProx's mu, put in the train config by Flower's FedProx (strategy=fedprox)
SKIPPED = "skipped"  # INFO key: why a hospital could not train this round (its reply then has no WEIGHTS)
PACKED = "packed"  # the one Array of a WEIGHTS record: every tensor in a safetensors buffer

# Names of the hospital's private models (files in its state directory, see client_app).
STATE_MODEL = "model"  # the hospital's copy of the federated model, heads included
STATE_LOCAL_ONLY = "local_only_model"  # the local-only baseline model, sent only when register-local-models asks
STATE_OPTIMIZER = "optimizer"  # the federated model's fine-tuning AdamW moments (keep-optimizer-state)
STATE_LOCAL_ONLY_OPTIMIZER = "local_only_optimizer"  # the baseline's
STATE_REAL_FEATURES = "real_features"  # task=generate: the real images' features the hospital scores generators against (.npz)


def state_arrays(state: Mapping[str, torch.Tensor], groups: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    prefixes = tuple(f"{g}." for g in groups) if groups is not None else ("",)
    return {k: v.detach().cpu().numpy() for k, v in state.items() if k.startswith(prefixes)}


def to_array_record(arrays: Mapping[str, np.ndarray], encoding: str = "none") -> ArrayRecord:
    """The arrays (encoded by `compression`) packed into one Array: a safetensors buffer.

    Flower moves every Array of a message, and every 5 MB chunk of one, through the
    SuperLink and the SuperNode as an object of its own: one HTTP request and one SQLite
    write each. One array per tensor made 600+ objects per EfficientNet-Lite0 message (306
    tensors), 10-14 s of every exchange on this machine; one buffer is a handful of objects."""
    encoded = compression.encode_arrays(dict(arrays), encoding)
    buffer = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in encoded.items()})
    record = ArrayRecord()
    record[PACKED] = Array(np.frombuffer(buffer, dtype=np.uint8))
    return record


def from_array_record(record: ArrayRecord, encoding: str = "none") -> dict[str, np.ndarray]:
    if list(record.keys()) != [PACKED]:
        raise ValueError(f"weights record with arrays {sorted(record.keys())[:5]}; expected one {PACKED!r} array "
                         "(fedssl's packed safetensors weights): is the sender running another fedssl version?")
    return compression.decode_arrays(safetensors.numpy.load(record[PACKED].numpy().tobytes()), encoding)


def load_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite the entries of `model`'s state named in `arrays` (a partial update)."""
    state = model.state_dict()
    unknown = sorted(set(arrays) - set(state))
    if unknown:
        raise ValueError(f"weights for unknown parameters: {', '.join(unknown[:5])}")
    for key, value in arrays.items():
        state[key].copy_(torch.from_numpy(np.asarray(value)).to(state[key].dtype).reshape(state[key].shape))


def to_metric_record(metrics: Mapping[str, Any], prefix: str = "") -> MetricRecord:
    """Scalars and per-class lists; the confusion matrix flattened; None values dropped."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if value is None:
            continue
        if key == names.M_CONFUSION_MATRIX:
            out[prefix + key] = [int(x) for row in value for x in row]
        elif isinstance(value, bool):
            out[prefix + key] = int(value)
        elif isinstance(value, int):
            out[prefix + key] = int(value)
        elif isinstance(value, float):
            out[prefix + key] = float(value)
        elif isinstance(value, (list, tuple)):
            out[prefix + key] = [float(x) for x in value]
    return MetricRecord(out)


def from_metric_record(record: MetricRecord | None, num_classes: int) -> dict[str, Any]:
    if record is None:
        return {}
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key.endswith(names.M_CONFUSION_MATRIX) and isinstance(value, list):
            flat = [int(x) for x in value]
            out[key] = [flat[i * num_classes : (i + 1) * num_classes] for i in range(num_classes)]
        else:
            out[key] = value
    return out


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in values.items()})
