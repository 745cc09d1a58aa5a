#!/usr/bin/env python3
"""Refresh the dashboard screenshots in docs/screenshots/ (used by the README).

They come from the browser tests themselves (tests/registry/test_dashboard.py): a real
registry filled by a real short federated run on HAM10000, driven in Debian's headless
Chromium at a laptop width (plus one wide run page). This script only runs those tests with
FEDSSL_UPDATE_SCREENSHOTS=1 so that each page's screenshot is copied into docs/.

With --mri PATH it shoots the brain MRI pages instead (docs/screenshots/mri-run.png,
mri-try.png) from a full-size run: `./deploy-local.sh up --data PATH` with its default
recipe on the three MRI hospitals (`../shared/data/brain-mri`), each hospital's own model
registered (--register-local-models), then the run page and one slice scored on "Try it"
by the global model and every hospital's own model (about 10 minutes on 2 CPU cores).

    scripts/dashboard-screenshots.py                    # a fresh federated run (~3-4 min)
    scripts/dashboard-screenshots.py --registry-dir D   # reuse the registry data dir of an earlier run
    scripts/dashboard-screenshots.py --mri ../shared/data/brain-mri
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "screenshots"
MRI_LABEL_MAP = "tata-memorial-mumbai:Normal=notumor"  # the one folder name that needs a map (README of the data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


def mri(data: Path) -> int:
    """A full deploy-local run on the MRI hospitals, then the run and "Try it" pages shot."""
    sys.path.insert(0, str(ROOT))
    from tests.registry import cdp  # the browser driver of the dashboard tests

    exe = cdp.find_chromium()
    if exe is None:
        print("chromium is not installed: apt-get install -y chromium (scripts/bootstrap.sh does it)", file=sys.stderr)
        return 2
    home = Path(tempfile.mkdtemp(prefix="fedssl-mri-shots-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDSSL_", "FLWR_"))}
    env.update(FEDSSL_HOME=str(home), FEDSSL_SUPERLINK_PORT=str(_free_port()), FEDSSL_REGISTRY_PORT=str(_free_port()))
    script = [str(ROOT / "deploy-local.sh")]
    try:
        code = subprocess.call([*script, "up", "--data", str(data), "--label-map", MRI_LABEL_MAP, "--register-local-models"],
                               env=env, cwd=ROOT)
        if code != 0:
            return code
        url = (home / "registry.url").read_text().strip()
        (run,) = _get(url + "/v1/runs")["runs"]
        browser = cdp.Browser(exe)
        try:
            tab = browser.tab(1280, 860)
            tab.goto(f"{url}/dashboard/runs/{run['run_id']}")
            tab.wait_for("document.querySelector('#try-local') && document.querySelector('[data-chart=\"bytes\"]')", timeout=60)
            browser.pump(0.5)
            tab.screenshot(SHOTS / "mri-run.png")
            tab.goto(url + tab.eval("document.getElementById('try-local').getAttribute('href')"))
            tab.wait_for("document.getElementById('predict')")
            slice_ = sorted((data / "tata-memorial-mumbai" / "pituitary tumor").glob("*.jpg"))[0]
            tab.set_files("#image-input", [slice_])
            tab.wait_for("!document.getElementById('predict').disabled && document.querySelector('.preview img')")
            tab.click("#predict")
            tab.wait_for("Number(document.querySelector('.results').dataset.done || 0) > 1", timeout=120)
            browser.pump(0.5)
            tab.screenshot(SHOTS / "mri-try.png")
            print(tab.text(".try-status"))
        finally:
            browser.close()
        for name in ("mri-run.png", "mri-try.png"):
            print(f"  docs/screenshots/{name}  ({(SHOTS / name).stat().st_size // 1024} KB)")
        return 0
    finally:
        subprocess.call([*script, "down"], env=env, cwd=ROOT)
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry-dir", type=Path, help="registry data dir (SQLite + artifacts) of an earlier run to reuse")
    parser.add_argument("--mri", type=Path, metavar="PATH", help="the brain MRI hospitals (../shared/data/brain-mri): shoot the MRI pages")
    args = parser.parse_args()
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        print(f"no project venv at {python.parent.parent}: run scripts/bootstrap.sh first", file=sys.stderr)
        return 2
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        print("chromium is not installed: apt-get install -y chromium (scripts/bootstrap.sh does it)", file=sys.stderr)
        return 2
    if args.mri:
        if not (args.mri / "aiims-delhi").is_dir():
            print(f"--mri {args.mri}: no aiims-delhi/ hospital folder there; expected the brain MRI hospitals "
                  "(../shared/data/brain-mri)", file=sys.stderr)
            return 2
        return mri(args.mri.resolve())
    env = {**os.environ, "FEDSSL_UPDATE_SCREENSHOTS": "1"}
    if args.registry_dir:
        env["FEDSSL_DASHBOARD_REGISTRY_DIR"] = str(args.registry_dir.resolve())
    code = subprocess.call([str(python), "-m", "pytest", "-q", "tests/registry/test_dashboard.py"], cwd=ROOT, env=env)
    if code == 0:
        print("screenshots updated:")
        for p in sorted(SHOTS.glob("*.png")):
            print(f"  {p.relative_to(ROOT)}  ({p.stat().st_size // 1024} KB)")
    return code


if __name__ == "__main__":
    sys.exit(main())
