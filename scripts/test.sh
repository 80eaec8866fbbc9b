#!/usr/bin/env bash
# Sets up and runs the tests: `bash scripts/test.sh` (CI suite) or `bash scripts/test.sh slow` (slow tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ "${1:-}" = "slow" ]; then
  shift
  python -m pytest -m slow "$@"
else
  python -m pytest "$@"
fi
