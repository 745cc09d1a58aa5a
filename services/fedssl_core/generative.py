"""A small class-conditional GAN: what hospitals train together in a generative run (`task = generate`).

Chosen for two CPU cores at 32-64 px: a DCGAN generator (transposed convolutions) whose class enters through
class-conditional BatchNorm gains (BigGAN's conditioning, one embedding per layer), and a
spectrally normalised discriminator with a projection head (Miyato & Koyama 2018), trained
with the hinge loss and differentiable augmentation of both real and generated images
(DiffAugment, Zhao et al. 2020: colour, translation, cutout), which is what keeps a
discriminator from memorising a few thousand images.

`ConditionalGAN` holds both networks; its state-dict keys are grouped by prefix
(`names.GROUP_GENERATOR`, `names.GROUP_DISCRIMINATOR`), the two groups a generative round
averages. Serving needs only the generator (`build_generator`, `sample`). Pixels are in
[-1, 1] inside the networks and uint8 outside.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from . import names
from .errors import ConfigError

IMAGE_SIZES = (32, 64)  # 4x4 grown by 3 or 4 doublings
DEFAULT_Z_DIM = 64
DEFAULT_WIDTH = 32  # the last generator block's channels; earlier blocks have 2x, 4x, 8x


def check_spec(num_classes: int, image_size: int, z_dim: int, width: int) -> None:
    """Refuse a generator shape this module cannot build, naming the value and what is allowed."""
    if num_classes < 1:
        raise ConfigError(f"a generator needs at least 1 class, got num_classes={num_classes}")
    if image_size not in IMAGE_SIZES:
        raise ConfigError(f"generator image size {image_size}; expected one of {', '.join(map(str, IMAGE_SIZES))}")
    if not 1 <= z_dim <= 1024:
        raise ConfigError(f"generator z-dim {z_dim}; expected 1..1024")
    if not 4 <= width <= 512:
        raise ConfigError(f"generator width {width}; expected 4..512")


def _blocks(image_size: int) -> int:
    return int(math.log2(image_size // 4))


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine; gain and bias come from the class (BigGAN)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class _UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_classes: int) -> None:
        super().__init__()
        self.norm = ConditionalBatchNorm(c_in, num_classes)
        # A transposed 4x4 convolution doubles the side at the input's resolution: half the
        # multiply-adds of upsampling first and convolving at the output's.
        self.conv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.norm(x, y)))


class Generator(nn.Module):
    """(z, class) → image in [-1, 1], (N, 3, S, S)."""

    def __init__(self, num_classes: int, image_size: int = 32, z_dim: int = DEFAULT_Z_DIM, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        check_spec(num_classes, image_size, z_dim, width)
        self.num_classes, self.image_size, self.z_dim, self.width = num_classes, image_size, z_dim, width
        n = _blocks(image_size)
        chans = [width * 2 ** (n - i) for i in range(n + 1)]  # e.g. 256, 128, 64, 32 at width 32, 32 px
        self.stem = nn.Linear(z_dim, chans[0] * 16)
        self.blocks = nn.ModuleList(_UpBlock(chans[i], chans[i + 1], num_classes) for i in range(n))
        self.out_norm = nn.BatchNorm2d(chans[-1])
        self.out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.stem(z).view(z.shape[0], -1, 4, 4)
        for block in self.blocks:
            x = block(x, y)
        return torch.tanh(self.out(F.relu(self.out_norm(x))))


class Discriminator(nn.Module):
    """image (N, 3, S, S) in [-1, 1], class → a real-vs-generated score (N,), projection-conditioned."""

    def __init__(self, num_classes: int, image_size: int = 32, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        check_spec(num_classes, image_size, DEFAULT_Z_DIM, width)
        n = _blocks(image_size)
        chans = [3] + [width * 2 ** i for i in range(n)]  # 3 → 32 → 64 → 128 at 32 px
        layers: list[nn.Module] = []
        for i in range(n):  # DCGAN's discriminator: one strided 4x4 convolution per halving
            layers += [spectral_norm(nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        layers += [spectral_norm(nn.Conv2d(chans[-1], chans[-1] * 2, 3, padding=1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(chans[-1] * 2, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, chans[-1] * 2))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


class ConditionalGAN(nn.Module):
    """The generator and discriminator a generative round trains; keys `generator.*`, `discriminator.*`."""

    def __init__(self, num_classes: int, image_size: int = 32, z_dim: int = DEFAULT_Z_DIM, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.generator = Generator(num_classes, image_size, z_dim, width)
        self.discriminator = Discriminator(num_classes, image_size, width)

    @property
    def spec(self) -> dict[str, int]:
        g = self.generator
        return {"num_classes": g.num_classes, "image_size": g.image_size, "z_dim": g.z_dim, "width": g.width}


# ---------------------------------------------------------------- serving

def generator_meta(spec: Mapping[str, int]) -> dict[str, str]:
    """The safetensors metadata that lets serving rebuild the generator (`build_generator`)."""
    return {"fedssl.num_classes": str(spec["num_classes"]), "fedssl.image_size": str(spec["image_size"]),
            "fedssl.z_dim": str(spec["z_dim"]), "fedssl.width": str(spec["width"])}


def build_generator(meta: Mapping[str, str]) -> Generator:
    """A random generator of the shape `meta` (a registered version's safetensors metadata) names,
    in eval mode; load its `generator.*` weights with `load_generator`."""
    try:
        spec = {k: int(meta[f"fedssl.{k}"]) for k in ("num_classes", "image_size", "z_dim", "width")}
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"generator weights lack a readable shape in their metadata ({exc}); expected fedssl.num_classes, "
                          "fedssl.image_size, fedssl.z_dim and fedssl.width") from exc
    return Generator(**spec).eval()


def load_generator(generator: Generator, state: Mapping[str, torch.Tensor]) -> Generator:
    """Load the `generator.*` entries of `state` (a ConditionalGAN's, or only its generator's)."""
    prefix = f"{names.GROUP_GENERATOR}."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    generator.load_state_dict(own, strict=True)
    return generator


def latents(count: int, z_dim: int, seed: int) -> torch.Tensor:
    """`count` standard normal latent vectors, the same for the same seed on every machine."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(count, z_dim, generator=g)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 pixels."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def sample(generator: Generator, labels: torch.Tensor, seed: int = 0, *, z: torch.Tensor | None = None,
           batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, 3, S, S) images of classes `labels` from latents drawn with `seed` (or given
    as `z`), in eval mode (BatchNorm running statistics: the image does not depend on what else
    is in the batch)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= generator.num_classes):
        raise ConfigError(f"class index out of range: got {labels.min().item()}..{labels.max().item()}, "
                          f"expected 0..{generator.num_classes - 1}")
    if z is None:
        z = latents(len(labels), generator.z_dim, seed)
    elif z.shape != (len(labels), generator.z_dim):
        raise ConfigError(f"latents of shape {tuple(z.shape)}; expected ({len(labels)}, {generator.z_dim})")
    was_training = generator.training
    generator.eval()
    try:
        out = [to_uint8(generator(z[i:i + batch_size].float(), labels[i:i + batch_size])) for i in range(0, len(labels), batch_size)]
    finally:
        generator.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 3, generator.image_size, generator.image_size, dtype=torch.uint8)


# ---------------------------------------------------------------- DiffAugment (Zhao et al. 2020)

def diff_augment(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """Colour (brightness, saturation, contrast), translation by up to 1/8 of the side, and a
    cutout of half the side, each drawn per image; differentiable, so the generator is trained
    through it. Applied to real and generated images alike."""
    n, _, h, w = x.shape
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=dev)

    x = x + (rand(n, 1, 1, 1) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand(n, 1, 1, 1) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (rand(n, 1, 1, 1) + 0.5) + mean  # contrast
    # translation: shift by an integer offset with zero padding
    shift = max(1, h // 8)
    tx = torch.randint(-shift, shift + 1, (n, 1, 1), generator=g, device=dev)
    ty = torch.randint(-shift, shift + 1, (n, 1, 1), generator=g, device=dev)
    gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    gy = (gy.unsqueeze(0) + ty).clamp(-1, h)
    gx = (gx.unsqueeze(0) + tx).clamp(-1, w)
    padded = F.pad(x, (1, 1, 1, 1))
    idx = torch.arange(n, device=dev)[:, None, None]
    x = padded.permute(0, 2, 3, 1)[idx, gy + 1, gx + 1].permute(0, 3, 1, 2)
    # cutout: a square of about half the side, anywhere, set to zero
    cy = torch.randint(0, h, (n, 1, 1), generator=g, device=dev)
    cx = torch.randint(0, w, (n, 1, 1), generator=g, device=dev)
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    inside = ((ys - cy).abs() < h // 4) & ((xs - cx).abs() < w // 4)
    return x * (~inside).unsqueeze(1).to(x.dtype)
