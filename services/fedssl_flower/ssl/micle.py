"""MICLe, multi-instance contrastive learning (Azizi et al., ICCV 2021): SimCLR whose positive
pair is two images of the same lesion (or patient) where the hospital has several, each
augmented, so the encoder learns what stays the same across a lesion's photographs (another
day, angle, zoom or device) and not only across crops of one photograph. An image whose lesion
has no other image pairs with itself, as in SimCLR. Needs the data's groups (HAM10000's
`lesion_id`); data without any group of two or more images cannot run it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedssl_core import names
from fedssl_core.models import FedSSLModel

from ..errors import ConfigError
from .simclr import SimCLR


def group_partners(groups: Sequence[str]) -> list[list[int]]:
    """For each image, the indices of the other images of its group (empty when it has none)."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    return [[j for j in members[group] if j != i] for i, group in enumerate(groups)]


def draw_partners(partners: Sequence[Sequence[int]], idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """For each image index in `idx`, one of its group's other images drawn at random from `g`
    (`partners` as `group_partners` gives them), or itself when its group has no other."""
    return torch.tensor([p[int(torch.randint(0, len(p), (1,), generator=g))] if p else i
                         for i, p in ((i, partners[i]) for i in idx.tolist())], dtype=torch.long)


def require_pairs(groups: Sequence[str], who: str = "this hospital") -> list[list[int]]:
    """`group_partners(groups)`, or a ConfigError when no image has a partner."""
    partners = group_partners(groups)
    if not any(partners):
        raise ConfigError(f"{who}: ssl-task={names.SSL_MICLE} pairs images of the same lesion or patient, and none of its "
                          f"{len(partners)} training images shares its lesion with another (MICLe needs groups such as "
                          f"HAM10000's lesion_id; class-per-folder and synthetic images have one image per group); "
                          f"expected ssl-task={names.SSL_SIMCLR} or {names.SSL_ROTATION} for these data")
    return partners


class MICLe(SimCLR):
    task = names.SSL_MICLE

    def __init__(self, model: FedSSLModel, *, groups: Sequence[str] = (), **options: object) -> None:
        super().__init__(model, **options)
        self.partners = require_pairs(groups)

    def batch(self, images: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(2, B, 3, S, S): the sampled images, and for each one another image of its lesion
        drawn at random (itself when its lesion has one image)."""
        if len(self.partners) != len(images):
            raise ValueError(f"MICLe was given groups for {len(self.partners)} images and asked to pair among {len(images)}")
        return torch.stack([images[idx], images[draw_partners(self.partners, idx, g)]])

    def loss(self, model: FedSSLModel, batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """NT-Xent between a view of each image and a view of its partner."""
        views = torch.cat([self.transform.view(batch[0], g), self.transform.view(batch[1], g)])
        z = model.projection_head(model.encoder(views.contiguous(memory_format=torch.channels_last)))
        return self.criterion(z[: batch.shape[1]], z[batch.shape[1] :])
