"""A hospital's class folders holding images of every kind (issue 15, item 3): each readable
kind loads, an unreadable file is skipped, counted and named in the audit, never fatal."""

import logging

from fedssl_flower.data import load_hospital_data
from tests.support.image_kinds import write_tree


def test_a_tree_of_every_kind_loads_and_the_bad_files_are_skipped_and_named(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedssl_flower.data")
    files = write_tree(tmp_path / "data")
    good = [p for p, k in files.items() if k.good]
    bad = {p: k for p, k in files.items() if not k.good}
    data = load_hospital_data({"data-source": "imagefolder", "data-path": str(tmp_path / "data"), "partition-by": "random",
                               "test-fraction": 0.25, "cache-dir": str(tmp_path / "cache")}, 32)
    assert len(data.train_labels) + len(data.test_labels) == len(good)
    assert data.train_images.shape[1:] == (3, 32, 32) and data.train_images.dtype.is_floating_point is False
    skipped = data.audit["skipped_files"]
    assert len(skipped) == len(bad) == 2
    for path, kind in bad.items():
        assert any(s.startswith(f"{path}: ") and kind.problem in s for s in skipped), (kind.name, skipped)
    assert f"{len(bad)} skipped file(s)" in caplog.text
    # From the cache the second time: the same images, the same skipped files.
    again = load_hospital_data({"data-source": "imagefolder", "data-path": str(tmp_path / "data"), "partition-by": "random",
                                "test-fraction": 0.25, "cache-dir": str(tmp_path / "cache")}, 32)
    assert again.audit["skipped_files"] == skipped and bool((again.train_images == data.train_images).all())
