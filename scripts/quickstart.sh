#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default (ShapeWorld).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
.venv/bin/rtdmd-ray quickstart "$@"
