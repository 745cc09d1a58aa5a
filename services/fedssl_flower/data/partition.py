"""Split one dataset into simulated hospitals and each hospital into train/test.

Everything works on *groups* (HAM10000 lesions; one image per group elsewhere), so a lesion
never spans two hospitals nor train and test. All functions are pure and deterministic
given their seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from fedssl_core import names

from ..errors import ConfigError


def _group_members(groups: Sequence[str]) -> dict[str, list[int]]:
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return members


def partition_indices(
    groups: Sequence[str],
    labels: Sequence[int],
    *,
    partition_id: int,
    num_partitions: int,
    by: str = names.PARTITION_LESION,
    alpha: float = 0.5,
    sites: Sequence[str] | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices of the samples that belong to hospital `partition_id` of `num_partitions`.

    - ``lesion``: groups shuffled and dealt round-robin (IID).
    - ``random``: the same dealing, named for data whose groups are single images (folder trees).
    - ``dirichlet``: per class, groups split by proportions drawn from Dir(alpha): label skew,
      stronger as alpha shrinks.
    - ``site``: sites sorted by name; site j goes to hospital j mod num_partitions, so with as
      many hospitals as sites each hospital is one acquisition site.
    """
    if num_partitions < 1:
        raise ConfigError(f"num-partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be in [0, {num_partitions - 1}], got {partition_id}")
    members = _group_members(groups)
    order = sorted(members)
    rng = np.random.default_rng(seed)

    if by in (names.PARTITION_LESION, names.PARTITION_RANDOM):
        shuffled = [order[i] for i in rng.permutation(len(order))]
        chosen = shuffled[partition_id::num_partitions]
    elif by == names.PARTITION_DIRICHLET:
        if alpha <= 0:
            raise ConfigError(f"dirichlet-alpha must be > 0, got {alpha}")
        by_class: dict[int, list[str]] = defaultdict(list)
        for g in order:
            by_class[int(labels[members[g][0]])].append(g)
        chosen = []
        for cls in sorted(by_class):
            gs = by_class[cls]
            gs = [gs[i] for i in rng.permutation(len(gs))]
            proportions = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = np.floor(np.cumsum(proportions) * len(gs)).astype(int)
            cuts[-1] = len(gs)
            start = 0 if partition_id == 0 else cuts[partition_id - 1]
            chosen.extend(gs[start : cuts[partition_id]])
    elif by == names.PARTITION_SITE:
        if sites is None:
            raise ConfigError(
                "partition-by = 'site' needs an acquisition-site column; HAM10000 has it in "
                "HAM10000_metadata_dataverse.csv (column 'dataset') beside HAM10000_metadata.csv"
            )
        site_names = sorted(set(sites))
        if num_partitions > len(site_names):
            raise ConfigError(
                f"partition-by = 'site' with num-partitions = {num_partitions}, but the data has only "
                f"{len(site_names)} sites ({', '.join(site_names)}); use at most {len(site_names)} hospitals"
            )
        mine = {s for j, s in enumerate(site_names) if j % num_partitions == partition_id}
        # A few HAM10000 lesions were imaged at two sites: a lesion goes, whole, to the site
        # holding most of its images (ties: the first site by name).
        def home(g: str) -> str:
            counts: dict[str, int] = defaultdict(int)
            for i in members[g]:
                counts[sites[i]] += 1
            return min(counts, key=lambda s: (-counts[s], s))

        chosen = [g for g in order if home(g) in mine]
    else:
        raise ConfigError(f"unknown partition-by {by!r}; expected one of {', '.join(names.PARTITION_SCHEMES)}")
    return sorted(i for g in chosen for i in members[g])


def cap_by_group(indices: Sequence[int], groups: Sequence[str], max_images: int, seed: int = 0) -> list[int]:
    """At most `max_images` of `indices`, taking whole groups in a seeded random order."""
    if max_images <= 0 or len(indices) <= max_images:
        return list(indices)
    members = _group_members([groups[i] for i in indices])
    order = sorted(members)
    rng = np.random.default_rng(seed + 1)
    kept: list[int] = []
    for k in rng.permutation(len(order)):
        pos = members[order[k]]
        if len(kept) + len(pos) > max_images:
            continue
        kept.extend(indices[p] for p in pos)
        if len(kept) == max_images:
            break
    return sorted(kept)


def split_train_test(
    indices: Sequence[int], groups: Sequence[str], labels: Sequence[int], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Split `indices` by group, stratified by class: `test_fraction` of each class's groups
    (rounded, at least one when the class has two or more groups) go to test."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test-fraction must be in (0, 1), got {test_fraction}")
    members = _group_members([groups[i] for i in indices])
    by_class: dict[int, list[str]] = defaultdict(list)
    for g in sorted(members):
        by_class[int(labels[indices[members[g][0]]])].append(g)
    rng = np.random.default_rng(seed + 2)
    test_groups: set[str] = set()
    for cls in sorted(by_class):
        gs = by_class[cls]
        if len(gs) < 2:
            continue
        n_test = max(1, min(len(gs) - 1, math.floor(test_fraction * len(gs) + 0.5)))
        test_groups.update(gs[i] for i in rng.permutation(len(gs))[:n_test])
    train = sorted(indices[p] for g, pos in members.items() if g not in test_groups for p in pos)
    test = sorted(indices[p] for g, pos in members.items() if g in test_groups for p in pos)
    return train, test
