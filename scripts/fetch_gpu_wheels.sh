#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on a GPU image that lacks them (diffusers and the one
# dependency such images miss), pinned to the versions this project tests with, into .gpu_wheels/ (ignored by
# git; carry it to the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels
ver=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('diffusers'))")
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .gpu_wheels "diffusers==$ver" \
  importlib_metadata zipp
du -sh .gpu_wheels
