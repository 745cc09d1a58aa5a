import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedssl_flower.data import cache, load_hospital_data
from fedssl_flower.errors import ConfigError, DatasetMalformed, DatasetNotFound


@pytest.fixture
def small_ham(tmp_path, ham10000_dir) -> Path:
    """A 120-image HAM10000 copy in the Kaggle layout (real images, real metadata rows)."""
    rows = list(csv.DictReader((ham10000_dir / "HAM10000_metadata.csv").open()))[:120]
    dst = tmp_path / "ham"
    (dst / "HAM10000_images_part_1").mkdir(parents=True)
    for r in rows:
        for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
            src = ham10000_dir / part / f"{r['image_id']}.jpg"
            if src.exists():
                shutil.copy(src, dst / "HAM10000_images_part_1" / src.name)
    with (dst / "HAM10000_metadata.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dst


def cfg(path, tmp_path, **kw):
    return {"hospital": "h", "data-path": str(path), "cache-dir": str(tmp_path / "cache"), **kw}


def test_loads_real_images_split_by_lesion_with_audit(ham10000_dir, tmp_path):
    data = load_hospital_data(cfg(ham10000_dir, tmp_path, **{"max-images": 250, "partition-id": 1, "num-partitions": 3}), 32)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape[1:] == (3, 32, 32)
    assert len(data.train_images) + len(data.test_images) == 250
    assert data.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    audit = data.audit
    assert audit["train_examples"] == len(data.train_labels) and audit["test_examples"] == len(data.test_labels)
    assert sum(audit["class_counts"]["train"].values()) == len(data.train_labels)
    assert audit["class_counts"]["train"]["nv"] == int((data.train_labels == 5).sum())
    assert audit["synthetic_data"] is False and audit["skipped_files"] == []


def test_second_load_comes_from_the_cache_without_decoding(small_ham, tmp_path):
    first = load_hospital_data(cfg(small_ham, tmp_path), 32)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    cache.clear_memory()
    for f in (small_ham / "HAM10000_images_part_1").glob("*.jpg"):  # decoding now would fail
        f.write_bytes(b"")
    second = load_hospital_data(cfg(small_ham, tmp_path), 32)
    assert torch.equal(first.train_images, second.train_images)
    assert second.audit["skipped_files"] == []


def test_corrupt_and_missing_images_are_skipped_and_listed(small_ham, tmp_path, caplog):
    images = sorted((small_ham / "HAM10000_images_part_1").glob("*.jpg"))
    images[0].write_bytes(b"not a jpeg")
    images[1].unlink()
    data = load_hospital_data(cfg(small_ham, tmp_path), 32)
    assert len(data.train_images) + len(data.test_images) == 118
    skipped = data.audit["skipped_files"]
    assert any(images[0].name in s for s in skipped)
    assert any(images[1].stem in s and "no image file" in s for s in skipped)
    assert "skipping unreadable image" in caplog.text


def test_missing_dataset_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(DatasetNotFound) as err:
        load_hospital_data(cfg(tmp_path / "nowhere", tmp_path), 32)
    assert f"no HAM10000_metadata.csv under {tmp_path / 'nowhere'}" in str(err.value)
    assert "set data-path or provide Kaggle credentials" in str(err.value)


def test_malformed_metadata_names_the_columns(small_ham, tmp_path):
    (small_ham / "HAM10000_metadata.csv").write_text("image,label\nx,y\n")
    with pytest.raises(DatasetMalformed, match="lacks column\\(s\\) lesion_id, image_id, dx"):
        load_hospital_data(cfg(small_ham, tmp_path), 32)


def test_imagefolder_with_label_map_reconciles_folder_names(tmp_path):
    root = tmp_path / "mri"
    rng = np.random.default_rng(0)
    for folder, n in (("pituitary tumor", 6), ("glioma", 6), ("no_tumor", 6)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    data = load_hospital_data({"hospital": "h", "data-source": "imagefolder", "data-path": str(root),
                               "label-map": "pituitary tumor=pituitary,no_tumor=healthy",
                               "class-names": "glioma,healthy,pituitary", "cache-dir": str(tmp_path / "c")}, 32)
    assert data.class_names == ["glioma", "healthy", "pituitary"]
    assert sorted(data.audit["class_counts"]["train"]) == ["glioma", "healthy", "pituitary"]
    assert data.audit["label_map"] == {"pituitary tumor": "pituitary", "no_tumor": "healthy", "glioma": "glioma"}
    with pytest.raises(DatasetMalformed, match="folder 'no_tumor' matches no known class \\(known: glioma, pituitary tumor\\)"):
        load_hospital_data({"data-source": "imagefolder", "data-path": str(root), "class-names": "glioma,pituitary tumor",
                            "cache-dir": str(tmp_path / "c")}, 32)


def test_synthetic_only_when_asked_and_marked(tmp_path):
    data = load_hospital_data({"data-source": "synthetic", "synthetic-images": 80}, 32)
    assert data.audit["synthetic_data"] is True and len(data.train_images) + len(data.test_images) == 80
    with pytest.raises(ConfigError, match="data-source='fake'"):
        load_hospital_data({"data-source": "fake"}, 32)
