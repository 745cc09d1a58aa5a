"""register-local-models: the registered names of hospitals' own classifiers, the check of
what a hospital sends, the scores recorded with it, and the run config that turns it on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedssl_core import names
from fedssl_core.models import FedSSLModel
from fedssl_flower import local_models
from fedssl_flower.config import RunConfig
from fedssl_flower.errors import ConfigError
from fedssl_flower.metrics import from_confusion


def test_model_names_are_registry_names_one_per_hospital():
    got = local_models.model_names(["aiims-delhi", "Tata Memorial (Mumbai)", "tata memorial mumbai", "..", "x" * 80])
    assert got["aiims-delhi"] == "fedssl-local-aiims-delhi"
    # Two hospitals whose names make the same slug get distinct names, in the order of their names.
    assert got["Tata Memorial (Mumbai)"] == "fedssl-local-tata-memorial-mumbai"
    assert got["tata memorial mumbai"] == "fedssl-local-tata-memorial-mumbai-2"
    assert got[".."] == "fedssl-local-hospital"
    assert len(set(got.values())) == 5
    from fedssl_registry.schemas import NAME_RE  # what the registry accepts

    for name in got.values():
        assert NAME_RE.match(name) and len(name) <= 63, name


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return FedSSLModel(names.ARCH_RESNET18, num_classes=4).state_dict()


def _classifier(state) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in state.items() if k.startswith(("encoder.", "classifier."))}


def test_a_hospitals_classifier_is_taken_as_the_federations_dtypes(reference):
    # As it travels: float16 on the wire (update-encoding), BatchNorm's 0-d counters as one element.
    sent = {k: v.astype(np.float16) if v.dtype == np.float32 else v.reshape(-1) for k, v in _classifier(reference).items()}
    assert any(reference[k].dim() == 0 for k in sent)
    state = local_models.classifier_state(sent, reference)
    assert set(state) == {k for k in reference if k.startswith(("encoder.", "classifier."))}
    assert all(state[k].dtype == reference[k].dtype and state[k].shape == reference[k].shape for k in state)
    assert not any(k.startswith(("projection_head.", "rotation_head.")) for k in state)  # task heads stay home


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.pop("classifier.weight"), "missing ['classifier.weight']"),
    (lambda a: a.update({"heads.rotation.weight": np.zeros(3, np.float32)}), "unexpected ['heads.rotation.weight']"),
    (lambda a: a.update({"classifier.weight": np.zeros((7, 3), np.float32)}), "tensor classifier.weight has shape (7, 3)"),
    (lambda a: a["classifier.bias"].__setitem__(0, np.nan), "tensor classifier.bias holds NaN or infinite values"),
])
def test_anything_else_is_refused_naming_what_differs(reference, damage, message):
    sent = _classifier(reference)
    damage(sent)
    with pytest.raises(ValueError) as err:
        local_models.classifier_state(sent, reference)
    assert message in str(err.value)


def test_scores_are_the_hospitals_report_of_its_own_model():
    cm = [[3, 1, 0], [0, 2, 2], [1, 0, 5]]
    record = {"balanced_accuracy": 0.9, names.LOCAL_ONLY_PREFIX + "balanced_accuracy": 0.61,
              names.LOCAL_ONLY_PREFIX + "macro_auc": 0.8, names.LOCAL_ONLY_PREFIX + "confusion_matrix": cm,
              names.M_TEST_EXAMPLES: 14}
    got = local_models.scores(record)
    assert got["balanced_accuracy"] == 0.61 and got["macro_auc"] == 0.8 and got[names.M_TEST_EXAMPLES] == 14
    per_class = from_confusion(np.array(cm))
    assert got["precision"] == per_class["precision"] and got["confusion_matrix"] == cm
    assert got["accuracy"] == pytest.approx(10 / 14)
    assert local_models.scores({"balanced_accuracy": 0.9}) == {}  # no local-only scores: none recorded


def test_register_local_models_is_off_by_default_and_needs_a_local_model_to_register():
    assert RunConfig.from_mapping({}).register_local_models is False
    assert RunConfig.from_mapping({"register-local-models": True, "finetune-rounds": 1}).register_local_models is True
    with pytest.raises(ConfigError, match="register-local-models=true needs local-baseline=true"):
        RunConfig.from_mapping({"register-local-models": True, "local-baseline": False, "finetune-rounds": 1})
    with pytest.raises(ConfigError, match="needs finetune-rounds >= 1"):
        RunConfig.from_mapping({"register-local-models": True, "finetune-rounds": 0, "ssl-rounds": 1})
