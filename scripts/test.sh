#!/usr/bin/env bash
# The test suite: installs what it needs (scripts/bootstrap.sh), then runs pytest.
# Arguments go to pytest, e.g. `./scripts/test.sh -k registry -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh" --with-test-tools
export PATH="$ROOT/.tools/bin:$ROOT/.venv/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
