"""A hospital's local data: what its node config names, partitioned, decoded, cached, audited.

`load_hospital_data(node_config, image_size, seed)` is the one entry point the ClientApp
(and the benchmarks) call. Images stay uint8 (N, 3, S, S) in memory; training code turns
them into normalised float batches.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedssl_core import names

from ..config import coerce
from ..errors import ConfigError, DatasetMalformed
from . import cache, ham10000, imagefolder, kaggle, synthetic
from .catalog import Catalog
from .decode import decode_all
from .partition import cap_by_group, partition_indices, split_train_test

log = logging.getLogger(__name__)

__all__ = ["HospitalData", "HospitalDataConfig", "load_hospital_data"]


@dataclass
class HospitalData:
    hospital: str
    class_names: list[str]
    train_images: torch.Tensor  # uint8 (N, 3, S, S)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    audit: dict[str, Any] = field(default_factory=dict)
    train_groups: list[str] = field(default_factory=list)  # lesion/patient of each training image


@dataclass
class HospitalDataConfig:
    """The data part of a hospital's node config (kebab-case keys in `--node-config`)."""

    hospital: str = "hospital"
    data_source: str = names.DATA_HAM10000  # ham10000 | imagefolder | synthetic
    data_path: str = "data/ham10000"
    partition_id: int = 0
    num_partitions: int = 1
    partition_by: str = names.PARTITION_LESION  # lesion | dirichlet | site | random (data.partition)
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    max_images: int = 0  # 0 = all
    label_map: str = ""  # imagefolder: "folder=class,...", "hospital:folder=class,...", JSON or a file (data.labels)
    class_names: str = ""  # imagefolder: comma list fixing the class order
    synthetic_images: int = 600
    cache_dir: str = ""  # default: $FEDSSL_HOME/cache or ~/.cache/fedssl
    download: bool = True  # ham10000: download from Kaggle when absent and credentials exist

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "HospitalDataConfig":
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        values: dict[str, Any] = {}
        for key, raw in node_config.items():
            if key not in known:
                continue  # other node-config keys (ssl-task, ...) belong to the ClientApp
            attr = known[key]
            values[attr] = coerce(cls.__dataclass_fields__[attr].default, raw, f"node config {key}")
        cfg = cls(**values)
        if cfg.data_source not in names.DATA_SOURCES:
            raise ConfigError(f"node config data-source={cfg.data_source!r}; expected one of {', '.join(names.DATA_SOURCES)}")
        if cfg.partition_by not in names.PARTITION_SCHEMES:
            raise ConfigError(f"node config partition-by={cfg.partition_by!r}; expected one of {', '.join(names.PARTITION_SCHEMES)}")
        return cfg


def _decoded(cat: Catalog, indices: list[int], image_size: int, cache_dir: Path | None, workers: int) -> tuple[np.ndarray, list[int], list[str]]:
    """Decoded images of `cat.paths[indices]`, from cache when possible; returns
    (images, the indices that decoded, skipped-file reasons)."""
    files = [str(cat.paths[i]) for i in indices]
    key = cache.cache_key({"v": 2, "size": image_size, "files": hashlib.sha256("\n".join(files).encode()).hexdigest()})
    hit = cache.load(cache_dir, key)
    if hit is not None:
        kept = hit["kept"].tolist()
        skipped = [str(s) for s in hit["skipped"].tolist()]
        log.info("loaded %d decoded images from cache %s", len(kept), key)
        return hit["images"], [indices[k] for k in kept], skipped
    images, kept, skipped = decode_all([cat.paths[i] for i in indices], image_size, workers)
    cache.store(cache_dir, key, {"images": images, "kept": kept.astype(np.int64), "skipped": np.array(skipped, dtype=str)})
    return images, [indices[k] for k in kept.tolist()], skipped


def _counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    return {c: int((labels == i).sum()) for i, c in enumerate(class_names)}


def load_hospital_data(node_config: Mapping[str, Any], image_size: int, seed: int = 0) -> HospitalData:
    """Load, partition, decode (cached), split by group, and audit a hospital's data."""
    cfg = HospitalDataConfig.from_node_config(node_config)
    if image_size < 16:
        raise ConfigError(f"image-size must be at least 16 pixels, got {image_size}")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache.default_cache_dir()
    workers = min(8, len(os.sched_getaffinity(0)) * 2) if hasattr(os, "sched_getaffinity") else 4
    partition = {
        "partition_id": cfg.partition_id,
        "num_partitions": cfg.num_partitions,
        "partition_by": cfg.partition_by,
        "seed": seed,
    }
    if cfg.partition_by == "dirichlet":
        partition["dirichlet_alpha"] = cfg.dirichlet_alpha

    skipped: list[str] = []
    if cfg.data_source == names.DATA_SYNTHETIC:
        n = cfg.max_images or cfg.synthetic_images
        imgs, labels, class_names = synthetic.make_images(n, image_size, seed=seed * 1000 + cfg.partition_id)
        groups = [str(i) for i in range(n)]
        train_idx, test_idx = split_train_test(list(range(n)), groups, labels.tolist(), cfg.test_fraction, seed)
        images_np, labels_np = imgs, labels
        data_path = ""
        label_map = {}
    else:
        path = Path(cfg.data_path).expanduser()
        if cfg.data_source == names.DATA_HAM10000:
            if not ham10000.is_present(path) and cfg.download and kaggle.credentials_available():
                kaggle.download_ham10000(path)
            cat = ham10000.load_catalog(path)
        else:
            cat = imagefolder.load_catalog(path, cfg.label_map, imagefolder.parse_class_names(cfg.class_names), cfg.hospital)
        class_names = cat.class_names
        skipped.extend(f"{image_id}: listed in metadata but no image file" for image_id in cat.missing)
        mine = partition_indices(
            cat.groups, cat.labels, partition_id=cfg.partition_id, num_partitions=cfg.num_partitions,
            by=cfg.partition_by, alpha=cfg.dirichlet_alpha, sites=cat.sites, seed=seed,
        )
        if cfg.partition_by == "site" and cat.sites is not None:
            partition["sites"] = sorted({cat.sites[i] for i in mine})
        if cfg.max_images:
            mine = cap_by_group(mine, cat.groups, cfg.max_images, seed)
        if not mine:
            raise DatasetMalformed(f"partition {cfg.partition_id} of {cfg.num_partitions} ({cfg.partition_by}) of {path} is empty")
        images_np, kept, bad = _decoded(cat, mine, image_size, cache_dir, workers)
        skipped.extend(bad)
        if not kept:
            raise DatasetMalformed(f"none of the {len(mine)} images of this hospital under {path} could be decoded; first: {bad[:1]}")
        labels_np = np.asarray([cat.labels[i] for i in kept], dtype=np.int64)
        groups = [cat.groups[i] for i in kept]
        local = list(range(len(kept)))
        train_idx, test_idx = split_train_test(local, groups, labels_np.tolist(), cfg.test_fraction, seed)
        data_path = str(path)
        label_map = cat.folder_classes

    data = HospitalData(
        hospital=cfg.hospital,
        class_names=list(class_names),
        train_images=torch.from_numpy(np.ascontiguousarray(images_np[train_idx])),
        train_labels=torch.from_numpy(labels_np[train_idx]),
        train_groups=[groups[i] for i in train_idx],
        test_images=torch.from_numpy(np.ascontiguousarray(images_np[test_idx])),
        test_labels=torch.from_numpy(labels_np[test_idx]),
    )
    data.audit = {
        "hospital": cfg.hospital,
        "data_source": cfg.data_source,
        "data_path": data_path,
        "synthetic_data": cfg.data_source == names.DATA_SYNTHETIC,
        "partition": partition,
        "image_size": image_size,
        "train_examples": len(train_idx),
        "test_examples": len(test_idx),
        "class_counts": {
            "train": _counts(labels_np[train_idx], class_names),
            "test": _counts(labels_np[test_idx], class_names),
        },
        "skipped_files": skipped,
    }
    if label_map:  # class-per-folder data: which folder became which class, recorded on the run
        data.audit["label_map"] = label_map
    log.info(
        "hospital %s: %s data from %s, %d train / %d test images; train per class %s; %d skipped file(s)%s",
        cfg.hospital, cfg.data_source, data_path or "(generated)", len(train_idx), len(test_idx),
        data.audit["class_counts"]["train"], len(skipped), (": " + "; ".join(skipped[:5])) if skipped else "",
    )
    if cfg.data_source == names.DATA_SYNTHETIC:
        log.warning("hospital %s trains on SYNTHETIC images (data-source = synthetic): results say nothing about real data", cfg.hospital)
    return data
