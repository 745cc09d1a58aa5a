#!/usr/bin/env bash
# The test suite: installs what it needs (scripts/bootstrap.sh), then runs pytest.
# Arguments go to pytest, e.g. `./scripts/test.sh -k registry -x` (`-n 0`: one process).
# Two pytest-xdist workers ($FEDSSL_TEST_WORKERS), one test module each at a time, each on
# its own CPUs (tests/conftest.py): most tests wait on real processes, so two overlap well.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh" --with-test-tools
export PATH="$ROOT/.tools/bin:$ROOT/.venv/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -n "${FEDSSL_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
