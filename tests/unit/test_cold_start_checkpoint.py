"""Checkpoint directories (atomic finalize, completeness, rotation, resume) and the metrics sinks."""

from __future__ import annotations

import json

import pytest
import torch

from rtdmd_ray.config import LoggingConfig
from rtdmd_ray.runs import checkpoint as ckpt


def _save(root, it, keep=2, ranks=2):
    tmp = ckpt.tmp_dir(root, it)
    for r in range(ranks):
        ckpt.save_rank_part(
            tmp, r, {"w": torch.full((2,), float(it + r))}, {"step": it, "rng": torch.arange(3)}
        )
    return ckpt.finalize(tmp, it, {"world_size": ranks}, keep)


def test_finalize_rotation_latest_and_incomplete_dirs(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None and ckpt.resolve_resume("auto", tmp_path) is None
    for it in (10, 20, 30):
        _save(tmp_path, it)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-00000020", "checkpoint-00000030"]  # keep_last = 2
    # a crash mid-save leaves a .tmp directory (no meta.json): never picked up
    tmp = ckpt.tmp_dir(tmp_path, 40)
    ckpt.save_rank_part(tmp, 0, {"w": torch.zeros(2)}, {"step": 40})
    # a directory with the final name but no completion marker is ignored too
    (tmp_path / "checkpoint-00000050").mkdir()
    latest = ckpt.resolve_resume("auto", tmp_path)
    assert latest == tmp_path / "checkpoint-00000030"
    tensors, aux = ckpt.load_rank_part(latest, 1)
    assert torch.equal(tensors["w"], torch.full((2,), 31.0)) and aux["step"] == 30
    assert torch.equal(aux["rng"], torch.arange(3))  # loaded with weights_only=True
    assert ckpt.read_meta(latest) == {"world_size": 2, "iteration": 30, "complete": True}
    assert ckpt.resolve_resume("never", tmp_path) is None
    assert ckpt.resolve_resume(str(latest), tmp_path) == latest
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp), tmp_path)
    with pytest.raises(FileNotFoundError, match="resources.learner.count"):
        ckpt.load_rank_part(latest, 2)
    # re-saving an iteration (after a resume) replaces it atomically
    _save(tmp_path, 30)
    assert ckpt.latest_checkpoint(tmp_path) == latest



def test_resume_refuses_a_checkpoint_of_a_different_base(tmp_path):
    from rtdmd_ray.config import ConfigError, apply_overrides, load_config

    lora = tmp_path / "acdmd.safetensors"
    lora.write_bytes(b"adapter v1")
    cfg = load_config("configs/debug/tiny_sd3.yaml", [f"model.generator_lora.load_path={lora}"])
    base = ckpt.base_fingerprint(cfg.model)
    tmp = ckpt.tmp_dir(tmp_path / "run", 10)
    ckpt.save_rank_part(tmp, 0, {"w": torch.zeros(2)}, {"step": 10})
    saved = ckpt.finalize(tmp, 10, {"world_size": 1, "base": base}, 2)
    assert ckpt.check_resume_base(saved, base) == [] and ckpt.check_resume_base(None, base) == []
    # the same adapter moved elsewhere is the same base (hashed by content)
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(lora.read_bytes())
    same = ckpt.base_fingerprint(apply_overrides(cfg, [f"model.generator_lora.load_path={moved}"]).model)
    assert ckpt.check_resume_base(saved, same) == []
    # a retrained adapter at the same path is not: the error names the key and the fix
    lora.write_bytes(b"adapter v2")
    changed = r"model\.generator_lora\.load_path: checkpoint 'sha256 .*new train\.output_dir"
    with pytest.raises(ConfigError, match=changed):
        ckpt.check_resume_base(saved, ckpt.base_fingerprint(cfg.model))
    with pytest.raises(ConfigError, match=changed):  # what the stages call: resolve + check in one
        ckpt.resolve_resume("auto", tmp_path / "run", base=ckpt.base_fingerprint(cfg.model))
    assert ckpt.resolve_resume("auto", tmp_path / "run", base=base) == saved
    lora.write_bytes(b"adapter v1")
    with pytest.raises(ConfigError, match=r"model\.fake_score_lora: checkpoint 'rank \d+, alpha"):
        rank2 = apply_overrides(cfg, ["model.fake_score_lora.rank=2"])
        ckpt.check_resume_base(saved, ckpt.base_fingerprint(rank2.model))
    # another pretrained_path may be the same weights moved: a warning, not an error
    warns = ckpt.check_resume_base(saved, {**base, "model.pretrained_path": "/elsewhere"})
    assert len(warns) == 1 and "model.pretrained_path" in warns[0] and "/elsewhere" in warns[0]
    # checkpoints written before the fingerprint existed are not checked
    old = _save(tmp_path / "old", 5)
    assert ckpt.check_resume_base(old, {}) == []

def test_base_fingerprint_resolves_a_relative_load_path_from_the_repository_root(tmp_path, monkeypatch):
    """Config paths are relative to the repository root whatever the cwd (Ray actors' cwd differs from the
    driver's): the fingerprint hashes the same file the learner loads."""
    from rtdmd_ray.config import REPO_ROOT, load_config

    rel = "rtdmd_ray/shapes/assets/acdmd/generator_ema.safetensors"
    cfg = load_config(REPO_ROOT / "configs/debug/tiny_sd3.yaml", [f"model.generator_lora.load_path={rel}"])
    from_root = ckpt.base_fingerprint(cfg.model)
    monkeypatch.chdir(tmp_path)  # a same-named file here must not shadow the repository's
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes(b"not the adapter")
    elsewhere = ckpt.base_fingerprint(cfg.model)
    assert from_root == elsewhere
    assert from_root["model.generator_lora.load_path"].startswith("sha256 ")


def test_metrics_logger_jsonl_and_offline_wandb(tmp_path, monkeypatch):
    from rtdmd_ray.runs.logger import MetricsLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(
        cfg=LoggingConfig(stdout=True, jsonl=True, wandb="offline"),
        output_dir=tmp_path,
        total_iterations=4,
        run_config={"train": {"seed": 1}},
    )
    log.log(1, {"learner/fake/loss": 0.5, "timing/iteration_s": 0.1})
    log.advance(1, {"learner/fake/loss": 0.5})
    log.log(2, {"eval/mean": 0.25})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert records[0]["learner/fake/loss"] == 0.5 and records[1]["eval/mean"] == 0.25
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
