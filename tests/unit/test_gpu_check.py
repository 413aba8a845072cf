"""`bench/gpu_check.py --tiny` (what scripts/gpu_check.sh runs at full size on a GPU machine) dry-runs on the
CPU: every part runs and writes its numbers; the CPU compared with itself agrees exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--out", str(tmp_path), "--tiny", "--device", "cpu"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["environment"]["torch"] and saved["tiny"] is True
    for part in ("numerics", "shapes_stages", "bench"):
        assert "error" not in result[part], (part, result[part])
    assert result["numerics"]["fp32_ok"] and result["numerics"]["fp32_max_rel_err"] == 0.0
    assert result["numerics"]["bf16_ratio_exactly_one"]  # no autocast on CPU: the same kernels twice
    stages = result["shapes_stages"]
    assert stages["ok"] and stages["cold_start"]["values"]["learner/generator/loss_dmd"]["rel_err"] == 0.0
    assert stages["rl_update"]["values"]["learner/ppo/loss"]["ok"]
    assert set(result["bench"]) - {"wall_s"} == {"64px_gc_off", "64px_gc_on"}
    for name in ("64px_gc_off", "64px_gc_on"):
        assert result["bench"][name]["learner_step_s"] > 0 and result["bench"][name]["mfu_learner"] > 0
