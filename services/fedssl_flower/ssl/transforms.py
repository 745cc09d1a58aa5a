"""Augmentations on uint8 image batches, per sample, for dermoscopy.

Dermoscopy images have no canonical orientation, so flips and 90-degree rotations are
label-preserving; colour jitter stays moderate because colour carries diagnostic signal.
Everything works on tensors already in memory: no PIL, no re-decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedssl_core import names
from fedssl_core.preprocessing import normalize  # the one normalisation (uint8 → float), re-exported here

__all__ = ["SimCLRTransform", "normalize", "rotate_batch"]


def rotate_batch(images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each image by k*90 degrees, k uniform in {0,1,2,3}; returns (rotated, k)."""
    k = torch.randint(0, 4, (images.shape[0],), generator=generator)
    out = torch.empty_like(images)
    for r in range(4):
        idx = (k == r).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = torch.rot90(images[idx], r, dims=(-2, -1))
    return out, k


class SimCLRTransform:
    """Two independently augmented views of a uint8 batch, as normalised float batches.

    Per sample: random resized crop (scale `crop_scale`), horizontal and vertical flips,
    a random multiple of 90 degrees, colour jitter (brightness, contrast, saturation) with
    probability `jitter_p`.
    """

    def __init__(
        self,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        jitter_p: float = 0.8,
        mean: Sequence[float] = names.IMAGENET_MEAN,
        std: Sequence[float] = names.IMAGENET_STD,
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)  # the model's input normalisation
        self.crop_scale = crop_scale
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.jitter_p = jitter_p

    def view(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, h, w = batch.shape
        x = batch.to(torch.float32) / 255.0
        g = generator

        def u(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=g)

        # Random resized crop as one batched affine resampling: scale and aspect per sample.
        area = u(*self.crop_scale)
        log_ratio = u(-0.2877, 0.2877)  # aspect ratio in [3/4, 4/3]
        ratio = torch.exp(log_ratio)
        sw = torch.sqrt(area * ratio).clamp(max=1.0)
        sh = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (1 - sw) * (2 * torch.rand(n, generator=g) - 1)
        ty = (1 - sh) * (2 * torch.rand(n, generator=g) - 1)
        flip_h = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        flip_v = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = sw * flip_h
        theta[:, 1, 1] = sh * flip_v
        theta[:, 0, 2] = tx
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, (n, 3, h, w), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        k = torch.randint(0, 4, (n,), generator=g)
        for r in range(1, 4):
            idx = (k == r).nonzero(as_tuple=True)[0]
            if len(idx):
                x[idx] = torch.rot90(x[idx], r, dims=(-2, -1))

        apply = (torch.rand(n, generator=g) < self.jitter_p).float().view(n, 1, 1, 1)
        b = 1 + (2 * torch.rand(n, generator=g) - 1).view(n, 1, 1, 1) * self.brightness
        c = 1 + (2 * torch.rand(n, generator=g) - 1).view(n, 1, 1, 1) * self.contrast
        s = 1 + (2 * torch.rand(n, generator=g) - 1).view(n, 1, 1, 1) * self.saturation
        jittered = x * b
        mean = jittered.mean(dim=(1, 2, 3), keepdim=True)
        jittered = (jittered - mean) * c + mean
        gray = (0.299 * jittered[:, 0:1] + 0.587 * jittered[:, 1:2] + 0.114 * jittered[:, 2:3])
        jittered = (jittered - gray) * s + gray
        x = (apply * jittered + (1 - apply) * x).clamp(0, 1)

        m = torch.tensor(self.mean).view(1, 3, 1, 1)
        sd = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - m) / sd

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(batch, generator), self.view(batch, generator)
