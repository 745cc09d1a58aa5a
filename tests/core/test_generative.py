"""The class-conditional GAN (fedssl_core.generative) and its training loop (fedssl_flower.generative)."""

import copy

import pytest
import torch

from fedssl_core import generative, names, weights
from fedssl_core.errors import ConfigError
from fedssl_core.models import TASK_GROUPS, select_groups
from fedssl_flower.generative import train_gan


@pytest.mark.parametrize("size", generative.IMAGE_SIZES)
def test_shapes_and_groups(size):
    gan = generative.ConditionalGAN(3, size, z_dim=8, width=8)
    out = generative.sample(gan.generator, torch.tensor([0, 2, 1]), seed=1)
    assert out.shape == (3, 3, size, size) and out.dtype == torch.uint8
    keys = list(gan.state_dict())
    assert {k.split(".")[0] for k in keys} == {names.GROUP_GENERATOR, names.GROUP_DISCRIMINATOR}
    assert gan.discriminator(torch.zeros(2, 3, size, size), torch.tensor([0, 1])).shape == (2,)


def test_sampling_is_deterministic_per_seed_and_independent_of_the_batch():
    gen = generative.ConditionalGAN(4, 32, z_dim=8, width=8).generator
    a = generative.sample(gen, torch.tensor([1, 2, 3]), seed=5)
    assert torch.equal(a, generative.sample(gen, torch.tensor([1, 2, 3]), seed=5))
    assert not torch.equal(a, generative.sample(gen, torch.tensor([1, 2, 3]), seed=6))
    # eval mode: an image does not depend on what else is in its batch
    z = generative.latents(3, 8, seed=5)
    assert torch.equal(generative.sample(gen, torch.tensor([1]), z=z[:1]), a[:1])
    assert gen.training  # sampling leaves the module's mode as it was


def test_bad_shapes_and_classes_are_refused_with_what_was_expected():
    with pytest.raises(ConfigError, match="generator image size 48; expected one of 32, 64"):
        generative.ConditionalGAN(3, 48)
    gen = generative.ConditionalGAN(3, 32, z_dim=8, width=8).generator
    with pytest.raises(ConfigError, match=r"class index out of range: got 0..3, expected 0..2"):
        generative.sample(gen, torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match=r"latents of shape \(1, 4\); expected \(2, 8\)"):
        generative.sample(gen, torch.tensor([0, 1]), z=torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="fedssl.num_classes"):
        generative.build_generator({"fedssl.image_size": "32"})


def test_registered_weights_rebuild_the_same_generator():
    """What the aggregator registers (generator group + generator_meta) is all serving needs."""
    gan = generative.ConditionalGAN(5, 32, z_dim=12, width=8)
    served = select_groups(gan.state_dict(), TASK_GROUPS[names.TASK_GENERATION])
    assert served and all(k.startswith("generator.") for k in served)
    blob = weights.to_bytes(served, generative.generator_meta(gan.spec))
    state, meta = weights.from_bytes(blob), weights.read_metadata(blob)
    rebuilt = generative.load_generator(generative.build_generator(meta), state)
    labels = torch.tensor([0, 4, 2])
    assert torch.equal(generative.sample(rebuilt, labels, seed=3), generative.sample(gan.generator, labels, seed=3))


def test_diff_augment_keeps_shape_and_passes_gradients():
    x = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_()
    y = generative.diff_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # cutout zeroes a square of every image
    assert ((y.detach() == 0).flatten(1).sum(1) >= 8 * 8).all()


def test_the_generator_learns_each_class_colour():
    """Two classes of flat images, red and blue: after training, the generator draws class 0
    redder than blue and class 1 bluer than red (the class conditioning works)."""
    torch.manual_seed(0)
    n = 128
    labels = torch.arange(n) % 2
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[labels == 0, 0] = 230
    images[labels == 1, 2] = 230
    images = (images.float() + torch.randn(n, 3, 32, 32) * 10).clamp(0, 255).to(torch.uint8)
    gan = generative.ConditionalGAN(2, 32, z_dim=8, width=8)
    metrics = train_gan(gan, images, labels, steps=150, batch_size=32, lr_generator=2e-3, lr_discriminator=2e-3, seed=0,
                        augment=False)
    assert metrics["examples"] == 150 * 32 and metrics["generator_loss"] == metrics["generator_loss"]
    drawn = generative.sample(gan.generator, torch.tensor([0] * 16 + [1] * 16), seed=0).float()
    red, blue = drawn[:, 0].mean(dim=(1, 2)), drawn[:, 2].mean(dim=(1, 2))
    assert (red[:16] > blue[:16]).float().mean() > 0.8, (red[:16], blue[:16])
    assert (blue[16:] > red[16:]).float().mean() > 0.8, (red[16:], blue[16:])


def test_train_gan_refuses_images_of_another_size():
    gan = generative.ConditionalGAN(2, 32, z_dim=8, width=8)
    with pytest.raises(ValueError, match="images are 64 px; the generator makes 32 px"):
        train_gan(gan, torch.zeros(4, 3, 64, 64, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), steps=1, batch_size=2,
                  lr_generator=1e-4, lr_discriminator=1e-4, seed=0)


def test_train_gan_keeps_both_networks_adam_moments_when_given_a_state():
    """With `optimizer_state`, a second round continues both Adams (their step counts go on and
    the weights differ from a fresh-optimizer round from the same start and seed); without it,
    every round starts fresh."""
    torch.manual_seed(0)
    images, labels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 2
    kwargs = dict(steps=3, batch_size=8, lr_generator=1e-3, lr_discriminator=1e-3, augment=False)
    gan = generative.ConditionalGAN(2, 32, z_dim=8, width=8)
    kept: dict = {}
    train_gan(gan, images, labels, seed=0, optimizer_state=kept, **kwargs)
    assert set(kept) == {"generator", "discriminator"}
    assert {float(v) for k, v in kept["generator"].items() if k.endswith(".step")} == {3.0}
    start = copy.deepcopy(gan.state_dict())  # (a trained spectral-norm module cannot be deep-copied itself)
    train_gan(gan, images, labels, seed=1, optimizer_state=kept, **kwargs)
    assert {float(v) for k, v in kept["discriminator"].items() if k.endswith(".step")} == {6.0}

    def fresh_round() -> generative.ConditionalGAN:
        other = generative.ConditionalGAN(2, 32, z_dim=8, width=8)
        other.load_state_dict(start)
        train_gan(other, images, labels, seed=1, **kwargs)
        return other

    fresh, again = fresh_round(), fresh_round()
    differs = [not torch.equal(a, b) for a, b in zip(gan.generator.parameters(), fresh.generator.parameters())]
    assert any(differs)
    assert all(torch.equal(a, b) for a, b in zip(again.generator.parameters(), fresh.generator.parameters()))
