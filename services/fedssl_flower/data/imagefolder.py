"""A class-per-folder image tree (chest X-ray, brain MRI layouts), with a label map.

Hospitals name the same class differently (`pituitary tumor` vs `pituitary`); node config
`label-map` maps folder names to the federation's class names (see `labels`) and
`class-names` fixes the class order every hospital must share.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DatasetMalformed, DatasetNotFound
from .catalog import Catalog
from .labels import LabelMap, parse_class_names, parse_label_map, reconcile

__all__ = ["IMAGE_SUFFIXES", "class_folders", "count_images", "load_catalog", "parse_class_names", "parse_label_map"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def image_files(folder: Path) -> list[Path]:
    """The images under `folder`, at any depth, in a stable order."""
    return sorted(f for f in folder.rglob("*") if is_image(f))


def count_images(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if is_image(f))


def class_folders(path: Path) -> list[Path]:
    """The visible sub-folders of `path`, by name."""
    return sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def load_catalog(path: Path, label_map: LabelMap | dict | str | None = None, class_names: list[str] | None = None,
                 hospital: str = "") -> Catalog:
    """The images of one hospital's class folders, labelled through `label_map` onto `class_names`.

    Folders with no images are left out (their class is then missing here, which is fine when
    `class_names` lists it). The folder → class mapping used is `Catalog.folder_classes`.
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetNotFound(f"no image folder at {path}; expected one sub-folder per class holding JPEG/PNG images")
    folders = class_folders(path)
    if not folders:
        raise DatasetMalformed(f"{path} has no class sub-folders; expected e.g. {path}/<class>/<image>.jpg")
    files = {d.name: image_files(d) for d in folders}
    if not any(files.values()):
        raise DatasetMalformed(f"{path} has class folders ({', '.join(d.name for d in folders)}) but no JPEG/PNG images")
    name = hospital or path.name
    rec = reconcile({name: [f for f in files if files[f]]}, parse_label_map(label_map), class_names,
                    check_label_map=False, federation=False)
    mapping = rec.mapping[name]
    index = {c: i for i, c in enumerate(rec.class_names)}
    paths, labels = [], []
    for folder, fs in files.items():
        for f in fs:
            paths.append(f)
            labels.append(index[mapping[folder]])
    # No patient ids in a plain folder tree: each image is its own group.
    groups = [str(p.relative_to(path)) for p in paths]
    return Catalog(rec.class_names, paths, labels, groups, folder_classes=dict(mapping))
