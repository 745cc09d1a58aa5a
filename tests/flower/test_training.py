import pytest
import torch

from fedssl_core import names
from fedssl_core.models import FedSSLModel
from fedssl_flower import training
from fedssl_flower.data import load_hospital_data


@pytest.fixture(scope="module")
def data(ham10000_dir, tmp_path_factory):
    return load_hospital_data({"hospital": "h", "data-path": str(ham10000_dir), "max-images": 160,
                               "cache-dir": str(tmp_path_factory.mktemp("cache"))}, 32)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("task", names.SSL_TASKS)
def test_ssl_training_reduces_the_loss_on_a_fixed_batch(task):
    torch.manual_seed(0)
    model = FedSSLModel(num_classes=7)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = training.train_ssl(model, images, task, epochs=1, batch_size=16, lr=1e-3, seed=0)
    for _ in range(6):
        last = training.train_ssl(model, images, task, epochs=1, batch_size=16, lr=1e-3, seed=0)
    assert last[names.ssl_loss_key(task)] < first[names.ssl_loss_key(task)]
    assert first[names.M_EXAMPLES] == 16


def test_frozen_backbone_mode_trains_only_the_projection_head(data):
    model = FedSSLModel()
    before = snapshot(model)
    training.train_ssl(model, data.train_images[:32], names.SSL_SIMCLR, epochs=1, batch_size=16, share="projection-head")
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {names.GROUP_PROJECTION_HEAD}


def test_linear_probe_changes_only_the_classifier_and_full_changes_the_encoder(data):
    model = FedSSLModel()
    before = snapshot(model)
    training.train_supervised(model, data.train_images, data.train_labels, epochs=2, mode="linear")
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {names.GROUP_CLASSIFIER}
    training.train_supervised(model, data.train_images[:64], data.train_labels[:64], epochs=1, mode="full")
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {names.GROUP_ENCODER, names.GROUP_CLASSIFIER}


def test_evaluate_reports_every_metric(data):
    m = training.evaluate(FedSSLModel(), data.test_images, data.test_labels, data.class_names)
    assert m[names.M_TEST_EXAMPLES] == len(data.test_labels)
    assert len(m[names.M_F1]) == 7 and len(m[names.M_CONFUSION_MATRIX]) == 7
    assert sum(map(sum, m[names.M_CONFUSION_MATRIX])) == len(data.test_labels)
    assert 0.0 <= m[names.M_BALANCED_ACCURACY] <= 1.0 and m[names.M_LOSS] > 0


def test_shared_and_trainable_groups():
    assert training.shared_groups("ssl", "encoder") == (names.GROUP_ENCODER,)
    assert training.shared_groups("ssl", "projection-head") == (names.GROUP_PROJECTION_HEAD,)
    assert training.shared_groups("finetune", mode="full") == (names.GROUP_ENCODER, names.GROUP_CLASSIFIER)
    assert training.trainable_groups("ssl", "rotation", "encoder") == (names.GROUP_ENCODER, names.GROUP_ROTATION_HEAD)
