#!/usr/bin/env bash
# Sets up and runs the main job on the embedded default: `bash scripts/quickstart.sh [CONFIG] [--out DIR]`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
vlmsec run "$@"
