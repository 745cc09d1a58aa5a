import math

import pytest
import torch

from fedssl_flower.ssl.losses import NTXentLoss


def reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's NT-Xent written out with loops (Chen et al. 2020, eq. 1)."""
    z = torch.cat([z1, z2]).tolist()
    n2 = len(z)
    norm = [math.sqrt(sum(x * x for x in v)) for v in z]
    sim = [[sum(a * b for a, b in zip(z[i], z[j])) / (norm[i] * norm[j]) for j in range(n2)] for i in range(n2)]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = i + n if i < n else i - n
        denom = sum(math.exp(sim[i][k] / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim[i][pos] / t) / denom)
    return total / n2


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_ntxent_matches_hand_written_reference(temperature):
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    got = NTXentLoss(temperature)(z1, z2).item()
    assert got == pytest.approx(reference_ntxent(z1, z2, temperature), rel=1e-5)


def test_ntxent_is_low_for_aligned_pairs_and_high_for_swapped():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    loss = NTXentLoss(0.1)
    assert loss(z, z + 0.01 * torch.randn(8, 16, generator=g)) < loss(z, z.roll(1, dims=0))


def test_ntxent_rejects_mismatched_batches():
    with pytest.raises(ValueError, match=r"two \(N, D\) batches of the same shape"):
        NTXentLoss()(torch.zeros(4, 8), torch.zeros(3, 8))
