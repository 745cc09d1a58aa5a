"""Self-supervised methods as lightly splits them: one file per method, one registration in
`fedssl_flower.ssl.METHODS`, each training the encoder and its own head only."""

import json
import re
from pathlib import Path

import pytest
import torch

from fedssl_core import names
from fedssl_core.models import FedSSLModel
from fedssl_flower import outputs, ssl, training
from fedssl_registry import service

DASHBOARD_RUN_JS = Path(__file__).resolve().parents[2] / "services" / "fedssl_registry" / "dashboard" / "static" / "run.js"


def test_every_ssl_task_has_a_method_and_a_head():
    assert tuple(ssl.METHODS) == names.SSL_TASKS
    model = FedSSLModel("efficientnet_lite0", num_classes=3)
    heads = [method.head for method in ssl.METHODS.values()]
    assert all(isinstance(getattr(model, h), torch.nn.Module) for h in heads)
    # MICLe is SimCLR with other positive pairs: the same projection space, so hospitals running
    # either average one projection head (share = encoder-and-heads); rotation has its own.
    assert ssl.METHODS[names.SSL_MICLE].head == ssl.METHODS[names.SSL_SIMCLR].head != ssl.METHODS[names.SSL_ROTATION].head
    assert [training.trainable_groups(names.PHASE_SSL, task) for task in ssl.METHODS] == [
        (names.GROUP_ENCODER, method.head) for method in ssl.METHODS.values()]


def test_every_ssl_task_has_its_loss_column_and_its_dashboard_curve():
    """The run's CSV, the registry's round CSV and the dashboard's per-task loss charts name every task."""
    listed = json.loads(re.search(r"const SSL_TASKS = (\[[^\]]*\])", DASHBOARD_RUN_JS.read_text()).group(1))
    assert tuple(listed) == names.SSL_TASKS
    for task in names.SSL_TASKS:
        assert names.ssl_loss_key(task) in outputs.CSV_COLUMNS and names.ssl_loss_key(task) in service.ROUND_CSV_SCALARS


@pytest.mark.parametrize("task", names.SSL_TASKS)
def test_a_methods_loss_reaches_the_encoder_and_its_head_and_nothing_else(task):
    torch.manual_seed(0)
    model = FedSSLModel("efficientnet_lite0", num_classes=3)
    method = ssl.build(task, model, temperature=0.5, colour_jitter=0.4, groups=["a", "a", "b", "c", "c", "d"])
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    batch = method.batch(images, torch.arange(6), torch.Generator().manual_seed(1))
    loss = method.loss(model, batch, torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    touched = {name.partition(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {names.GROUP_ENCODER, method.head}
    again = method.loss(model, batch, torch.Generator().manual_seed(1))
    assert float(again.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)  # the generator alone draws the views


def test_an_unknown_task_is_refused_before_any_training():
    model = FedSSLModel("efficientnet_lite0", num_classes=3)
    with pytest.raises(training.ConfigError, match="unknown ssl-task 'byol'; expected one of simclr, rotation"):
        training.train_ssl(model, torch.zeros(4, 3, 16, 16, dtype=torch.uint8), "byol", epochs=1, batch_size=2)


def test_micle_pairs_each_image_with_another_image_of_its_lesion_and_a_lone_one_with_itself():
    groups = ["L1", "L2", "L1", "L3", "L1", "L2"]
    assert ssl.micle.group_partners(groups) == [[2, 4], [5], [0, 4], [], [0, 2], [1]]
    model = FedSSLModel("efficientnet_lite0", num_classes=3)
    method = ssl.build(names.SSL_MICLE, model, groups=groups)
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 8, 8).contiguous()  # image i is all i
    g = torch.Generator().manual_seed(0)
    seen = {i: set() for i in range(6)}
    for _ in range(40):
        idx = torch.randint(0, 6, (4,), generator=g)
        first, second = method.batch(images, idx, g)
        assert torch.equal(first, images[idx])
        for i, partner in zip(idx.tolist(), second[:, 0, 0, 0].tolist()):
            seen[i].add(partner)
    assert seen == {0: {2, 4}, 1: {5}, 2: {0, 4}, 3: {3}, 4: {0, 2}, 5: {1}}  # every partner drawn, never another lesion's


def test_micle_on_images_without_shared_lesions_is_refused_naming_what_it_needs():
    model = FedSSLModel("efficientnet_lite0", num_classes=3)
    with pytest.raises(training.ConfigError, match=r"hospital h: ssl-task=micle pairs images of the same lesion or patient, "
                                                   r"and none of its 3 training images shares its lesion with another .*"
                                                   r"expected ssl-task=simclr or rotation for these data"):
        ssl.micle.require_pairs(["a", "b", "c"], "hospital h")
    with pytest.raises(training.ConfigError, match="none of its 4 training images"):
        training.train_ssl(model, torch.zeros(4, 3, 16, 16, dtype=torch.uint8), names.SSL_MICLE, epochs=1, batch_size=2,
                           lesions=["a", "b", "c", "d"])


def test_micle_rounds_train_the_encoder_and_report_their_own_loss():
    torch.manual_seed(0)
    model = FedSSLModel("efficientnet_lite0", num_classes=3)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = training.train_ssl(model, images, names.SSL_MICLE, epochs=1, batch_size=4, lesions=list("aabbccdd"))
    assert out[names.ssl_loss_key(names.SSL_MICLE)] == out[names.M_LOSS] > 0 and out[names.M_EXAMPLES] == 8
    assert any(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
