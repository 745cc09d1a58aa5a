"""Download HAM10000 from Kaggle with the official `kaggle` package, atomically.

Credentials come from env (`KAGGLE_USERNAME` + `KAGGLE_KEY`, e.g. from a Kubernetes Secret)
or a `kaggle.json` in `$KAGGLE_CONFIG_DIR` or `~/.kaggle`. The archive is downloaded and
unzipped into a temporary folder beside the target, checked, then renamed into place: an
interrupted download never leaves a half dataset that would load. Several hospitals racing to
download into one path end with one complete copy.

Command line (the Kubernetes init container and deploy-local.sh use it):
    python -m fedssl_flower.data.kaggle TARGET_DIR
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedssl_core import names

from ..errors import KaggleDownloadError
from . import ham10000

log = logging.getLogger(__name__)


def credentials_available() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file()


def download_ham10000(target: Path, dataset: str = names.HAM10000_KAGGLE_DATASET) -> Path:
    """Download `dataset` into `target` (which must not hold a dataset yet); returns `target`."""
    target = Path(target)
    if ham10000.is_present(target):
        return target
    if not credentials_available():
        raise KaggleDownloadError(
            f"cannot download {dataset} into {target}: no Kaggle credentials; set KAGGLE_USERNAME and "
            "KAGGLE_KEY or put kaggle.json in ~/.kaggle (or $KAGGLE_CONFIG_DIR)"
        )
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
        if not ham10000.is_present(staging):
            raise KaggleDownloadError(
                f"the Kaggle download of {dataset} does not have the expected layout "
                f"({ham10000.METADATA}, {ham10000.IMAGE_DIRS[0]}/); nothing was installed at {target}"
            )
        if target.exists() and not any(target.iterdir()):
            target.rmdir()
        try:
            os.replace(staging, target)  # atomic on one filesystem: all or nothing
        except OSError:
            if ham10000.is_present(target):  # another hospital finished first: its copy is complete
                return target
            raise KaggleDownloadError(f"cannot install the download at {target}: it exists and is not an empty folder") from None
        log.info("HAM10000 installed at %s", target)
        return target
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m fedssl_flower.data.kaggle",
                                     description="Download HAM10000 from Kaggle into TARGET_DIR (atomic; a no-op when it is there).")
    parser.add_argument("target", type=Path, help="folder to hold HAM10000_metadata.csv and HAM10000_images_part_{1,2}/")
    parser.add_argument("--dataset", default=names.HAM10000_KAGGLE_DATASET, help="Kaggle dataset (owner/name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = download_ham10000(args.target, args.dataset)
    except KaggleDownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"HAM10000 ready at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
