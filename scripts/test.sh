#!/usr/bin/env bash
# The test suite: installs what it needs (scripts/bootstrap.sh), then runs pytest.
# Arguments go to pytest, e.g. `./scripts/test.sh -k registry -x` (`-n 0`: one process).
# pytest-xdist workers ($FEDSSL_TEST_WORKERS; by default two per CPU, at most four), one test
# module each at a time, each pinned to its share of the CPUs (tests/conftest.py): a real
# federation's processes leave their core idle about half the time, waiting on each other, so
# two workers on a core fill it (2 cores, 2026-12-07: 15 minutes with four workers, 22-25 with two).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh" --with-test-tools
export PATH="$ROOT/.tools/bin:$ROOT/.venv/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
cd "$ROOT"
cpus="$(nproc)"
exec "$ROOT/.venv/bin/python" -m pytest -n "${FEDSSL_TEST_WORKERS:-$(( 2 * cpus < 4 ? 2 * cpus : 4 ))}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
