"""A hospital's generative round: train the class-conditional GAN on its own images.

Plain PyTorch, like `training`: the ClientApp and the benchmarks call `train_gan` with a
`ConditionalGAN` and a hospital's uint8 images. Hinge loss, one discriminator step per
generator step, Adam with beta1 = 0 (the usual GAN setting), DiffAugment on every image the
discriminator sees. A fresh optimizer each round, as in the other phases: the product's
hospitals keep no optimizer state between generative rounds (`optimizer_state` lets the
benchmark measure keeping both networks' Adam moments instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedssl_core.generative import ConditionalGAN, diff_augment

from .training import load_optimizer_moments, optimizer_moments

BETAS = (0.0, 0.99)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → floats in [-1, 1], the generator's range."""
    return images.float() / 127.5 - 1.0


def train_gan(gan: ConditionalGAN, images: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int,
              lr_generator: float, lr_discriminator: float, seed: int, augment: bool = True,
              optimizer_state: dict | None = None) -> dict[str, float]:
    """`steps` hinge-loss steps (one discriminator, one generator step each) on batches drawn
    with replacement across epochs from `images` (uint8 (N, 3, S, S), S the generator's size)
    and their class `labels`. Returns the mean losses and the examples seen.
    `optimizer_state`: both networks' Adam moments kept across rounds, restored from and saved
    to this dict (keys `generator`, `discriminator`); None: fresh optimizers."""
    if images.shape[-1] != gan.generator.image_size:
        raise ValueError(f"images are {images.shape[-1]} px; the generator makes {gan.generator.image_size} px")
    if len(images) < 2:
        raise ValueError(f"a GAN round needs at least 2 training images, got {len(images)}")
    g = torch.Generator().manual_seed(int(seed))
    gen, disc = gan.generator, gan.discriminator
    gan.train()
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr_generator, betas=BETAS)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr_discriminator, betas=BETAS)
    optimizers = {"generator": opt_g, "discriminator": opt_d}
    if optimizer_state:
        for name, opt in optimizers.items():
            load_optimizer_moments(opt, optimizer_state[name])
    aug = (lambda x: diff_augment(x, g)) if augment else (lambda x: x)
    batch_size = min(batch_size, len(images))
    order, pos = torch.randperm(len(images), generator=g), 0
    d_total = g_total = real_total = fake_total = 0.0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        real, y = to_unit(images[idx]), labels[idx]
        z = torch.randn(len(idx), gen.z_dim, generator=g)
        # discriminator: hinge on real and (detached) generated images
        fake = gen(z, y)
        d_real = disc(aug(real), y)
        d_fake = disc(aug(fake.detach()), y)
        loss_d = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator: raise the discriminator's score of its images
        loss_g = -disc(aug(fake), y).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        d_total += float(loss_d.detach())
        g_total += float(loss_g.detach())
        real_total += float(d_real.detach().mean())
        fake_total += float(d_fake.detach().mean())
    gan.eval()
    if optimizer_state is not None:
        optimizer_state.update({name: optimizer_moments(opt) for name, opt in optimizers.items()})
    n = max(steps, 1)
    return {"discriminator_loss": d_total / n, "generator_loss": g_total / n, "discriminator_real_score": real_total / n,
            "discriminator_fake_score": fake_total / n, "examples": steps * batch_size}
