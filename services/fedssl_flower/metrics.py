"""Classification metrics for imbalanced medical data, per hospital and across hospitals.

Plain accuracy flatters a model on HAM10000 (two thirds `nv`), so balanced accuracy (mean
recall over the classes present) and macro one-vs-rest AUC are reported beside it.
Conventions: per-class lists follow `class_names`; the confusion matrix has one row per true
class; a metric that is undefined on the data (AUC with one class present) is None.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedssl_core import names

_PER_CLASS = (names.M_PRECISION, names.M_RECALL, names.M_F1)


def _auc_binary(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic, ties counted half."""
    scores = np.concatenate([pos_scores, neg_scores])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """Mean one-vs-rest AUC over the classes present in `y_true`; None with fewer than two."""
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    aucs = [_auc_binary(proba[y_true == c, c], proba[y_true != c, c]) for c in present]
    return float(np.mean(aucs))


def from_confusion(cm: np.ndarray) -> dict:
    """Accuracy, balanced accuracy and per-class precision/recall/F1 of a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = cm.sum()
    return {
        names.M_ACCURACY: float(tp.sum() / total) if total else 0.0,
        names.M_BALANCED_ACCURACY: float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
        names.M_PRECISION: precision.tolist(),
        names.M_RECALL: recall.tolist(),
        names.M_F1: f1.tolist(),
        names.M_CONFUSION_MATRIX: cm.astype(np.int64).tolist(),
    }


def confusion_matrix(y_true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, one row per true class and one column per predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return cm


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """All metrics of predicted class probabilities `proba` (N, K) against labels `y_true` (N,)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    k = len(class_names)
    if proba.ndim != 2 or proba.shape != (len(y_true), k):
        raise ValueError(f"proba must be ({len(y_true)}, {k}), got {proba.shape}")
    out = from_confusion(confusion_matrix(y_true, proba.argmax(axis=1), k))
    out[names.M_MACRO_AUC] = macro_auc(y_true, proba)
    return out


def aggregate_metrics(per_hospital: Mapping[str, Mapping], weights: Mapping[str, int], class_names: list[str]) -> dict:
    """Metrics across hospitals.

    Confusion matrices are summed and accuracy, balanced accuracy and per-class P/R/F1 are
    recomputed from the sum (the pooled test set's scores, not a mean of ratios). Every
    other scalar (losses, AUC, local-only scores) is the mean weighted by `weights`
    (examples), over the hospitals that reported it, except timings: a round waits for its
    slowest hospital, so those take the maximum.
    """
    out: dict = {}
    cms = [np.asarray(m[names.M_CONFUSION_MATRIX]) for m in per_hospital.values() if m.get(names.M_CONFUSION_MATRIX) is not None]
    recomputed = set()
    if cms:
        out.update(from_confusion(sum(cms)))
        recomputed = {names.M_ACCURACY, names.M_BALANCED_ACCURACY, *_PER_CLASS, names.M_CONFUSION_MATRIX}
    keys = sorted({k for m in per_hospital.values() for k in m} - recomputed)
    for key in keys:
        pairs = [(float(m[key]), weights.get(h, 0)) for h, m in per_hospital.items()
                 if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
        total = sum(w for _, w in pairs)
        if pairs and total > 0:
            out[key] = sum(v * w for v, w in pairs) / total
    curves = [(np.asarray(m[names.M_NLL_BY_TEMPERATURE], dtype=np.float64), weights.get(h, 0)) for h, m in per_hospital.items()
              if isinstance(m.get(names.M_NLL_BY_TEMPERATURE), list) and len(m[names.M_NLL_BY_TEMPERATURE]) == len(names.TEMPERATURE_GRID)]
    if curves and sum(w for _, w in curves) > 0:  # held-out NLL over all hospitals at each temperature
        nll = sum(c * w for c, w in curves) / sum(w for _, w in curves)
        out[names.M_NLL_BY_TEMPERATURE] = nll.tolist()
        out[names.M_TEMPERATURE] = float(names.TEMPERATURE_GRID[int(nll.argmin())])
    for key in names.TIMING_KEYS:
        vals = [float(m[key]) for m in per_hospital.values() if isinstance(m.get(key), (int, float))]
        if vals:
            out[key] = max(vals)
    for count_key in (names.M_EXAMPLES, names.M_TEST_EXAMPLES):
        vals = [m[count_key] for m in per_hospital.values() if count_key in m]
        if vals:
            out[count_key] = int(sum(vals))
    return out
