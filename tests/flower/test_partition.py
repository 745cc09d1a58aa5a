import csv
from collections import Counter

import pytest

from fedssl_flower.data.partition import cap_by_group, partition_indices, split_train_test
from fedssl_flower.errors import ConfigError


@pytest.fixture(scope="module")
def meta(ham10000_dir):
    rows = list(csv.DictReader((ham10000_dir / "HAM10000_metadata_dataverse.csv").open()))
    classes = sorted({r["dx"] for r in rows})
    return ([r["lesion_id"] for r in rows], [classes.index(r["dx"]) for r in rows], [r["dataset"] for r in rows])


@pytest.mark.parametrize("by", ["lesion", "dirichlet", "site"])
def test_partitions_cover_the_data_and_no_lesion_crosses_hospitals(meta, by):
    groups, labels, sites = meta
    parts = [partition_indices(groups, labels, partition_id=i, num_partitions=4, by=by, alpha=0.3, sites=sites, seed=1)
             for i in range(4)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(groups)))  # every image exactly once
    owner = {}
    for h, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(groups[i], h) == h, f"lesion {groups[i]} in two hospitals"


def test_site_partition_is_one_acquisition_site_per_hospital(meta):
    groups, labels, sites = meta
    seen = []
    for i in range(4):
        p = partition_indices(groups, labels, partition_id=i, num_partitions=4, by="site", sites=sites)
        site, n = Counter(sites[j] for j in p).most_common(1)[0]
        # 9 lesions (26 images) were imaged at two sites; they stay whole, at their main site.
        assert len(p) - n <= 26
        seen.append(site)
    assert sorted(seen) == sorted(set(sites))


def test_dirichlet_skews_labels_more_than_iid(meta):
    groups, labels, _ = meta

    def spread(by):
        shares = []
        for i in range(4):
            c = Counter(labels[j] for j in partition_indices(groups, labels, partition_id=i, num_partitions=4, by=by, alpha=0.1, seed=0))
            shares.append(c[5] / sum(c.values()))  # share of the majority class
        return max(shares) - min(shares)

    assert spread("dirichlet") > 3 * spread("lesion")


def test_train_test_split_is_by_lesion_and_stratified(meta):
    groups, labels, _ = meta
    idx = partition_indices(groups, labels, partition_id=0, num_partitions=2, seed=0)
    train, test = split_train_test(idx, groups, labels, 0.2, seed=0)
    assert sorted(train + test) == sorted(idx)
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert 0.12 < len(test) / len(idx) < 0.28
    assert {labels[i] for i in test} == {labels[i] for i in idx}  # every class is represented


def test_cap_keeps_whole_lesions(meta):
    groups, labels, _ = meta
    idx = partition_indices(groups, labels, partition_id=0, num_partitions=1)
    capped = cap_by_group(idx, groups, 300, seed=0)
    assert len(capped) == 300
    kept = {groups[i] for i in capped}
    assert all(i in set(capped) for i in idx if groups[i] in kept)


def test_bad_partition_settings_are_named():
    with pytest.raises(ConfigError, match=r"partition-id must be in \[0, 1\], got 2"):
        partition_indices(["a"], [0], partition_id=2, num_partitions=2)
    with pytest.raises(ConfigError, match="needs an acquisition-site column"):
        partition_indices(["a"], [0], partition_id=0, num_partitions=1, by="site")
    with pytest.raises(ConfigError, match="unknown partition-by 'stripes'; expected one of lesion, dirichlet, site, random"):
        partition_indices(["a"], [0], partition_id=0, num_partitions=1, by="stripes")


def test_random_deals_single_images_like_lesion_deals_lesions():
    # A class-per-folder tree has no lesion ids: each image is its own group, dealt at random.
    groups = [f"img{i}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    parts = [partition_indices(groups, labels, partition_id=p, num_partitions=3, by="random", seed=4) for p in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(30)) and all(len(p) == 10 for p in parts)
    assert parts == [partition_indices(groups, labels, partition_id=p, num_partitions=3, by="lesion", seed=4) for p in range(3)]
