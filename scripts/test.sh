#!/usr/bin/env bash
# Set up (if needed) and run the default test suite: unit + ray tiers (gpu and slow are opt-in).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# headless Chromium renders the eval report in a screenshot test (skipped with a reason if this fails)
bash scripts/install_chromium.sh || echo "chromium not installed: the report screenshot test will skip" >&2
source scripts/env.sh
.venv/bin/ruff check rtdmd_ray tests bench
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected: treat that as a failure of the suite, not a pass
[ $rc -eq 5 ] && echo "no tests collected" >&2
exit $rc
