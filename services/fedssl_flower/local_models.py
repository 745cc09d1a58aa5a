"""Hospitals' local-only classifiers in the registry (`register-local-models`, off by default).

Every hospital trains, beside its share of the federated model, a model of its own on its
own images alone (`local-baseline`). That model is the hospital's property and never leaves
it, unless the federation opts in with `register-local-models = true`: then, after the last
fine-tune round, each hospital sends it once and the aggregator registers it as
`fedssl-local-<hospital>`, next to the global `fedssl-classifier` version it was trained
beside. The dashboard's "Try it" then scores one image with the global model and with every
hospital's own model, side by side.

This module holds what the aggregator needs besides its registry calls: the registered
name of a hospital's model, the check that what a hospital sent is a classifier of the
federation's shape, and the scores to record with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch

from fedssl_core import names
from fedssl_core.models import TASK_GROUPS, select_groups

from .metrics import from_confusion

MAX_NAME = 63  # the registry's model names: ^[a-z0-9][a-z0-9._-]{0,62}$


def model_names(hospitals: list[str]) -> dict[str, str]:
    """Hospital -> registered model name (`fedssl-local-<slug>`): lower case, runs of other
    characters as '-', cut to the registry's 63 characters; two hospitals whose slugs meet
    get -2, -3, ... in the order of their names."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    room = MAX_NAME - len(names.LOCAL_MODEL_PREFIX)
    for hospital in sorted(hospitals):
        slug = re.sub(r"[^a-z0-9._-]+", "-", hospital.lower()).strip("-._") or "hospital"
        name, n = names.LOCAL_MODEL_PREFIX + slug[:room], 1
        while name in taken:
            n += 1
            suffix = f"-{n}"
            name = names.LOCAL_MODEL_PREFIX + slug[: room - len(suffix)] + suffix
        taken.add(name)
        out[hospital] = name
    return out


def classifier_state(arrays: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classifier a hospital sent (`arrays`), as tensors of the global model's dtypes, or
    ValueError naming what differs from the federation's classifier (`reference`: the global
    state): missing or extra tensors, a wrong shape, a value that is not finite."""
    expected = select_groups(reference, TASK_GROUPS[names.TASK_CLASSIFICATION])
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"its tensors are not the federation's classifier: missing {missing[:3] or 'none'}"
                         f"{'…' if len(missing) > 3 else ''}, unexpected {extra[:3] or 'none'}{'…' if len(extra) > 3 else ''}")
    out = {}
    for key, ref in expected.items():
        value = np.asarray(arrays[key])
        if ref.dim() == 0 and value.shape == (1,):  # a scalar (BatchNorm's counter) travels as one element
            value = value.reshape(())
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"tensor {key} has shape {tuple(value.shape)}; the federation's classifier has {tuple(ref.shape)}")
        tensor = torch.from_numpy(np.array(value)).to(ref.dtype)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {key} holds NaN or infinite values")
        out[key] = tensor
    return out


def scores(hospital_record: Mapping) -> dict:
    """The local-only model's scores on its hospital's own held-out images, from that
    hospital's part of the last round's record: balanced accuracy, macro AUC, accuracy and,
    from its confusion matrix, per-class precision/recall/F1 (what the model page shows)."""
    prefix = names.LOCAL_ONLY_PREFIX
    out = {k: hospital_record[prefix + k] for k in (names.M_ACCURACY, names.M_BALANCED_ACCURACY, names.M_MACRO_AUC)
           if isinstance(hospital_record.get(prefix + k), (int, float))}
    cm = hospital_record.get(prefix + names.M_CONFUSION_MATRIX)
    if isinstance(cm, list) and cm:
        out |= {k: v for k, v in from_confusion(np.asarray(cm)).items() if k not in out}
    if isinstance(hospital_record.get(names.M_TEST_EXAMPLES), (int, float)):
        out[names.M_TEST_EXAMPLES] = int(hospital_record[names.M_TEST_EXAMPLES])
    return out
