"""Self-supervised methods as lightly splits them: one file per method, one registration in
`fedssl_flower.ssl.METHODS`, each training the encoder and its own head only."""

import pytest
import torch

from fedssl_core import names
from fedssl_core.models import FedSSLModel
from fedssl_flower import ssl, training


def test_every_ssl_task_has_a_method_with_a_head_of_its_own():
    assert tuple(ssl.METHODS) == names.SSL_TASKS
    model = FedSSLModel("efficientnet_lite0", num_classes=3)
    heads = [method.head for method in ssl.METHODS.values()]
    assert len(set(heads)) == len(heads) and all(isinstance(getattr(model, h), torch.nn.Module) for h in heads)
    assert [training.trainable_groups(names.PHASE_SSL, task) for task in ssl.METHODS] == [
        (names.GROUP_ENCODER, method.head) for method in ssl.METHODS.values()]


@pytest.mark.parametrize("task", names.SSL_TASKS)
def test_a_methods_loss_reaches_the_encoder_and_its_head_and_nothing_else(task):
    torch.manual_seed(0)
    model = FedSSLModel("efficientnet_lite0", num_classes=3)
    method = ssl.build(task, model, temperature=0.5, colour_jitter=0.4)
    batch = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
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
