"""SimCLR (Chen et al. 2020): two augmented views of every image; each view's projection must
find its partner among all the batch's views (NT-Xent)."""

from __future__ import annotations

import torch

from fedssl_core import names
from fedssl_core.models import FedSSLModel

from .losses import NTXentLoss
from .transforms import SimCLRTransform


class SimCLR:
    task = names.SSL_SIMCLR
    head = names.GROUP_PROJECTION_HEAD

    def __init__(self, model: FedSSLModel, *, temperature: float = 0.5, colour_jitter: float = 0.4, **_: object) -> None:
        self.criterion = NTXentLoss(temperature)
        self.transform = SimCLRTransform(brightness=colour_jitter, contrast=colour_jitter, saturation=colour_jitter,
                                         mean=model.mean, std=model.std)

    def batch(self, images: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return images[idx]

    def loss(self, model: FedSSLModel, batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """NT-Xent of one uint8 batch's two views, through the encoder and the projection head."""
        v1, v2 = self.transform(batch, g)
        views = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
        z = model.projection_head(model.encoder(views))
        return self.criterion(z[: len(batch)], z[len(batch) :])
