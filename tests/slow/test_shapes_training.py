"""ShapeWorld trainers end to end at a few steps: determinism from the seed, exact resume, loss going down."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rtdmd_ray.shapes.train_teacher import TeacherTrainConfig, train_teacher

pytestmark = pytest.mark.slow


def _weights(d):
    return load_file(d / "transformer" / "diffusion_pytorch_model.safetensors")


def test_teacher_training_is_deterministic_and_resumes_exactly(tmp_path):
    common = dict(seed=3, batch_size=16, num_layers=1, warmup_steps=5, threads=1)
    a = train_teacher(TeacherTrainConfig(out=str(tmp_path / "a"), steps=40, **common))
    b = train_teacher(TeacherTrainConfig(out=str(tmp_path / "b"), steps=40, **common))
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # interrupted at step 20, then resumed from ckpt.pt to 40: the same weights as the uninterrupted run
    train_teacher(TeacherTrainConfig(out=str(tmp_path / "c"), steps=40, stop_after_steps=20, **common))
    assert (tmp_path / "c" / "ckpt.pt").is_file() and not (tmp_path / "c" / "final").exists()
    wc = _weights(train_teacher(TeacherTrainConfig(out=str(tmp_path / "c"), steps=40, **common)))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    other_cfg = TeacherTrainConfig(out=str(tmp_path / "d"), steps=40, **{**common, "seed": 4})
    other = _weights(train_teacher(other_cfg))
    assert not all(torch.equal(wa[k], other[k]) for k in wa)


def test_teacher_loss_decreases(tmp_path):
    from rtdmd_ray.shapes.text import build_text_encoder, build_tokenizer
    from rtdmd_ray.shapes.train_teacher import build_transformer, flow_loss, training_batch

    torch.manual_seed(0)
    cfg = TeacherTrainConfig(out=str(tmp_path), batch_size=32, num_layers=2)
    tok = build_tokenizer()
    te, tr = build_text_encoder(tok), build_transformer(cfg)
    opt = torch.optim.AdamW([*tr.parameters(), *te.parameters()], lr=1e-3)
    first = None
    for step in range(120):
        loss = flow_loss(tr, te, training_batch(step, cfg, tok))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss) < 0.5 * first
