"""Fixtures shared by every test package: free ports, the real HAM10000 copy, tool lookup."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (scripts/test.sh: two workers per CPU, at most four), each worker and every process it
    starts (SuperLinks, SuperNodes, registries, benchmarks) runs on its own share of the CPUs:
    worker i of n gets cores i, i+n, ... Without it two workers' torch processes each size their
    thread pools for every core and thrash the other's; fedssl sizes torch's threads by the
    process's affinity (`fedssl_core.models.set_torch_threads`), and OpenMP reads it too.
    With more workers than cores, worker i gets core i mod cores: a real federation's processes
    leave their core idle about half the time (waiting on each other), which a second worker on
    that core fills."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and count > 1 and hasattr(os, "sched_setaffinity"):
        cores, i = sorted(os.sched_getaffinity(0)), int(worker[2:])
        # More workers than cores: worker i shares core i mod cores with the others dealt it.
        os.sched_setaffinity(0, cores[i % count::count] if len(cores) >= count else [cores[i % len(cores)]])


# Seconds each of the longest test modules takes on the 2-core machine (setup + call, summed
# over its tests; `./scripts/test.sh --durations=0`, 2026-12-06; test_attack.py's rescaled by its
# own time before and after it went from seven real runs to four, 2026-12-07). Only their order matters.
LONGEST_MODULES = {
    "tests/flower/test_faults.py": 199, "tests/flower/test_secure_aggregation.py": 146, "tests/flower/test_attack.py": 145,
    "tests/flower/test_superlink_faults.py": 142, "tests/registry/test_dashboard.py": 107, "tests/test_deploy_local.py": 95,
    "tests/flower/test_integration.py": 85, "tests/test_deploy_local_folders.py": 80, "tests/bench/test_quality.py": 72,
    "tests/flower/test_cyclic.py": 70, "tests/flower/test_generate_run.py": 57, "tests/flower/test_superlink_proxy.py": 55, "tests/deploy/test_chart.py": 50,
    "tests/bench/test_generative_bench.py": 38, "tests/registry/test_durability.py": 30, "tests/registry/test_api.py": 29,
}


def pytest_collection_modifyitems(config, items):
    """The longest modules first, longest first (LONGEST_MODULES), then the other modules of
    real-process tests (marked `integration`), then the rest; each module's tests kept in order.
    With one worker per module at a time (`--dist loadfile`, and `--no-loadscope-reorder` so
    pytest-xdist keeps this order instead of sorting by test count) the long federations start
    at once and the quick unit tests fill in around them instead of after them."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("integration") and item.module is not None}

    def weight(item) -> float:
        known = LONGEST_MODULES.get(item.nodeid.partition("::")[0])
        return known if known is not None else (1 if item.module is not None and item.module.__name__ in slow else 0)

    items.sort(key=lambda item: -weight(item))  # stable: order kept within a module


def free_port() -> int:
    """A TCP port nobody listens on right now (other sessions may hold fixed ones)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ham10000_dir() -> Path:
    """The real HAM10000 images in the Kaggle layout: $FEDSSL_TEST_HAM10000, else ../shared/data/ham10000."""
    path = Path(os.environ.get("FEDSSL_TEST_HAM10000", REPO_ROOT.parent / "shared" / "data" / "ham10000"))
    if not (path / "HAM10000_metadata.csv").is_file():
        pytest.fail(f"the real HAM10000 copy is missing: no HAM10000_metadata.csv under {path}; set FEDSSL_TEST_HAM10000")
    return path


@pytest.fixture(scope="session")
def brain_mri_dir() -> Path:
    """The real brain MRI hospitals (read-only; never copied into the repo): $FEDSSL_TEST_BRAIN_MRI,
    else ../shared/data/brain-mri, laid out as <hospital>/<class folder>/<image>.jpg."""
    path = Path(os.environ.get("FEDSSL_TEST_BRAIN_MRI", REPO_ROOT.parent / "shared" / "data" / "brain-mri"))
    if not (path / "aiims-delhi").is_dir():
        pytest.fail(f"the real brain MRI copy is missing: no aiims-delhi/ under {path}; set FEDSSL_TEST_BRAIN_MRI")
    return path


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven over the DevTools protocol (tests/registry/cdp.py)."""
    from tests.registry import cdp

    exe = cdp.find_chromium()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; scripts/bootstrap.sh does it)")
    b = cdp.Browser(exe)
    try:
        yield b
    finally:
        b.close()


def require_tool(name: str) -> str:
    """Path of a command-line tool the project's bootstrap installs; skip loudly if absent."""
    path = shutil.which(name) or (str(REPO_ROOT / ".tools" / "bin" / name) if (REPO_ROOT / ".tools" / "bin" / name).exists() else None)
    if not path:
        pytest.skip(f"{name} is not installed (scripts/bootstrap.sh --with-test-tools installs it)")
    return path
