"""`rtdmd-ray validate` and `rtdmd-ray print-config`, in-process and as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtdmd_ray.cli import main
from rtdmd_ray.config import REPO_ROOT, load_config

TINY = "configs/debug/tiny_sd3.yaml"
SD35_RL = "configs/rtdmd/sd35m.yaml"


@pytest.fixture
def misspelt(tmp_path: Path) -> Path:
    path = tmp_path / "misspelt.yaml"
    path.write_text(f"inherit: {REPO_ROOT / TINY}\ngrpo:\n  images_per_promt: 4\n")
    return path


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def test_validate_shipped_config_exits_zero(capsys):
    assert main(["validate", SD35_RL]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {SD35_RL} (") and "1152 samples/epoch" in out and out.count("\n") == 1


def test_validate_misspelt_key_exits_nonzero_with_one_line(misspelt, capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate", str(misspelt)])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'grpo.images_per_promt'" in err and "did you mean 'grpo.images_per_prompt'" in err


def test_validate_override_with_bad_arithmetic_shows_the_numbers(capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate", TINY, "grpo.prompts_per_step=3", "grpo.images_per_prompt=3"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "grpo.images_per_step=9" in err and "resources.learner.count=2" in err


def test_print_config_round_trip(tmp_path, capsys):
    assert main(["print-config", SD35_RL, "train.seed=7", "rewards.weights.hpsv3=0.5"]) == 0
    text = capsys.readouterr().out
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(text)
    back = load_config(dumped)
    assert back == load_config(SD35_RL, ["train.seed=7", "rewards.weights.hpsv3=0.5"])
    assert back.train.seed == 7 and back.rewards.weights["hpsv3"] == 0.5


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "rtdmd_ray.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_validate(misspelt):
    bad = _run_cli("validate", str(misspelt))
    assert bad.returncode != 0 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    assert "'grpo.images_per_promt'" in lines[0] and "did you mean 'grpo.images_per_prompt'" in lines[0]
    good = _run_cli("validate", TINY)
    assert good.returncode == 0 and good.stdout.startswith(f"ok: {TINY}"), good.stderr
