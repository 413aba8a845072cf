"""ShapeWorld models with the shipped weights: the teacher as a FlowBackbone, the tiny CLIP's retrieval.

Both skip (with the reason) when the weights are not shipped yet; the text stack and a random-weight teacher
built in code are tested regardless.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdmd_ray.models.base import FlowBackbone
from rtdmd_ray.models.shapes import (
    SHIPPED_CLIP,
    SHIPPED_TEACHER,
    ShapesBackbone,
    ShapesWeightsMissing,
)
from rtdmd_ray.shapes import prompts as P
from rtdmd_ray.shapes.text import build_text_encoder, build_tokenizer, tokenize
from rtdmd_ray.stages.inference import sample_images

needs_teacher = pytest.mark.skipif(
    not (SHIPPED_TEACHER / "transformer").is_dir(),
    reason=f"no shipped teacher at {SHIPPED_TEACHER} (rtdmd-ray shapes train-teacher)")
needs_clip = pytest.mark.skipif(
    not (SHIPPED_CLIP / "config.json").is_file(),
    reason=f"no shipped tiny CLIP at {SHIPPED_CLIP} (rtdmd-ray shapes train-clip)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tokenizer_round_trips_and_fits(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    prompts = [m["prompt"] for m in P.all_prompts()[::37]] + [""]
    assert torch.equal(tokenize(tok, prompts), tokenize(loaded, prompts))
    ids = tokenize(tok, prompts)
    assert ids.shape == (len(prompts), P.MAX_TEXT_TOKENS)
    assert (ids != tok.unk_token_id).all()  # every grammar word is in the vocabulary
    enc = build_text_encoder(tok)
    out = enc(input_ids=ids)
    assert out.last_hidden_state.shape == (len(prompts), P.MAX_TEXT_TOKENS, 64)
    assert out.pooler_output.shape[-1] == 64


def test_random_teacher_round_trip(tmp_path):
    from rtdmd_ray.shapes.train_teacher import TeacherTrainConfig, build_transformer, save_pretrained_dir

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = TeacherTrainConfig(out=str(tmp_path), num_layers=1)
    save_pretrained_dir(tmp_path / "t", build_transformer(cfg), build_text_encoder(tok), tok, {"step": 0})
    bb = ShapesBackbone.from_pretrained(tmp_path / "t")
    assert isinstance(bb, FlowBackbone) and bb.family == "sd3"
    assert bb.latent_shape(32) == (12, 16, 16)
    sig = bb.sigma_schedule((1000, 750, 500, 250), 32)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and len(sig) == 5
    x = torch.randn(2, 12, 16, 16)
    cond = bb.encode_prompts(["a photo of a red circle", "an image of two squares"])
    v1 = bb.velocity(x, torch.tensor([0.5, 0.5]), cond)
    v3 = bb.velocity(x, torch.tensor([0.5, 0.5]), cond, guidance=3.0)
    vu = bb.velocity(x, torch.tensor([0.5, 0.5]), bb.empty_conditioning(2))
    torch.testing.assert_close(v3, vu + 3.0 * (v1 - vu), rtol=1e-4, atol=1e-4)
    with pytest.raises(ShapesWeightsMissing, match="train-teacher"):
        ShapesBackbone.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="resolution_px"):
        bb.latent_shape(64)


@needs_teacher
def test_shipped_teacher_samples_in_4_steps():
    bb = ShapesBackbone.from_pretrained(None)
    metas = P.balanced_eval_prompts(P.test_prompts(0), 2, seed=0)
    sigmas = bb.sigma_schedule((1000, 750, 500, 250), 32)
    imgs = sample_images(bb, [m["prompt"] for m in metas], list(range(len(metas))), sigmas, eta=None,
                         guidance=4.0, resolution_px=32)
    assert imgs.shape == (12, 3, 32, 32) and imgs.min() >= 0 and imgs.max() <= 1
    # a trained teacher draws saturated palette objects on a black background, not noise
    dark = (imgs.max(1).values < 0.2).float().mean()
    assert dark > 0.4


@needs_clip
def test_shipped_tiny_clip_retrieves_above_chance():
    from transformers import CLIPModel

    from rtdmd_ray.shapes.train_clip import retrieval_accuracy

    model = CLIPModel.from_pretrained(SHIPPED_CLIP)
    acc = retrieval_accuracy(model, build_tokenizer(), n_batches=2, batch_size=32, seed=7)
    assert acc["image_to_text_top1"] > 5 * acc["chance"]


@needs_clip
def test_tiny_clip_loads_through_clipscore():
    from rtdmd_ray.rewards.clipscore import CLIPScoreScorer
    from rtdmd_ray.shapes.render import render_batch

    sc = CLIPScoreScorer(model=str(SHIPPED_CLIP), logit_divisor=1.0)
    assert sc.tower.image_settings["size"] == 32
    metas = P.balanced_eval_prompts(P.test_prompts(0), 4, seed=3)
    imgs = render_batch(metas, np.random.default_rng(0))
    right = sc(imgs, [m["prompt"] for m in metas])["clipscore"]
    wrong = sc(imgs, [m["prompt"] for m in metas[::-1]])["clipscore"]
    assert right.mean() > wrong.mean()
    x = imgs.clone().requires_grad_(True)
    sc.score_differentiable(x, [m["prompt"] for m in metas]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_guidance_interval_guides_only_the_steps_below_its_sigma(tmp_path):
    """``sample_images(guidance_max_sigma=m)``: CFG on the steps starting at sigma <= m only. m = 1 is
    plain CFG, m = 0 no CFG at all (bit-exact), and m in between equals running the two pieces by hand."""
    from rtdmd_ray.shapes.train_teacher import TeacherTrainConfig, build_transformer, save_pretrained_dir

    torch.manual_seed(0)
    tok = build_tokenizer()
    transformer = build_transformer(TeacherTrainConfig(out=str(tmp_path), num_layers=1))
    save_pretrained_dir(tmp_path / "t", transformer, build_text_encoder(tok), tok, {"step": 0})
    bb = ShapesBackbone.from_pretrained(tmp_path / "t")
    prompts = ["a photo of a red circle", "an image of two squares"]
    sig = bb.sigma_schedule((1000, 750, 500, 250), 32)  # 1, 0.9, 0.75, 0.5, 0
    seeds = [1, 2]  # each image's initial latent comes from its own seeded generator
    z = torch.stack([torch.randn(12, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def run(**kw):
        return sample_images(bb, prompts, seeds, sig, eta=None, resolution_px=32, **kw)

    torch.testing.assert_close(run(guidance=4.0, guidance_max_sigma=1.0), run(guidance=4.0), rtol=0, atol=0)
    torch.testing.assert_close(run(guidance=4.0, guidance_max_sigma=0.0), run(guidance=1.0), rtol=0, atol=0)
    # by hand: unguided Euler steps from 1 and 0.9, guided steps from 0.75 and 0.5
    cond, x = bb.encode_prompts(prompts), z.clone()
    for s, s_next in zip(sig[:-1], sig[1:], strict=True):
        x = x + (s_next - s) * bb.velocity(x, torch.full((2,), s), cond, guidance=4.0 if s <= 0.8 else 1.0)
    interval = run(guidance=4.0, guidance_max_sigma=0.8)
    torch.testing.assert_close(interval, bb.decode(x), rtol=1e-5, atol=1e-5)
    assert (interval - run(guidance=4.0)).abs().max() > 1e-3


@needs_teacher
def test_shapes_eval_lora_rows_and_reuse(tmp_path):
    """`rtdmd-ray shapes eval --lora`: a LoRA row is the teacher with the file merged; re-running reuses it,
    and a changed file (new mtime/size) recomputes it. An all-zero LoRA must reproduce the no-CFG teacher."""
    import os

    from rtdmd_ray.eval.shapes import run_eval
    from rtdmd_ray.models.lora import add_lora, lora_state, save_lora

    teacher = ShapesBackbone.from_pretrained(None)
    add_lora(teacher.transformer, "gen", family="sd3", rank=4, alpha=4.0, init=True, seed=0)  # B = 0
    zero = save_lora(tmp_path / "zero.safetensors", lora_state(teacher.transformer, "gen"), rank=4, alpha=4.0)
    kw = dict(teacher_dir=None, clip_dir=None, out_dir=str(tmp_path / "eval"), n_captions=12, cfg_scale=1.0,
              threads=1, n_diversity_prompts=2, teacher_rows=False)
    info = run_eval(lora_rows={"zero": [str(zero)]}, **kw)
    row = info["rows"]["zero, 4 NFE CPS η=0.9"]
    assert 0.0 <= row["strict"] <= 1.0 and row["lora"][0][0] == str(zero)
    assert (tmp_path / "eval" / "grid.png").is_file()
    # the zero LoRA changes nothing: same as the teacher's own 4-step CPS row without CFG
    both = run_eval(lora_rows={"zero": [str(zero)]}, **{**kw, "teacher_rows": True})
    assert both["rows"]["zero, 4 NFE CPS η=0.9"] == row  # reused, not recomputed
    assert both["rows"]["teacher 4 NFE CPS η=0.9, CFG 1"]["strict"] == row["strict"]
    # paired against teacher-4, caption by caption: identical samples differ by exactly 0 with 0 error
    pair = both["paired"]["zero, 4 NFE CPS η=0.9"]
    assert pair["teacher 4 NFE CPS η=0.9, CFG 1"] == (0.0, 0.0)
    euler = np.asarray(both["rows"]["teacher 4 NFE Euler, CFG 1"]["strict_per_caption"], dtype=float)
    d = np.asarray(row["strict_per_caption"], dtype=float) - euler
    assert pair["teacher 4 NFE Euler, CFG 1"][0] == pytest.approx(d.mean())
    shown = (tmp_path / "eval" / "results.md").read_text()
    assert "zero, 4 NFE CPS η=0.9 − teacher 4 NFE Euler, CFG 1: " in shown
    # a later --lora row is also paired against the first (RL against its cold start): the same file, 0 ± 0
    two = run_eval(lora_rows={"zero": [str(zero)], "again": [str(zero)]}, **kw)
    assert two["paired"]["again, 4 NFE CPS η=0.9"]["zero, 4 NFE CPS η=0.9"] == (0.0, 0.0)
    assert "zero, 4 NFE CPS η=0.9" not in two["paired"]  # never against itself
    os.utime(zero, (1, 1))  # a retrained file: recomputed
    again = run_eval(lora_rows={"zero": [str(zero)]}, **kw)
    assert again["rows"]["zero, 4 NFE CPS η=0.9"]["lora"] != row["lora"]
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        run_eval(lora_rows={"x": [str(tmp_path / "missing.safetensors")]}, **kw)
    # validation: captions of the train split only, and never a test row reused for it
    from rtdmd_ray.shapes.prompts import split_prompts

    val = run_eval(lora_rows={"zero": [str(zero)]}, **{**kw, "split": "validation"})
    assert val["split"] == "validation" and "seconds" in val["rows"]["zero, 4 NFE CPS η=0.9"]
    shown = (tmp_path / "eval" / "grid_prompts.txt").read_text().splitlines()[2:]
    train, test = (set(m["prompt"] for m in ms) for ms in split_prompts(0))
    assert shown and set(shown) <= train and not set(shown) & test
    assert "validation captions" in (tmp_path / "eval" / "results.md").read_text()
    with pytest.raises(ValueError, match="split='dev'"):
        run_eval(lora_rows={}, **{**kw, "split": "dev"})
