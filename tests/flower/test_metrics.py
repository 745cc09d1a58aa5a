import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from fedssl_flower.metrics import aggregate_metrics, classification_metrics

CLASSES = ["a", "b", "c", "d"]


def sample(seed, n=200):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_matches_sklearn():
    y, p = sample(0)
    m = classification_metrics(y, p, CLASSES)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    assert m["precision"] == pytest.approx(prec.tolist()) and m["recall"] == pytest.approx(rec.tolist())
    assert m["f1"] == pytest.approx(f1.tolist())
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(4)).tolist()


def test_auc_is_none_with_a_single_class_present():
    y = np.zeros(10, dtype=int)
    p = np.full((10, 4), 0.25)
    assert classification_metrics(y, p, CLASSES)["macro_auc"] is None


def test_aggregate_recomputes_from_summed_confusion_matrices():
    (y1, p1), (y2, p2) = sample(1, 150), sample(2, 50)
    per = {"h1": {**classification_metrics(y1, p1, CLASSES), "loss": 1.0},
           "h2": {**classification_metrics(y2, p2, CLASSES), "loss": 3.0}}
    agg = aggregate_metrics(per, {"h1": 150, "h2": 50}, CLASSES)
    y, p = np.concatenate([y1, y2]), np.concatenate([p1, p2])
    pooled = classification_metrics(y, p, CLASSES)
    assert agg["balanced_accuracy"] == pytest.approx(pooled["balanced_accuracy"])
    assert agg["confusion_matrix"] == pooled["confusion_matrix"]
    assert agg["loss"] == pytest.approx((1.0 * 150 + 3.0 * 50) / 200)
    assert agg["macro_auc"] == pytest.approx((per["h1"]["macro_auc"] * 150 + per["h2"]["macro_auc"] * 50) / 200)


def test_aggregate_round_timings_take_the_slowest_hospital():
    per = {"h1": {"compute_seconds": 2.0, "handler_seconds": 5.0, "loss": 1.0},
           "h2": {"compute_seconds": 7.0, "handler_seconds": 9.0, "loss": 2.0}}
    agg = aggregate_metrics(per, {"h1": 900, "h2": 100}, CLASSES)
    assert agg["compute_seconds"] == 7.0 and agg["handler_seconds"] == 9.0
    assert agg["loss"] == pytest.approx(1.1)
