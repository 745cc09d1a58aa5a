#!/usr/bin/env python3
"""Refresh the dashboard screenshots in docs/screenshots/ (used by the README).

They come from the browser tests themselves (tests/registry/test_dashboard.py): a real
registry filled by a real short federated run on HAM10000, driven in Debian's headless
Chromium at a laptop width (plus one wide run page). This script only runs those tests with
FEDSSL_UPDATE_SCREENSHOTS=1 so that each page's screenshot is copied into docs/.

    scripts/dashboard-screenshots.py                    # a fresh federated run (~3-4 min)
    scripts/dashboard-screenshots.py --registry-dir D   # reuse the registry data dir of an earlier run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry-dir", type=Path, help="registry data dir (SQLite + artifacts) of an earlier run to reuse")
    args = parser.parse_args()
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        print(f"no project venv at {python.parent.parent}: run scripts/bootstrap.sh first", file=sys.stderr)
        return 2
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        print("chromium is not installed: apt-get install -y chromium (scripts/bootstrap.sh does it)", file=sys.stderr)
        return 2
    env = {**os.environ, "FEDSSL_UPDATE_SCREENSHOTS": "1"}
    if args.registry_dir:
        env["FEDSSL_DASHBOARD_REGISTRY_DIR"] = str(args.registry_dir.resolve())
    code = subprocess.call([str(python), "-m", "pytest", "-q", "tests/registry/test_dashboard.py"], cwd=ROOT, env=env)
    if code == 0:
        print("screenshots updated:")
        for p in sorted((ROOT / "docs" / "screenshots").glob("*.png")):
            print(f"  {p.relative_to(ROOT)}  ({p.stat().st_size // 1024} KB)")
    return code


if __name__ == "__main__":
    sys.exit(main())
