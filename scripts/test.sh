#!/usr/bin/env bash
# Run the test suite (extra pytest arguments pass through). Exits non-zero if any test fails
# and also when no test was collected (pytest's exit code 5), so CI never passes on nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VOXSERVE_VENV:-.venv}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
"$VENV/bin/ruff" check . || exit 1
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: no tests were collected: failing" >&2
  exit 1
fi
exit "$rc"
