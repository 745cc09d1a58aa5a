"""Which kind of dataset a folder holds, and what each hospital of a local federation gets.

Three layouts are recognised:

- ``ham10000``: the Kaggle HAM10000 layout (`HAM10000_metadata.csv`), split into hospitals by
  lesion, Dirichlet label skew or acquisition site;
- ``hospital-folders``: one folder per hospital, each holding one folder per class; one
  hospital per folder, named after it, class folders reconciled by `labels.reconcile`;
- ``class-folders``: one class-per-folder tree, split into hospitals at random or by
  Dirichlet label skew.

`plan(...)` says which layout it found, the class list, and per hospital its node config (data
part) and images per class. `deploy-local.sh` runs the command line to print that before
training and to start one SuperNode per planned hospital::

    python -m fedssl_flower.data.layout PATH [--hospitals N] [--partition random|dirichlet|...]
        [--label-map MAP] [--class-names a,b,c] [--max-images N] [--json] [--node-configs FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedssl_core import names

from ..errors import ConfigError, DatasetMalformed, DatasetNotFound, FedSSLError
from . import ham10000, imagefolder
from .catalog import Catalog
from .labels import LabelMap, parse_class_names, parse_label_map, reconcile
from .partition import cap_by_group, partition_indices

LAYOUT_HAM10000 = "ham10000"
LAYOUT_HOSPITAL_FOLDERS = "hospital-folders"
LAYOUT_CLASS_FOLDERS = "class-folders"
LAYOUTS = {
    LAYOUT_HAM10000: "the Kaggle HAM10000 layout (HAM10000_metadata.csv, HAM10000_images_part_1/2)",
    LAYOUT_HOSPITAL_FOLDERS: "one folder per hospital, one folder per class inside it",
    LAYOUT_CLASS_FOLDERS: "one class-per-folder tree, split into hospitals",
}
# Partition schemes each layout can use (`--partition`); the first is the default.
PARTITIONS = {
    LAYOUT_HAM10000: (names.PARTITION_SITE, names.PARTITION_LESION, names.PARTITION_DIRICHLET),  # site only when the data has sites
    LAYOUT_CLASS_FOLDERS: (names.PARTITION_RANDOM, names.PARTITION_DIRICHLET),
}
EXPECTED = ("expected one of: " + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
            + " (e.g. PATH/<hospital>/<class>/<image>.jpg or PATH/<class>/<image>.jpg)")


@dataclass
class HospitalPlan:
    """One hospital: its name, the data part of its node config, and the images it holds."""

    name: str
    node_config: dict[str, Any]
    images: dict[str, int]  # images per class it holds
    used: dict[str, int]  # images per class it trains and tests on (after max-images)
    folder: str = ""  # hospital-folders: the folder it is named after

    def node_config_text(self) -> str:
        """`key=value ...` for `flower-supernode --node-config` (Flower's own quoting rules)."""
        return " ".join(f"{k}={_toml_value(v)}" for k, v in self.node_config.items())


@dataclass
class Layout:
    kind: str
    path: str
    class_names: list[str]
    hospitals: list[HospitalPlan]
    partition: str = ""  # how one dataset was split into hospitals ("" for hospital folders)
    max_images: int = 0
    label_map: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # hospital -> folder -> {class, how}
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """What a user reads before training: the layout, the classes, how folders were
        matched to them, and images per class at each hospital."""
        how = {LAYOUT_HOSPITAL_FOLDERS: "one hospital per folder"}.get(
            self.kind, f"{len(self.hospitals)} hospital(s) by {self.partition}")
        lines = [f"data layout: {self.kind} at {self.path}: {LAYOUTS[self.kind]}; {how}",
                 f"classes: {', '.join(self.class_names)}"]
        renamed = [(h, f, m) for h, folders in self.label_map.items() for f, m in folders.items() if f != m["class"]]
        if renamed:
            lines.append("class folders mapped (recorded on the run as each hospital's label_map):")
            lines += [f"  {h}: {f!r} -> {m['class']!r} ({m['how']})" for h, f, m in renamed]
        lines += [f"note: {n}" for n in self.notes]
        width = max(len("hospital"), *(len(h.name) for h in self.hospitals))
        cols = [max(len(c), 6) for c in self.class_names]
        lines.append("  ".join([f"{'hospital':<{width}}", f"{'images':>7}", *(f"{c:>{w}}" for c, w in zip(self.class_names, cols))]))
        for h in self.hospitals:
            lines.append("  ".join([f"{h.name:<{width}}", f"{sum(h.images.values()):>7}",
                                    *(f"{h.images.get(c, 0):>{w}}" for c, w in zip(self.class_names, cols))]))
        if self.max_images and any(sum(h.used.values()) < sum(h.images.values()) for h in self.hospitals):
            lines.append(f"each hospital uses at most {self.max_images} of its images (--max-images): "
                         + ", ".join(f"{h.name} {sum(h.used.values())}" for h in self.hospitals))
        return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    # Flower splits --node-config on quotes with no escapes: '...' (literal) unless the value holds a '.
    if "'" not in s and "\n" not in s:
        return f"'{s}'"
    if '"' not in s and "\\" not in s and "\n" not in s:
        return f'"{s}"'
    raise ConfigError(f"node config value {s!r} holds both quote characters; rename the folder or class")


def _json_literal(mapping: dict[str, str]) -> str:
    """A JSON object with every ' written as \\u0027, so it fits a '...' node-config value."""
    return json.dumps(mapping, ensure_ascii=False, sort_keys=True).replace("'", "\\u0027")


def detect(path: Path) -> str:
    """The layout of `path` (LAYOUT_*), or an error naming what was found and what was expected."""
    path = Path(path)
    if not path.exists():
        raise DatasetNotFound(f"--data {path}: no such folder; {EXPECTED}")
    if not path.is_dir():
        raise DatasetMalformed(f"--data {path} is a file, not a folder; {EXPECTED}")
    if (path / ham10000.METADATA).is_file():
        return LAYOUT_HAM10000
    folders = imagefolder.class_folders(path)
    if not folders:
        raise DatasetMalformed(f"--data {path} holds no folders and no {ham10000.METADATA}; {EXPECTED}")
    kinds: dict[str, list[str]] = {"class": [], "hospital": [], "empty": []}
    for d in folders:
        if any(imagefolder.is_image(f) for f in d.iterdir()):
            kinds["class"].append(d.name)  # images right inside: a class folder
        elif any(imagefolder.count_images(s) for s in imagefolder.class_folders(d)):
            kinds["hospital"].append(d.name)  # folders with images inside: a hospital
        else:
            kinds["empty"].append(d.name)
    if kinds["empty"]:
        raise DatasetMalformed(f"--data {path}: folder(s) {', '.join(kinds['empty'])} hold no JPEG/PNG images; "
                               f"remove them or add images; {EXPECTED}")
    if kinds["class"] and kinds["hospital"]:
        raise DatasetMalformed(
            f"--data {path} mixes class folders holding images ({', '.join(kinds['class'])}) with folders holding "
            f"class folders ({', '.join(kinds['hospital'])}); {EXPECTED}")
    return LAYOUT_HOSPITAL_FOLDERS if kinds["hospital"] else LAYOUT_CLASS_FOLDERS


def hospital_name(folder: str) -> str:
    """A SuperNode name from a folder name: letters, digits, '.', '_' and '-' kept, the rest '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", folder).strip("-.") or "hospital"


def _counts(cat: Catalog, indices: list[int]) -> dict[str, int]:
    c = Counter(cat.labels[i] for i in indices)
    return {name: c.get(i, 0) for i, name in enumerate(cat.class_names)}


def _split(kind: str, cat: Catalog, path: Path, hospitals: int, partition: str, alpha: float, max_images: int, seed: int,
           extra: dict[str, Any]) -> list[HospitalPlan]:
    plans = []
    for i in range(hospitals):
        mine = partition_indices(cat.groups, cat.labels, partition_id=i, num_partitions=hospitals, by=partition,
                                 alpha=alpha, sites=cat.sites, seed=seed)
        if not mine:
            raise DatasetMalformed(f"hospital-{i + 1} of {hospitals} gets no images of {path} by {partition}; "
                                   "use fewer hospitals" + (" or a larger --dirichlet-alpha" if partition == names.PARTITION_DIRICHLET else ""))
        node = {"data-source": names.DATA_HAM10000 if kind == LAYOUT_HAM10000 else names.DATA_IMAGEFOLDER,
                "data-path": str(path), "partition-id": i, "num-partitions": hospitals, "partition-by": partition}
        if partition == names.PARTITION_DIRICHLET:
            node["dirichlet-alpha"] = float(alpha)
        node.update(extra)
        plans.append(HospitalPlan(f"hospital-{i + 1}", node, _counts(cat, mine),
                                  _counts(cat, cap_by_group(mine, cat.groups, max_images, seed))))
    return plans


def plan(path: Path | str, *, hospitals: int | None = None, default_hospitals: int = 3, partition: str | None = None,
         dirichlet_alpha: float = 0.5, label_map: str | LabelMap | None = None, class_names: str | list | None = None,
         max_images: int = 0, seed: int = 0) -> Layout:
    """Detect the layout of `path` and plan its hospitals. `hospitals` is what the user asked
    for (None: `default_hospitals`, or one per hospital folder)."""
    path = Path(path).expanduser().resolve()
    kind = detect(path)
    if hospitals is not None and hospitals < 1:
        raise ConfigError(f"--hospitals must be >= 1, got {hospitals}")
    if max_images < 0:
        raise ConfigError(f"--max-images must be >= 0 (0 = all), got {max_images}")
    lmap = parse_label_map(label_map)
    classes = parse_class_names(class_names)
    for c in classes or []:
        if "," in c:
            raise ConfigError(f"class name {c!r} holds a comma; class-names is a comma list")

    if kind == LAYOUT_HOSPITAL_FOLDERS:
        if partition:
            raise ConfigError(f"--partition {partition}: {path} holds one folder per hospital, so the hospitals are the "
                              "folders; --partition splits a single class-per-folder tree or HAM10000")
        folders = [d for d in imagefolder.class_folders(path) if imagefolder.count_images(d)]
        if hospitals is not None and hospitals != len(folders):
            raise ConfigError(f"--hospitals {hospitals}: {path} holds {len(folders)} hospital folders "
                              f"({', '.join(d.name for d in folders)}), one SuperNode each; drop --hospitals or give {len(folders)}")
        by_name: dict[str, str] = {}
        for d in folders:
            name = hospital_name(d.name)
            if name in by_name:
                raise DatasetMalformed(f"hospital folders {by_name[name]!r} and {d.name!r} both give the SuperNode name "
                                       f"{name!r}; rename one")
            by_name[name] = d.name
        # The label map may name hospitals by folder or by SuperNode name.
        lmap = LabelMap(lmap.common, {hospital_name(h) if h in by_name.values() else h: m for h, m in lmap.per_hospital.items()})
        notes, class_dirs = [], {}
        for name, folder in by_name.items():
            class_dirs[name] = {}
            for d in imagefolder.class_folders(path / folder):
                if imagefolder.count_images(d):
                    class_dirs[name][d.name] = d
                else:
                    notes.append(f"{name}: class folder {d.name!r} holds no images; left out")
        rec = reconcile({h: sorted(ds) for h, ds in class_dirs.items()}, lmap, classes)
        notes += [f"{h}: no folder for class(es) {', '.join(m)}; it trains on the others" for h, m in rec.missing.items() if m]
        plans = []
        for name, folder in by_name.items():
            mapping = rec.mapping[name]
            cat = imagefolder.load_catalog(path / folder, mapping, rec.class_names, name)
            everything = list(range(len(cat.paths)))
            node = {"data-source": names.DATA_IMAGEFOLDER, "data-path": str(path / folder), "partition-id": 0,
                    "num-partitions": 1, "partition-by": names.PARTITION_RANDOM,
                    "label-map": _json_literal(mapping), "class-names": ",".join(rec.class_names)}
            plans.append(HospitalPlan(name, node, _counts(cat, everything),
                                      _counts(cat, cap_by_group(everything, cat.groups, max_images, seed)), folder))
        label_info = {h: {f: {"class": c, "how": rec.how[h][f]} for f, c in m.items()} for h, m in rec.mapping.items()}
        return Layout(kind, str(path), rec.class_names, plans, "", max_images, label_info, notes)

    n = hospitals if hospitals is not None else default_hospitals
    if kind == LAYOUT_HAM10000:
        if lmap or classes:
            raise ConfigError(f"--label-map/--class-names: {path} is HAM10000, whose 7 classes come from its metadata "
                              "(dx column); they apply to class-per-folder data only")
        cat = ham10000.load_catalog(path)
        n_sites = len(set(cat.sites)) if cat.sites is not None else 0
        if partition is None:
            partition = names.PARTITION_SITE if n_sites and n <= n_sites else names.PARTITION_LESION  # real, non-IID hospitals
        elif partition not in PARTITIONS[kind]:
            raise ConfigError(f"--partition {partition}: HAM10000 splits by {', '.join(PARTITIONS[kind])}")
        plans = _split(kind, cat, path, n, partition, dirichlet_alpha, max_images, seed, {})
        notes = [f"{len(cat.missing)} image(s) listed in the metadata have no file; skipped"] if cat.missing else []
        return Layout(kind, str(path), cat.class_names, plans, partition, max_images, {}, notes)

    # one class-per-folder tree
    partition = partition or names.PARTITION_RANDOM
    if partition not in PARTITIONS[kind]:
        raise ConfigError(f"--partition {partition}: a class-per-folder tree has no lesion ids or sites; "
                          f"split it by {' or '.join(PARTITIONS[kind])}")
    if lmap.per_hospital:
        raise ConfigError(f"label-map entries for hospital(s) {', '.join(lmap.per_hospital)}: {path} is one class-per-folder "
                          "tree, split at random, so its hospitals share one label map; write 'folder=class'")
    rec = reconcile({path.name: [d.name for d in imagefolder.class_folders(path)]}, lmap, classes)
    mapping = rec.mapping[path.name]
    cat = imagefolder.load_catalog(path, mapping, rec.class_names, path.name)
    extra = {"label-map": _json_literal(mapping), "class-names": ",".join(rec.class_names)}
    plans = _split(kind, cat, path, n, partition, dirichlet_alpha, max_images, seed, extra)
    label_info = {"(all)": {f: {"class": c, "how": rec.how[path.name][f]} for f, c in mapping.items()}}
    notes = [f"{h.name}: no images of class(es) {', '.join(c for c, k in h.images.items() if not k)}"
             for h in plans if not all(h.images.values())]
    return Layout(kind, str(path), rec.class_names, plans, partition, max_images, label_info, notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedssl_flower.data.layout",
                                description="Say which dataset layout PATH holds and what each hospital gets.")
    p.add_argument("path", type=Path)
    p.add_argument("--hospitals", type=int, default=None, help="hospitals to split one dataset into (not for hospital folders)")
    p.add_argument("--default-hospitals", type=int, default=3, help="hospitals when --hospitals is not given")
    p.add_argument("--partition", default=None, help="HAM10000: site|lesion|dirichlet; a class tree: random|dirichlet")
    p.add_argument("--dirichlet-alpha", type=float, default=0.5, help="label skew of --partition dirichlet (smaller = stronger)")
    p.add_argument("--label-map", default="", help="folder=class,... / hospital:folder=class,... / JSON / a file")
    p.add_argument("--class-names", default="", help="the class list, in order (comma list)")
    p.add_argument("--max-images", type=int, default=0, help="images per hospital (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (run config seed)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the summary")
    p.add_argument("--write-json", type=Path, default=None, help="also write the JSON to this file")
    p.add_argument("--node-configs", type=Path, default=None,
                   help="write one line per hospital: NAME<TAB>node-config (data part) for flower-supernode")
    a = p.parse_args(argv)
    try:
        layout = plan(a.path, hospitals=a.hospitals, default_hospitals=a.default_hospitals, partition=a.partition,
                      dirichlet_alpha=a.dirichlet_alpha, label_map=a.label_map, class_names=a.class_names,
                      max_images=a.max_images, seed=a.seed)
        lines = [f"{h.name}\t{h.node_config_text()}" for h in layout.hospitals]
    except FedSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    body = json.dumps(layout.as_dict(), indent=2, ensure_ascii=False)
    if a.write_json:
        a.write_json.write_text(body + "\n", encoding="utf-8")
    if a.node_configs:
        a.node_configs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(body if a.json else layout.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
