#!/usr/bin/env bash
# Install everything (as demo.sh does, plus test deps) and run the test suite.
# Exits non-zero when a test fails, and when no tests are collected (pytest exit 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIXQ_TEST_DEPS=1 source "$ROOT/infra/local/setup.sh"
cd "$ROOT"
set +e
python -m pytest -q tests "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: no tests were collected; failing" >&2
  exit 1
fi
exit "$rc"
