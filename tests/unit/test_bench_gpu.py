"""``bench/bench_gpu.py --tiny`` runs on CPU and reports rollout latents/s, learner step time and MFU."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_bench_reports_three_numbers_and_mfu(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    result = bench.main(
        ["--tiny", "--device", "cpu", "--runs", "1", "--warmup", "1", "--peak-tflops", "1", "--threads", "1"]
    )
    out = capsys.readouterr().out
    assert "no text encoders, no VAE" in out and "VAE decode excluded" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    parsed = {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.eE+-]+)", line)}
    assert parsed.keys() == {"rollout_latents_per_s", "learner_step_s", "mfu_rollout", "mfu_learner"}
    assert parsed["rollout_latents_per_s"] > 0 and parsed["learner_step_s"] > 0
    for key in ("mfu_rollout", "mfu_learner"):
        assert 0 < parsed[key] <= 1, (key, parsed[key])
        assert parsed[key] == pytest.approx(result[key], rel=1e-4)
    assert "| rollout: 4-step CPS + log-probs |" in out and "| learner: fwd + bwd (LoRA) + AdamW |" in out


def test_sd35_medium_config_matches_the_published_transformer() -> None:
    cfg = _load().SD35_MEDIUM_CONFIG
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"]) == (24, 24, 64)
    assert cfg["dual_attention_layers"] == tuple(range(13)) and cfg["qk_norm"] == "rms_norm"
    assert (cfg["joint_attention_dim"], cfg["pooled_projection_dim"], cfg["caption_projection_dim"]) == (
        4096,
        2048,
        1536,
    )


def test_unknown_device_needs_peak_flag() -> None:
    bench = _load()
    with pytest.raises(SystemExit, match="peak-tflops"):
        bench.resolve_peak(None, bench.torch.device("cpu"))
