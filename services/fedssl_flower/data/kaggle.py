"""Download a Kaggle dataset (HAM10000 by default) with the official `kaggle` package, atomically.

A dataset is named by its Kaggle slug `OWNER/DATASET` and, optionally, a sub-path inside the
download that holds the images (`masoudnickparvar/brain-tumor-mri-dataset/Training`,
`paultimothymooney/chest-xray-pneumonia/chest_xray/train`). HAM10000 is checked for its own
layout; any other dataset is loaded from its sub-path as a class-per-folder tree (data-source
`imagefolder`, see `layout` and `imagefolder`).

Credentials come from env (`KAGGLE_USERNAME` + `KAGGLE_KEY`, e.g. from a Kubernetes Secret)
or a `kaggle.json` in `$KAGGLE_CONFIG_DIR` or `~/.kaggle`. The archive is downloaded and
unzipped into a temporary folder beside the target, checked, then renamed into place: an
interrupted download never leaves a half dataset that would load. Several hospitals racing to
download into one path end with one complete copy. A dataset other than HAM10000 carries a
marker file naming its slug, so a folder holding another dataset is never taken for it.

Command line (the Kubernetes init container and deploy-local.sh use it):
    python -m fedssl_flower.data.kaggle TARGET_DIR [--dataset OWNER/DATASET[/SUB/PATH]] [--path SUB/PATH]
        [--format ham10000|imagefolder] [--print-path]
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fedssl_core import names

from ..errors import ConfigError, DatasetNotFound, FedSSLError, KaggleDownloadError
from . import ham10000

log = logging.getLogger(__name__)

# Kaggle user names and dataset slugs: letters, digits, '-', '_' and '.' (what Kaggle URLs hold).
_SLUG_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SLUG_HELP = ("expected OWNER/DATASET[/SUB/PATH] as in the dataset's Kaggle URL, e.g. "
             "masoudnickparvar/brain-tumor-mri-dataset/Training or paultimothymooney/chest-xray-pneumonia/chest_xray/train")
# Written into a downloaded dataset (not HAM10000, which is recognised by its own files): its slug.
MARKER = ".fedssl-kaggle-dataset"


@dataclass(frozen=True)
class KaggleDataset:
    """A Kaggle dataset (`OWNER/DATASET`) and the folder inside it that holds the images."""

    dataset: str = names.HAM10000_KAGGLE_DATASET
    path: str = ""  # POSIX sub-path inside the download; "" = its top
    format: str = names.DATA_HAM10000  # ham10000: HAM10000's own layout; imagefolder: class (or hospital) folders

    @property
    def is_ham10000(self) -> bool:
        """HAM10000's own layout (metadata CSV + image folders), not a class-per-folder tree."""
        return self.format == names.DATA_HAM10000

    def target_in(self, root: Path) -> Path:
        """Where the download goes under `root`: `root/ham10000` for HAM10000 (as always),
        `root/kaggle/OWNER/DATASET` for any other dataset."""
        if self.is_ham10000:
            return Path(root) / "ham10000"
        owner, name = self.dataset.split("/")
        return Path(root) / "kaggle" / owner / name

    def __str__(self) -> str:
        return f"{self.dataset}/{self.path}" if self.path else self.dataset


def check_subpath(path: str, what: str = "sub-path") -> str:
    """A relative folder inside a download, normalised (`a//b/` → `a/b`); refuses absolute paths,
    `..`, backslashes and hidden folders, naming what was wrong."""
    text = (path or "").strip()
    if "\\" in text:
        raise ConfigError(f"Kaggle {what} {path!r} holds a backslash; write folders with '/', e.g. chest_xray/train")
    if text.startswith("/"):
        raise ConfigError(f"Kaggle {what} {path!r} is absolute; expected a folder inside the download, e.g. Training")
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    for p in parts:
        if p == ".." or p.startswith("."):
            raise ConfigError(f"Kaggle {what} {path!r}: {p!r} is not allowed; expected a folder inside the download, e.g. Training")
    return "/".join(parts)


def parse_dataset(text: str, path: str = "", format: str | None = None) -> KaggleDataset:
    """`OWNER/DATASET[/SUB/PATH]` (and an optional separate `path`) → KaggleDataset; a
    ConfigError naming the wrong part and what was expected otherwise. `format` defaults to
    ham10000 for HAM10000's slug without a sub-path, imagefolder for anything else."""
    raw = (text or "").strip()
    parts = raw.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"Kaggle dataset {text!r} is not OWNER/DATASET; {SLUG_HELP}")
    for label, part in (("owner", parts[0]), ("dataset name", parts[1])):
        if not _SLUG_PART.match(part):
            raise ConfigError(f"Kaggle dataset {text!r}: {label} {part!r} may hold only letters, digits, '-', '_' and '.'; {SLUG_HELP}")
    inline = check_subpath(parts[2]) if len(parts) == 3 else ""
    separate = check_subpath(path) if path else ""
    if inline and separate and inline != separate:
        raise ConfigError(f"Kaggle dataset {text!r} names the sub-path {inline!r} and --path names {separate!r}; give it once")
    slug, sub = f"{parts[0]}/{parts[1]}", inline or separate
    if format is None:
        format = names.DATA_HAM10000 if slug == names.HAM10000_KAGGLE_DATASET and not sub else names.DATA_IMAGEFOLDER
    if format not in (names.DATA_HAM10000, names.DATA_IMAGEFOLDER):
        raise ConfigError(f"Kaggle dataset format {format!r}; expected {names.DATA_HAM10000} or {names.DATA_IMAGEFOLDER}")
    if format == names.DATA_HAM10000 and sub:
        raise ConfigError(f"Kaggle dataset {text!r}: HAM10000 is used from the top of its download; drop the sub-path {sub!r}")
    return KaggleDataset(slug, sub, format)


def credentials_available() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file()


def _marker_of(folder: Path) -> str | None:
    try:
        return (folder / MARKER).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def is_present(target: Path, source: KaggleDataset) -> bool:
    """Whether `target` holds a complete download of `source.dataset`."""
    if source.is_ham10000:
        return ham10000.is_present(target)
    return _marker_of(Path(target)) == source.dataset


def _folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")) if folder.is_dir() else []


def data_folder(target: Path, source: KaggleDataset) -> Path:
    """The folder of a download that holds the images (`target/source.path`); a DatasetNotFound
    naming the folders that do exist when it is missing."""
    target = Path(target)
    folder = target.joinpath(*source.path.split("/")) if source.path else target
    if folder.is_dir():
        return folder
    # The deepest folder of the sub-path that exists, and what it holds.
    found, parts = target, source.path.split("/")
    for part in parts:
        if not (found / part).is_dir():
            break
        found = found / part
    held = _folders(found)
    where = "the download" if found == target else f"{found.relative_to(target)}/"
    raise DatasetNotFound(
        f"Kaggle dataset {source.dataset} at {target} has no folder {source.path!r}; {where} holds "
        + (", ".join(f"{d}/" for d in held) if held else "no folders")
        + "; set the sub-path to the folder holding one folder per class (or per hospital)")


def download(target: Path, source: KaggleDataset | str = KaggleDataset()) -> Path:
    """Download `source` into `target` unless it is there; returns the folder holding its images
    (`target/source.path`). The download is installed whole or not at all."""
    if isinstance(source, str):
        source = parse_dataset(source)
    target = Path(target)
    if not is_present(target, source):
        _download(target, source)
    return data_folder(target, source)


def _download(target: Path, source: KaggleDataset) -> None:
    dataset = source.dataset
    if not credentials_available():
        raise KaggleDownloadError(
            f"cannot download {dataset} into {target}: no Kaggle credentials; set KAGGLE_USERNAME and "
            "KAGGLE_KEY or put kaggle.json in ~/.kaggle (or $KAGGLE_CONFIG_DIR)"
        )
    other = _marker_of(target)
    if other and other != dataset:
        raise KaggleDownloadError(f"cannot download {dataset} into {target}: it holds the Kaggle dataset {other}; "
                                  "choose another folder or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.download-", dir=target.parent))
    try:
        try:
            # Importing kaggle authenticates from env/kaggle.json; it raises on bad credentials.
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
            log.info("downloading %s from Kaggle into %s", dataset, staging)
            api.dataset_download_files(dataset, path=str(staging), unzip=True, quiet=True)
        except Exception as exc:  # the kaggle client raises many types; all mean "no dataset"
            raise KaggleDownloadError(f"downloading {dataset} from Kaggle into {target} failed: {type(exc).__name__}: {exc}") from exc
        if source.is_ham10000:
            if not ham10000.is_present(staging):
                raise KaggleDownloadError(
                    f"the Kaggle download of {dataset} does not have the expected layout "
                    f"({ham10000.METADATA}, {ham10000.IMAGE_DIRS[0]}/); nothing was installed at {target}"
                )
        else:
            if not any(staging.iterdir()):
                raise KaggleDownloadError(f"the Kaggle download of {dataset} is empty; nothing was installed at {target}")
            (staging / MARKER).write_text(dataset + "\n", encoding="utf-8")
        if target.exists() and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            os.replace(staging, target)  # atomic on one filesystem: all or nothing
        except OSError:
            if is_present(target, source):  # another hospital finished first: its copy is complete
                return
            raise KaggleDownloadError(f"cannot install the download at {target}: it exists and is not an empty folder") from None
        log.info("%s installed at %s", dataset, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def download_ham10000(target: Path, dataset: str = names.HAM10000_KAGGLE_DATASET) -> Path:
    """Download HAM10000 (or a copy of it published as `dataset`) into `target`; returns `target`."""
    target = Path(target)
    if ham10000.is_present(target):
        return target
    _download(target, parse_dataset(dataset, format=names.DATA_HAM10000))
    if not ham10000.is_present(target):
        raise KaggleDownloadError(f"the Kaggle download of {dataset} at {target} does not have the HAM10000 layout "
                                  f"({ham10000.METADATA}, {ham10000.IMAGE_DIRS[0]}/)")
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m fedssl_flower.data.kaggle",
        description="Download a Kaggle dataset into TARGET_DIR (atomic; a no-op when it is there). "
                    "HAM10000 by default; any other dataset is a class-per-folder tree at --path.")
    parser.add_argument("target", type=Path, help="folder to download into (HAM10000: to hold HAM10000_metadata.csv and its images)")
    parser.add_argument("--dataset", default=names.HAM10000_KAGGLE_DATASET,
                        help="Kaggle dataset OWNER/DATASET, optionally /SUB/PATH (the folder holding the class folders)")
    parser.add_argument("--path", default="", help="the folder inside the download holding the images (e.g. Training)")
    parser.add_argument("--format", choices=(names.DATA_HAM10000, names.DATA_IMAGEFOLDER), default=None,
                        help="ham10000: check HAM10000's layout (a mirror under another slug); imagefolder: class "
                             "folders at --path. Default: ham10000 for HAM10000's slug without a path, else imagefolder")
    parser.add_argument("--print-path", action="store_true",
                        help="print only the folder holding the images on stdout (for scripts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        source = parse_dataset(args.dataset, args.path, args.format)
        folder = download_ham10000(args.target, source.dataset) if source.is_ham10000 else download(args.target, source)
    except FedSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.print_path:
        print(folder)
    elif source.is_ham10000:
        print(f"HAM10000 ready at {folder}")
    else:
        print(f"{source.dataset} ready; its images are at {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
