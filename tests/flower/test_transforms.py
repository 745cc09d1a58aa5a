import torch

from fedssl_flower.ssl.transforms import SimCLRTransform, normalize, rotate_batch


def batch(n=6, s=32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)


def test_simclr_views_shape_dtype_and_difference():
    x = batch()
    v1, v2 = SimCLRTransform()(x, torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == (6, 3, 32, 32)
    assert v1.dtype == torch.float32
    assert not torch.allclose(v1, v2)  # two independent augmentations
    assert torch.isfinite(v1).all()


def test_simclr_is_deterministic_given_the_seed():
    x = batch()
    a = SimCLRTransform()(x, torch.Generator().manual_seed(7))
    b = SimCLRTransform()(x, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_identity_augmentation_equals_plain_normalisation():
    x = batch()
    t = SimCLRTransform(crop_scale=(1.0, 1.0), jitter_p=0.0)
    # With full-size crops and no jitter, a view is x flipped/rotated: the pixel multiset is kept.
    v = t.view(x, torch.Generator().manual_seed(0))
    ref = normalize(x)
    assert torch.allclose(v.sum(dim=(1, 2, 3)), ref.sum(dim=(1, 2, 3)), atol=1e-2 * 32 * 32)


def test_rotate_batch_applies_exact_quarter_turns():
    x = batch(n=16)
    rotated, k = rotate_batch(x, torch.Generator().manual_seed(2))
    assert set(k.tolist()) <= {0, 1, 2, 3} and len(set(k.tolist())) > 1
    for img, r, out in zip(x, k.tolist(), rotated):
        assert torch.equal(torch.rot90(img, r, dims=(-2, -1)), out)
