"""Reconciling hospitals' class-folder names into one class list, never by a silent guess.

Hospitals name the same class their own way (`pituitary`, `pituitary_tumor`, `pituitary tumor`).
A label map (`folder=class`, global or per hospital) says what a folder means. Without an
entry, a folder matches a class whose name differs only in case, separators or a generic word
(`tumor`); every such match is reported (`Reconciliation.matches`) so it can be printed and
recorded on the run. Anything else that does not match is a `LabelMismatch` naming the
hospital, the folder and the nearest known class.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, LabelMismatch

# Words that say nothing about which class a folder holds: `glioma_tumor` is `glioma`.
GENERIC_WORDS = ("tumours", "tumors", "tumour", "tumor")

HOW_LABEL_MAP = "label-map"  # the label map named the folder
HOW_SAME_NAME = "same name"  # the folder is called exactly like the class
HOW_NORMALISED = "case/separators/generic word"  # matched by `label_key`

LABEL_MAP_HELP = (
    "a label map is 'folder=class,...' (every hospital), 'hospital:folder=class,...' (one hospital), "
    "a JSON object {\"folder\": \"class\"} or {\"hospital\": {\"folder\": \"class\"}}, or a file holding either"
)


def label_key(name: str) -> str:
    """What is left of a class name once case, separators and a leading or trailing generic
    word are dropped: `No Tumor`, `no_tumor` and `notumor` are all `no`."""
    key = re.sub(r"[^0-9a-z]+", "", name.casefold())
    for word in GENERIC_WORDS:
        if key.endswith(word) and len(key) > len(word):
            key = key[: -len(word)]
            break
    for word in GENERIC_WORDS:
        if key.startswith(word) and len(key) > len(word):
            key = key[len(word) :]
            break
    return key or name.casefold()


@dataclass
class LabelMap:
    """Folder → class, for every hospital (`common`) and for single hospitals (`per_hospital`)."""

    common: dict[str, str] = field(default_factory=dict)
    per_hospital: dict[str, dict[str, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.common or self.per_hospital)

    def for_hospital(self, hospital: str) -> dict[str, str]:
        """The entries that apply at `hospital`; its own override the common ones."""
        return {**self.common, **self.per_hospital.get(hospital, {})}

    def targets(self) -> set[str]:
        return set(self.common.values()) | {c for m in self.per_hospital.values() for c in m.values()}

    def as_dict(self) -> dict:
        return {**self.common, **{h: dict(m) for h, m in self.per_hospital.items()}}


def _entries_from_text(text: str) -> LabelMap:
    out = LabelMap()
    for item in filter(None, (p.strip() for p in re.split(r"[,\n]", text))):
        if item.startswith("#"):
            continue
        folder, sep, cls = item.rpartition("=")
        if not sep or not folder.strip() or not cls.strip():
            raise ConfigError(f"label-map entry {item!r} is not 'folder=class' or 'hospital:folder=class'; {LABEL_MAP_HELP}")
        hospital, colon, name = folder.partition(":")
        if colon:
            out.per_hospital.setdefault(hospital.strip(), {})[name.strip()] = cls.strip()
        else:
            out.common[folder.strip()] = cls.strip()
    return out


def _entries_from_json(parsed: object) -> LabelMap:
    if not isinstance(parsed, dict):
        raise ConfigError(f"label-map JSON must be an object, got {type(parsed).__name__}; {LABEL_MAP_HELP}")
    out = LabelMap()
    for key, value in parsed.items():
        if isinstance(value, dict):
            for folder, cls in value.items():
                if not isinstance(cls, str) or not cls.strip():
                    raise ConfigError(f"label-map entry {key}: {folder!r} must map to a class name, got {cls!r}")
                out.per_hospital.setdefault(str(key), {})[str(folder)] = cls.strip()
        elif isinstance(value, str) and value.strip():
            out.common[str(key)] = value.strip()
        else:
            raise ConfigError(f"label-map entry {key!r} must map to a class name or to {{folder: class}}, got {value!r}")
    return out


def parse_label_map(value: str | dict | LabelMap | None) -> LabelMap:
    """A label map from inline text, JSON, a dict, or the path of a file holding one of those."""
    if isinstance(value, LabelMap):
        return value
    if not value:
        return LabelMap()
    if isinstance(value, dict):
        return _entries_from_json(value)
    text = str(value).strip()
    if not text.startswith(("{", "[")) and "=" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"label-map {text!r} is neither a file nor 'folder=class' entries; {LABEL_MAP_HELP}")
        text = path.read_text(encoding="utf-8").strip()
    if text.startswith(("{", "[")):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"label-map is not valid JSON: {exc}; {LABEL_MAP_HELP}") from exc
        return _entries_from_json(parsed)
    return _entries_from_text(text)


def parse_class_names(value: str | list | None) -> list[str] | None:
    """`"glioma,meningioma"` or a list → the class list in order; None when not given."""
    if not value:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    names = [str(c).strip() for c in items if str(c).strip()]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise ConfigError(f"class-names lists {', '.join(dupes)} more than once; expected each class once")
    return names or None


@dataclass
class Reconciliation:
    """The one class list and how each hospital's folders map onto it."""

    class_names: list[str]
    mapping: dict[str, dict[str, str]]  # hospital -> folder -> class
    how: dict[str, dict[str, str]]  # hospital -> folder -> HOW_*
    missing: dict[str, list[str]]  # hospital -> classes it has no folder for

    def matches(self) -> list[str]:
        """One line per folder matched without the label map naming it, and per missing class."""
        lines = [f"{h}: folder {f!r} -> class {self.mapping[h][f]!r} ({how})"
                 for h, folders in self.how.items() for f, how in folders.items() if how == HOW_NORMALISED]
        lines += [f"{h}: no folder for class(es) {', '.join(m)} (it trains on the others)" for h, m in self.missing.items() if m]
        return lines


def _nearest(folder: str, classes: list[str]) -> str:
    """The known class most like `folder` (difflib ratio on names and keys, then common prefix)."""
    def score(c: str) -> tuple[float, int]:
        a, b = folder.casefold(), c.casefold()
        ratio = max(difflib.SequenceMatcher(None, a, b).ratio(),
                    difflib.SequenceMatcher(None, label_key(folder), label_key(c)).ratio())
        return ratio, len(os.path.commonprefix([a, b]))
    return max(sorted(classes), key=score)


def reconcile(folders: dict[str, list[str]], label_map: LabelMap | None = None, class_names: list[str] | None = None,
              *, check_label_map: bool = True, federation: bool = True) -> Reconciliation:
    """Map every hospital's class folders (`folders`: hospital -> folder names) onto one class list.

    The class list is `class_names` when given (in that order); otherwise the label map's
    classes plus every class found at two or more hospitals (every folder, with one hospital),
    sorted. `check_label_map` refuses entries for unknown hospitals or folders (a typo); a
    hospital's own node config turns it off, as it holds the whole federation's map. With
    `federation` off (one hospital's node config) a listed class may have no folder here.
    """
    label_map = label_map or LabelMap()
    hospitals = list(folders)
    for h, fs in folders.items():
        if not fs:
            raise LabelMismatch(f"hospital {h}: no class folders; expected one folder per class holding its images")
    if check_label_map:
        unknown = sorted(set(label_map.per_hospital) - set(hospitals))
        if unknown:
            raise ConfigError(f"label-map names hospital(s) {', '.join(unknown)}, but the hospitals are {', '.join(hospitals)}")
        for scope, entries in [("", label_map.common), *label_map.per_hospital.items()]:
            where = [scope] if scope else hospitals
            have = {f for h in where for f in folders[h]}
            for folder in entries:
                if folder not in have:
                    near = difflib.get_close_matches(folder, sorted(have), n=1, cutoff=0.0)
                    raise ConfigError(
                        f"label-map entry {(scope + ':') if scope else ''}{folder}={entries[folder]} names no folder "
                        f"{'of hospital ' + scope if scope else 'at any hospital'}"
                        f"{'; nearest folder: ' + repr(near[0]) if near else ''}")
    if class_names:
        stray = sorted(label_map.targets() - set(class_names))
        if stray and check_label_map:
            raise ConfigError(f"label-map maps to {', '.join(stray)}, which class-names ({', '.join(class_names)}) does not list")

    explicit = {h: label_map.for_hospital(h) for h in hospitals}
    if class_names:
        known = list(class_names)
    else:
        spellings: dict[str, list[str]] = {}  # key -> folder names, one per hospital that has it unmapped
        for h in hospitals:
            for key in {label_key(f): None for f in folders[h] if f not in explicit[h]}:
                spellings.setdefault(key, []).extend(f for f in folders[h] if f not in explicit[h] and label_key(f) == key)
        seen_at = {key: sum(any(label_key(f) == key for f in folders[h] if f not in explicit[h]) for h in hospitals)
                   for key in spellings}
        targets = sorted(label_map.targets())
        known = list(targets)
        target_keys = {label_key(t) for t in targets}
        for key, names in spellings.items():
            if key in target_keys or (len(hospitals) > 1 and seen_at[key] < 2):
                continue
            # the spelling most hospitals use, then the shortest, then lower case
            known.append(min(set(names), key=lambda n: (-names.count(n), len(n), n != n.lower(), n)))
        known = sorted(known)
    by_key: dict[str, list[str]] = {}
    for c in known:
        by_key.setdefault(label_key(c), []).append(c)

    mapping: dict[str, dict[str, str]] = {}
    how: dict[str, dict[str, str]] = {}
    errors: list[str] = []
    for h in hospitals:
        mapping[h], how[h] = {}, {}
        for f in folders[h]:
            if f in explicit[h]:
                mapping[h][f], how[h][f] = explicit[h][f], HOW_LABEL_MAP
            elif f in known:
                mapping[h][f], how[h][f] = f, HOW_SAME_NAME
            elif len(by_key.get(label_key(f), [])) == 1:
                mapping[h][f], how[h][f] = by_key[label_key(f)][0], HOW_NORMALISED
            elif by_key.get(label_key(f)):
                errors.append(f"hospital {h}: folder {f!r} could be any of {', '.join(by_key[label_key(f)])}; "
                              f"say which with --label-map '{h}:{f}=CLASS'")
            else:
                errors.append(f"hospital {h}: folder {f!r} matches no known class (known: {', '.join(known) or 'none'}); "
                              f"nearest: {_nearest(f, known)!r}" if known else f"hospital {h}: folder {f!r} matches no known class")
        by_class: dict[str, list[str]] = {}
        for f, c in mapping[h].items():
            by_class.setdefault(c, []).append(f)
        for c, fs in sorted(by_class.items()):
            if len(fs) > 1 and not all(how[h][f] == HOW_LABEL_MAP for f in fs):
                errors.append(f"hospital {h}: folders {', '.join(map(repr, sorted(fs)))} would all be class {c!r}; "
                              "merge them on purpose with --label-map entries for each, or rename one")
    if errors:
        raise LabelMismatch(
            "class folders do not match one class list:\n  " + "\n  ".join(errors)
            + f"\nmap each folder to a class with --label-map (e.g. '{errors_example(errors, known)}'), or list a "
            "class of its own in --class-names; " + LABEL_MAP_HELP)
    unused = [c for c in known if not any(c in m.values() for m in mapping.values())]
    if unused and federation:
        raise LabelMismatch(f"class(es) {', '.join(unused)} (from class-names or the label map) have no folder at any hospital; "
                            "drop them or add their images")
    missing = {h: [c for c in known if c not in mapping[h].values()] for h in hospitals}
    return Reconciliation(known, mapping, how, missing)


def errors_example(errors: list[str], known: list[str]) -> str:
    m = re.match(r"hospital (\S+): folder '([^']*)'.*?nearest: '([^']*)'", errors[0])
    if m:
        return f"{m.group(1)}:{m.group(2)}={m.group(3)}"
    return "hospital:folder=class"
