"""Self-supervised methods, lightly's split: each method is a file with its loss and views
(`simclr.py`, `rotation.py`, `micle.py`), built on the losses and multi-view transforms here, and
one line in METHODS. A method names the model's head it trains (`head`, a parameter group of
`fedssl_core.models.FedSSLModel`, where a new method's head goes), picks a step's uint8 batch
from the sampled indices (`batch(images, idx, generator)`: the images themselves, or MICLe's
pairs of one lesion's images) and gives that batch's loss (`loss(model, batch, generator)`);
`training.train_ssl` runs the steps for every method."""

from __future__ import annotations

from typing import Protocol

import torch

from fedssl_core.models import FedSSLModel

from .micle import MICLe
from .rotation import Rotation
from .simclr import SimCLR


class SSLMethod(Protocol):
    task: str
    head: str

    def batch(self, images: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor: ...

    def loss(self, model: FedSSLModel, batch: torch.Tensor, g: torch.Generator) -> torch.Tensor: ...


METHODS: dict[str, type] = {SimCLR.task: SimCLR, Rotation.task: Rotation, MICLe.task: MICLe}  # in the order of names.SSL_TASKS


def build(task: str, model: FedSSLModel, **options: object) -> SSLMethod:
    """The method of ssl-task `task` for `model`; `options` (temperature, colour_jitter, groups:
    the lesion or patient of each training image) go to the methods that take them."""
    return METHODS[task](model, **options)
