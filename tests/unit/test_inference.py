"""Sampling for `rtdmd-ray sample` / `eval` on the tiny random SD3-family backbone (stages/inference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdmd_ray.config import apply_overrides, load_config
from rtdmd_ray.stages.inference import (
    PNG_HASH_KEY,
    PNG_PROMPT_KEY,
    PNG_SEED_KEY,
    BaseWeights,
    InferencePipeline,
    SamplerSettings,
    config_hash,
    from_uint8,
    image_seed,
    read_png,
    sample_to_dir,
    teacher_step_list,
    to_uint8,
)

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a photo of a cat", "a city at night"]
BASE = ["stage=inference", "model.resolution_px=16", "eval.batch_images=2"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/debug/tiny_sd3.yaml", BASE)


@pytest.fixture(scope="module")
def base():
    """One tiny backbone shared by the tests (each pipeline restores the base weights it modified)."""
    return BaseWeights()


def _lora_tensors(transformer: torch.nn.Module, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Random published-format LoRA tensors (non-zero B, so merging changes the weights) for the attention
    projections of the tiny transformer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(("attn.to_q", "attn.to_v", "attn.add_k_proj")):
            out[f"{name}.lora_A.default.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.3
            out[f"{name}.lora_B.default.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.3
    assert out, "no LoRA target found in the tiny transformer"
    return out


def test_image_seed_depends_on_base_and_index_only():
    seeds = {image_seed(42, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert image_seed(42, 7) == image_seed(42, 7) != image_seed(43, 7)
    with pytest.raises(ValueError):
        image_seed(42, -1)


def test_teacher_step_list_and_settings(cfg):
    assert teacher_step_list(4) == (1000.0, 750.0, 500.0, 250.0)
    assert len(teacher_step_list(50)) == 50 and teacher_step_list(50)[-1] == 20.0
    too_many = apply_overrides(cfg, ["eval.num_steps=5"], validate=False)
    with pytest.raises(ValueError, match="eval.num_steps=5"):
        SamplerSettings.from_config(too_many)
    teacher = SamplerSettings.from_config(apply_overrides(cfg, ["eval.mode=teacher", "eval.num_steps=50"]))
    want = {"mode": "teacher", "num_steps": 50, "resolution_px": 16, "guidance_scale": 1.0}
    assert teacher.describe() == want


def test_config_hash_tracks_what_changes_images(cfg, tmp_path):
    h = config_hash(cfg)
    assert config_hash(apply_overrides(cfg, ["eval.noise_level=0.5"])) != h
    # CFG does not act on distilled sampling, and the batch size never changes an image
    assert config_hash(apply_overrides(cfg, ["eval.guidance_scale=3.0", "eval.batch_images=3"])) == h
    assert config_hash(apply_overrides(cfg, ["train.seed=1"])) != h  # tiny weights come from the seed
    lora = tmp_path / "a.pt"
    lora.write_bytes(b"x")
    with_lora = apply_overrides(cfg, [f"inference.lora_paths=[{lora}]"])
    h1 = config_hash(with_lora)
    lora.write_bytes(b"y")  # same path, new content: a new hash
    assert h1 != config_hash(with_lora) != h


def test_images_depend_on_seed_not_on_batch(cfg, base):
    pipe = InferencePipeline.from_config(cfg, device="cpu", base=base)
    seeds = [image_seed(42, i) for i in range(len(PROMPTS))]
    together = pipe.generate(PROMPTS, seeds)
    assert together.shape == (5, 3, 16, 16) and 0 <= together.min() and together.max() <= 1
    split = torch.cat([pipe.generate(PROMPTS[:2], seeds[:2]), pipe.generate(PROMPTS[2:], seeds[2:])])
    reversed_ = pipe.generate(PROMPTS[::-1], seeds[::-1]).flip(0)
    # same seeds: the same images up to BLAS round-off between batch shapes (~1e-6)
    assert (together - split).abs().max() < 1e-4
    assert (together - reversed_).abs().max() < 1e-4
    other = pipe.generate(PROMPTS, [image_seed(43, i) for i in range(5)])
    assert (together - other).abs().mean() > 1e-2  # another base seed: other images
    # CPS noise matters: eta = 0 gives other images from the same seeds
    eta0 = apply_overrides(cfg, ["eval.noise_level=0.0"])
    det = InferencePipeline.from_config(eta0, device="cpu", base=base)
    assert (det.generate(PROMPTS, seeds) - together).abs().mean() > 1e-3


def test_one_step_samplers_are_the_x0_prediction(cfg, base):
    """A 1-step distilled sample and a 1-step teacher sample are both decode(x - v(x, 1)); CFG combines the
    conditional and unconditional velocities as v_u + g (v_c - v_u)."""
    one = apply_overrides(cfg, ["eval.num_steps=1"])  # the first distilled step only: sigmas [1, 0]
    distilled = InferencePipeline.from_config(one, device="cpu", base=base)
    one_teacher = apply_overrides(one, ["eval.mode=teacher"])
    teacher = InferencePipeline.from_config(one_teacher, device="cpu", base=base)
    g = 3.0
    teacher_cfg = InferencePipeline.from_config(
        apply_overrides(one, ["eval.mode=teacher", f"eval.guidance_scale={g}"]), device="cpu", base=base
    )
    bb = distilled.backbone
    seeds = [image_seed(0, i) for i in range(3)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(bb.latent_shape(16), generator=g) for g in gens])
    sigma = torch.ones(3)
    with torch.no_grad():
        cond = bb.encode_prompts(PROMPTS[:3])
        v_c = bb.velocity(x, sigma, cond)
        v_u = bb.velocity(x, sigma, bb.empty_conditioning(3))
        expect = bb.decode(x - v_c)
        expect_cfg = bb.decode(x - (v_u + g * (v_c - v_u)))
    assert torch.allclose(distilled.generate(PROMPTS[:3], seeds), expect, atol=1e-5)
    assert torch.allclose(teacher.generate(PROMPTS[:3], seeds), expect, atol=1e-5)
    got_cfg = teacher_cfg.generate(PROMPTS[:3], seeds)
    assert torch.allclose(got_cfg, expect_cfg, atol=1e-4)
    assert (got_cfg - expect).abs().mean() > 1e-3


def test_lora_stack_merges_in_order_and_base_is_restored(cfg, base, tmp_path):
    from rtdmd_ray.models.lora import merge_lora_into_base, save_lora

    plain = InferencePipeline.from_config(cfg, device="cpu", base=base)
    seeds = [image_seed(42, i) for i in range(3)]
    ref = plain.generate(PROMPTS[:3], seeds)
    t = plain.backbone.transformer
    a, b = _lora_tensors(t, 1), _lora_tensors(t, 2)
    path_a = save_lora(tmp_path / "cold_start" / "generator_ema.pt", a)  # published format: fallback r/alpha
    path_b = save_lora(tmp_path / "rl" / "generator_ema.safetensors", b, rank=4, alpha=8.0)  # ours: r/alpha
    stack = apply_overrides(
        cfg,
        [f"inference.lora_paths=[{path_a}, {path_b}]", "inference.fallback_lora_rank=4",
         "inference.fallback_lora_alpha=4.0"],
    )
    pipe = InferencePipeline.from_config(stack, device="cpu", base=base)
    assert [(e.rank, e.alpha, e.skipped_pairs) for e in pipe.loras] == [(4, 4.0, 0), (4, 8.0, 0)]
    assert pipe.loras[0].merged_pairs == len(a) // 2
    got = pipe.generate(PROMPTS[:3], seeds)
    assert (got - ref).abs().mean() > 1e-3

    # the same stack merged by hand into a fresh base gives the same images
    fresh = InferencePipeline.from_config(cfg, device="cpu")
    merge_lora_into_base(fresh.backbone.transformer, a, rank=4, alpha=4.0)
    merge_lora_into_base(fresh.backbone.transformer, b, rank=4, alpha=8.0)
    assert torch.allclose(fresh.generate(PROMPTS[:3], seeds), got, atol=1e-5)

    # back to no LoRA on the shared base: the merges are undone bit-exactly
    again = InferencePipeline.from_config(cfg, device="cpu", base=base)
    assert again.backbone is plain.backbone
    assert torch.equal(again.generate(PROMPTS[:3], seeds), ref)


def test_missing_lora_names_the_config_key(cfg, tmp_path):
    bad = apply_overrides(cfg, [f"inference.lora_paths=[{tmp_path / 'nope.pt'}]"])
    with pytest.raises(FileNotFoundError, match="inference.lora_paths"):
        InferencePipeline.from_config(bad, device="cpu")


def test_uint8_round_trip_and_png_metadata(tmp_path):
    from rtdmd_ray.stages.inference import encode_png

    x = torch.rand(2, 3, 5, 7)
    u8 = to_uint8(x)
    assert u8.shape == (2, 5, 7, 3) and u8.dtype == np.uint8
    assert torch.allclose(from_uint8(u8), x, atol=0.5 / 255 + 1e-7)
    path = tmp_path / "a.png"
    path.write_bytes(encode_png(u8[0], {PNG_SEED_KEY: "123", PNG_PROMPT_KEY: "a cat ✓"}))
    arr, info = read_png(path)
    assert np.array_equal(arr, u8[0]) and info == {PNG_SEED_KEY: "123", PNG_PROMPT_KEY: "a cat ✓"}


def test_sample_to_dir_is_reproducible(cfg, tmp_path):
    paths = sample_to_dir(cfg, PROMPTS[:2], tmp_path / "s1", seed=7, images_per_prompt=2, device="cpu")
    assert [p.name for p in paths] == ["000_00.png", "000_01.png", "001_00.png", "001_01.png"]
    arr, info = read_png(paths[3])
    assert arr.shape == (16, 16, 3)
    assert info[PNG_PROMPT_KEY] == PROMPTS[1] and info[PNG_SEED_KEY] == str(image_seed(7, 3))
    assert info[PNG_HASH_KEY] == config_hash(cfg)
    again = sample_to_dir(cfg, PROMPTS[:2], tmp_path / "s2", seed=7, images_per_prompt=2, device="cpu")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert not np.array_equal(read_png(paths[0])[0], read_png(paths[1])[0])  # two seeds, two images
