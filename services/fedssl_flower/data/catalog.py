"""A dataset as a list of labelled image files, before anything is decoded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Catalog:
    """Image files with labels and groups (lesion ids) and, when known, acquisition sites."""

    class_names: list[str]
    paths: list[Path]
    labels: list[int]
    groups: list[str]
    sites: list[str] | None = None
    missing: list[str] = field(default_factory=list)  # rows whose image file does not exist
    folder_classes: dict[str, str] = field(default_factory=dict)  # class-per-folder trees: folder -> class

    def __post_init__(self) -> None:
        n = len(self.paths)
        if not (len(self.labels) == len(self.groups) == n) or (self.sites is not None and len(self.sites) != n):
            raise ValueError("catalog columns have different lengths")
