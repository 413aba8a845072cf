#!/usr/bin/env bash
# The GPU checks (bench/gpu_check.py) on a machine with CUDA torch, transformers, peft, safetensors and numpy
# but no diffusers: installs the carried wheels (scripts/fetch_gpu_wheels.sh puts them in .gpu_wheels/) into
# a user site, then runs every check and writes gpu_check.json + gpu_check.log to the folder given.
#   bash scripts/gpu_check.sh OUT_DIR [gpu_check.py args...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [args]}
shift
mkdir -p "$out"
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  [ -d .gpu_wheels ] || { echo "no diffusers and no .gpu_wheels/: run scripts/fetch_gpu_wheels.sh here and carry .gpu_wheels" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --find-links .gpu_wheels --no-deps .gpu_wheels/*.whl 2>&1 | tail -3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia_smi.csv" 2>&1 || true
"$PY" bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
