#!/usr/bin/env bash
# The test suite: sets up .venv on first use, then runs pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/bootstrap.sh
exec python -m pytest -q -n "${ESEP_TEST_WORKERS:-2}" "$@"
