"""A class-per-folder image tree (chest X-ray, brain MRI layouts), with a label map.

Hospitals name the same class differently (`pituitary tumor` vs `pituitary`); node config
`label-map` maps folder names to the federation's class names and `class-names` fixes the
class order every hospital must share.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, DatasetMalformed, DatasetNotFound
from .catalog import Catalog

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_label_map(value: str | dict | None) -> dict[str, str]:
    """`"pituitary tumor=pituitary,glioma tumor=glioma"` or a JSON object → {folder: class}."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    text = str(value).strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"label-map is not valid JSON: {exc}; expected {{\"folder\": \"class\"}}") from exc
        return {str(k): str(v) for k, v in parsed.items()}
    mapping = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        folder, sep, cls = item.partition("=")
        if not sep or not folder.strip() or not cls.strip():
            raise ConfigError(f"label-map entry {item!r} is not 'folder=class'; expected e.g. 'pituitary tumor=pituitary'")
        mapping[folder.strip()] = cls.strip()
    return mapping


def parse_class_names(value: str | list | None) -> list[str] | None:
    if not value:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(c).strip() for c in items if str(c).strip()]


def load_catalog(path: Path, label_map: dict[str, str] | None = None, class_names: list[str] | None = None) -> Catalog:
    path = Path(path)
    if not path.is_dir():
        raise DatasetNotFound(f"no image folder at {path}; expected one sub-folder per class holding JPEG/PNG images")
    label_map = label_map or {}
    folders = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DatasetMalformed(f"{path} has no class sub-folders; expected e.g. {path}/<class>/<image>.jpg")
    mapped = {d: label_map.get(d.name, d.name) for d in folders}
    classes = class_names or sorted(set(mapped.values()))
    unknown = sorted({c for c in mapped.values() if c not in classes})
    if unknown:
        raise DatasetMalformed(
            f"{path}: folder class(es) {', '.join(unknown)} are not in class-names ({', '.join(classes)}); "
            "add them to label-map (folder=class) or class-names"
        )
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for d in folders:
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                labels.append(index[mapped[d]])
    if not paths:
        raise DatasetMalformed(f"{path} has class folders ({', '.join(d.name for d in folders)}) but no JPEG/PNG images")
    # No patient ids in a plain folder tree: each image is its own group.
    groups = [str(p.relative_to(path)) for p in paths]
    return Catalog(classes, paths, labels, groups)
