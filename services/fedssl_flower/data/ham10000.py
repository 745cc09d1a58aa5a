"""HAM10000 in the Kaggle layout (`kmader/skin-cancer-mnist-ham10000`).

    HAM10000_metadata.csv              lesion_id,image_id,dx,...
    HAM10000_images_part_1/*.jpg
    HAM10000_images_part_2/*.jpg
    HAM10000_metadata_dataverse.csv    optional: the same rows plus `dataset` (acquisition site)
"""

from __future__ import annotations

import csv
from pathlib import Path

from fedssl_core import names

from ..errors import DatasetMalformed, DatasetNotFound
from .catalog import Catalog

METADATA = "HAM10000_metadata.csv"
DATAVERSE_METADATA = "HAM10000_metadata_dataverse.csv"
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
SITE_COLUMN = "dataset"


def is_present(path: Path) -> bool:
    """True when `path` holds the metadata and at least one image folder."""
    return (path / METADATA).is_file() and any((path / d).is_dir() or (path / d.lower()).is_dir() for d in IMAGE_DIRS)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in required if c not in columns]
            if missing:
                raise DatasetMalformed(
                    f"{path} lacks column(s) {', '.join(missing)}; expected a CSV with header "
                    f"{','.join(required)},... (found: {','.join(columns) or 'no header'})"
                )
            return list(reader)
    except UnicodeDecodeError as exc:
        raise DatasetMalformed(f"{path} is not a UTF-8 CSV file: {exc}") from exc


def load_catalog(path: Path) -> Catalog:
    """The labelled image files of a HAM10000 copy at `path`."""
    path = Path(path)
    meta = path / METADATA
    if not meta.is_file():
        raise DatasetNotFound(
            f"no {METADATA} under {path}; expected the Kaggle HAM10000 layout ({METADATA}, "
            f"{IMAGE_DIRS[0]}/, {IMAGE_DIRS[1]}/): set data-path or provide Kaggle credentials"
        )
    rows = _read_csv(meta, REQUIRED_COLUMNS)
    if not rows:
        raise DatasetMalformed(f"{meta} has a header but no rows; expected one row per image")

    image_files: dict[str, Path] = {}
    found_dirs = []
    for d in IMAGE_DIRS:
        for candidate in (path / d, path / d.lower()):
            if candidate.is_dir():
                found_dirs.append(candidate)
                for f in candidate.iterdir():
                    if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                        image_files.setdefault(f.stem, f)
                break
    if not found_dirs:
        raise DatasetMalformed(f"{path} has {METADATA} but no image folder; expected {IMAGE_DIRS[0]}/ and {IMAGE_DIRS[1]}/")

    sites_by_image: dict[str, str] | None = None
    dataverse = path / DATAVERSE_METADATA
    if dataverse.is_file():
        sites_by_image = {r["image_id"]: r[SITE_COLUMN] for r in _read_csv(dataverse, ("image_id", SITE_COLUMN))}

    class_index = {c: i for i, c in enumerate(names.HAM10000_CLASSES)}
    paths, labels, groups, sites, missing = [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        dx = row["dx"].strip()
        if dx not in class_index:
            raise DatasetMalformed(
                f"{meta} line {line}: unknown diagnosis dx={dx!r}; expected one of {', '.join(names.HAM10000_CLASSES)}"
            )
        image_id = row["image_id"].strip()
        f = image_files.get(image_id)
        if f is None:
            missing.append(image_id)
            continue
        paths.append(f)
        labels.append(class_index[dx])
        groups.append(row["lesion_id"].strip() or image_id)
        if sites_by_image is not None:
            sites.append(sites_by_image.get(image_id, "unknown"))
    if not paths:
        raise DatasetMalformed(f"none of the {len(rows)} images listed in {meta} exist under {', '.join(map(str, found_dirs))}")
    return Catalog(list(names.HAM10000_CLASSES), paths, labels, groups, sites if sites_by_image is not None else None, missing)
