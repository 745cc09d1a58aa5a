"""Rotation prediction (Gidaris et al. 2018): every image turned by 0, 90, 180 or 270 degrees
at random; the encoder and a 4-way head must tell which."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedssl_core import names
from fedssl_core.models import FedSSLModel

from .transforms import normalize, rotate_batch


class Rotation:
    task = names.SSL_ROTATION
    head = names.GROUP_ROTATION_HEAD

    def __init__(self, model: FedSSLModel, **_: object) -> None:  # takes no options (SimCLR's are ignored)
        self.mean, self.std = model.mean, model.std

    def batch(self, images: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return images[idx]

    def loss(self, model: FedSSLModel, batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Cross-entropy of the rotation head on one uint8 batch, each image turned at random."""
        rotated, k = rotate_batch(batch, g)
        x = normalize(rotated, self.mean, self.std).contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(model.rotation_head(model.encoder(x)), k)
