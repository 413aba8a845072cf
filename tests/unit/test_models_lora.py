"""LoRA on tiny backbones: targets, trainability, named adapters, published I/O, merging, diffusers export."""

from __future__ import annotations

import json

import pytest
import torch

from rtdmd_ray.models import lora as L
from rtdmd_ray.models.tiny import TINY_RESOLUTION, tiny_backbone

FAMILIES = ("sd3", "flux1", "flux2")
PROMPTS = ["a red cube", "two green cats"]
RANK, ALPHA = 4, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_lora_like(state, seed, scale=0.05):
    """Random A and B (B non-zero, unlike a fresh init) with the keys/shapes of ``state``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in state.items()}


def lora_backbone(family, seed=0, adapters=("generator",)):
    bb = tiny_backbone(family, seed=seed)
    for i, name in enumerate(adapters):
        L.add_lora(bb.transformer, name, family=family, rank=RANK, alpha=ALPHA, seed=100 + i)
    return bb


def inputs(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    return bb.randn_latents(2, TINY_RESOLUTION, g), torch.tensor([0.9, 0.4]), bb.encode_prompts(PROMPTS)


@pytest.fixture(scope="module")
def backbones():
    """One two-adapter backbone per family, plus its encoded inputs (module-scoped: built once)."""
    out = {}
    for fam in FAMILIES:
        bb = lora_backbone(fam, adapters=("generator", "fake_score"))
        out[fam] = (bb, inputs(bb))
    return out


def test_targets_per_family(backbones):
    sd3 = backbones["sd3"][0].transformer
    names = {n for n, _ in L.lora_layers(sd3)}
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.attn.to_add_out" in names
    assert not any(".attn2." in n for n in names)  # SD3.5's dual attention is not a target (as the reference)
    f2 = backbones["flux2"][0].transformer
    names = {n for n, _ in L.lora_layers(f2)}
    n_single = len(f2.single_transformer_blocks)
    for i in range(n_single):  # the single-stream blocks are reached: fused qkv/mlp AND the bare to_out
        assert f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj" in names
        assert f"single_transformer_blocks.{i}.attn.to_out" in names
    assert "transformer_blocks.0.attn.to_out.0" in names and "transformer_blocks.0.attn.add_k_proj" in names
    targets = L.lora_targets("flux2", f2)
    assert targets[-1] == f"single_transformer_blocks.{n_single - 1}.attn.to_out"
    with pytest.raises(ValueError, match="needs the transformer"):
        L.lora_targets("flux2")


@pytest.mark.parametrize("family", FAMILIES)
def test_grads_reach_active_adapter_only(backbones, family):
    bb, (x, sigma, cond) = backbones[family]
    t = bb.transformer
    L.set_trainable(t, ["generator"])
    t.zero_grad(set_to_none=True)
    with L.use_adapters(t, "generator"):
        bb.velocity(x, sigma, cond).square().mean().backward()
    with_grad = {n for n, p in t.named_parameters() if p.grad is not None}
    gen = {n for n, p in t.named_parameters() if ".lora_" in n and ".generator." in n}
    # B starts at 0 so A gets no gradient at init; every B does, and nothing outside the adapter does
    assert with_grad and with_grad <= gen
    assert {n for n in gen if ".lora_B." in n} <= with_grad
    assert all(p.dtype == torch.float32 for p in L.lora_parameters(t, "generator"))
    assert not any(p.requires_grad for n, p in t.named_parameters() if ".lora_" not in n)
    t.zero_grad(set_to_none=True)
    L.set_trainable(t, ["generator", "fake_score"])


def test_switching_adapters_and_teacher(backbones):
    bb, (x, sigma, cond) = backbones["sd3"]
    t = bb.transformer
    plain = tiny_backbone("sd3", seed=0)  # same base weights, no LoRA
    saved = {a: {k: v.clone() for k, v in L.lora_state(t, a).items()} for a in ("generator", "fake_score")}
    L.load_lora_state(t, "generator", random_lora_like(saved["generator"], 1))
    L.load_lora_state(t, "fake_score", random_lora_like(saved["fake_score"], 2))
    grads = {n: p.requires_grad for n, p in t.named_parameters()}
    try:
        with torch.no_grad():
            v_base = plain.velocity(x, sigma, cond)
            with L.use_adapters(t, None):
                v_teacher = bb.velocity(x, sigma, cond)
            with L.use_adapters(t, "generator"):
                v_gen = bb.velocity(x, sigma, cond)
                with L.use_adapters(t, "fake_score"):
                    v_fake = bb.velocity(x, sigma, cond)
                assert torch.equal(bb.velocity(x, sigma, cond), v_gen)  # restored on exit
            with L.use_adapters(t, ["generator", "fake_score"]):
                v_both = bb.velocity(x, sigma, cond)
        torch.testing.assert_close(v_teacher, v_base)
        assert not torch.allclose(v_gen, v_base, atol=1e-4) and not torch.allclose(v_gen, v_fake, atol=1e-4)
        # both active: their deltas add (equality with a merged base is tested in test_merge_in_order_*)
        assert not torch.allclose(v_both, v_gen, atol=1e-4) and not torch.allclose(v_both, v_fake, atol=1e-4)
        assert grads == {n: p.requires_grad for n, p in t.named_parameters()}  # switching never touches grads
        with pytest.raises(KeyError, match="add them with add_lora"):
            L.use_adapters_now(t, "nope")
    finally:
        for a, st in saved.items():
            L.load_lora_state(t, a, st)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_state_round_trip_bit_exact(backbones, family, tmp_path):
    bb, _ = backbones[family]
    t = bb.transformer
    original = {k: v.clone() for k, v in L.lora_state(t, "generator").items()}
    state = random_lora_like(original, 7)
    try:
        L.load_lora_state(t, "generator", state)
        got = L.lora_state(t, "generator")
        assert all(torch.equal(got[k], state[k]) for k in state)
        targets = L.lora_targets(family, t)
        for path in (tmp_path / "generator_ema.pt", tmp_path / "ours.safetensors"):
            L.save_lora(path, got, rank=RANK, alpha=ALPHA, target_modules=targets, family=family)
        L.save_peft_dir(
            tmp_path / "ckpt" / "transformer", got, rank=RANK, alpha=ALPHA, target_modules=targets
        )
        for src in (tmp_path / "generator_ema.pt", tmp_path / "ours.safetensors", tmp_path / "ckpt"):
            lf = L.load_lora_file(src)
            L.load_lora_state(t, "fake_score", lf.tensors)
            fake = L.lora_state(t, "fake_score")
            assert all(torch.equal(fake[k], state[k]) for k in state), src
        # rank/alpha travel with our safetensors and the PEFT dir, the .pt uses the fallbacks (32/64)
        assert (
            L.load_lora_file(tmp_path / "ours.safetensors").rank,
            L.load_lora_file(tmp_path / "ckpt").alpha,
        ) == (RANK, ALPHA)
        assert L.load_lora_file(tmp_path / "generator_ema.pt").scale == 2.0
        # the .pt is the published format: a plain dict loadable with weights_only=True
        raw = torch.load(tmp_path / "generator_ema.pt", weights_only=True)
        assert set(raw) == set(state) and all(
            ".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in raw
        )
    finally:
        L.load_lora_state(t, "generator", original)


def test_published_key_format_loads_with_zero_missing(backbones):
    """A synthetic generator_ema.pt-style dict (with the prefixes seen in the wild) loads completely."""
    bb, _ = backbones["flux2"]
    t = bb.transformer
    original = {k: v.clone() for k, v in L.lora_state(t, "fake_score").items()}
    synthetic = {}
    for name, layer in L.lora_layers(t):
        a = layer.lora_A["fake_score"].weight
        b = layer.lora_B["fake_score"].weight
        synthetic[f"{name}.lora_A.default.weight"] = torch.randn(a.shape, dtype=torch.bfloat16)
        synthetic[f"{name}.lora_B.default.weight"] = torch.randn(b.shape, dtype=torch.bfloat16)
    assert any(k.startswith("single_transformer_blocks.0.attn.to_out.lora_A") for k in synthetic)
    try:
        for prefix in ("", "module.", "base_model.model.", "_orig_mod.module."):
            report = L.load_lora_state(
                t, "fake_score", {prefix + k: v for k, v in synthetic.items()}, strict=True
            )
            assert report.loaded == len(synthetic) and report.missing == [] and report.unexpected == []
        got = L.lora_state(t, "fake_score")
        assert all(torch.equal(got[k], synthetic[k].float()) for k in synthetic)  # bf16 -> fp32 is exact
        with pytest.raises(ValueError, match="1 missing"):
            L.load_lora_state(t, "fake_score", dict(list(synthetic.items())[1:]))
        with pytest.raises(ValueError, match="no LoRA tensor matched"):
            L.load_lora_state(t, "fake_score", {"foo.lora_A.default.weight": torch.zeros(1)}, strict=False)
    finally:
        L.load_lora_state(t, "fake_score", original)


def test_lora_file_validation(tmp_path):
    assert not L.is_lora_checkpoint({})
    assert L.is_lora_checkpoint({"a.lora_A.weight": 0, "a.lora_B.default.weight": 0})
    torch.save(
        {"a.lora_A.default.weight": torch.zeros(2, 3), "a.weight": torch.zeros(3, 3)}, tmp_path / "full.pt"
    )
    with pytest.raises(ValueError, match="not a LoRA-only checkpoint"):
        L.load_lora_file(tmp_path / "full.pt")
    with pytest.raises(FileNotFoundError, match="expected a PEFT directory"):
        L.load_lora_file(tmp_path / "missing.pt")
    d = tmp_path / "peft"
    L.save_peft_dir(
        d,
        {"a.lora_A.default.weight": torch.zeros(2, 3), "a.lora_B.default.weight": torch.zeros(3, 2)},
        rank=16,
        alpha=8,
        target_modules=["a"],
    )
    assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lf = L.load_lora_file(d)
    assert (lf.rank, lf.alpha, lf.scale) == (16, 8.0, 0.5)  # adapter_config.json overrides the fallbacks
    assert L.canonical_key("module._orig_mod.base_model.model.x.y.lora_B.gen.weight") == ("x.y", "B")


def _plain_linear_weights(t, names):
    params = dict(t.named_parameters())
    return {n: params[f"{n}.weight"].detach().clone() for n in names}


def test_merge_in_order_equals_sum_of_deltas_and_stacked_adapters():
    base = tiny_backbone("sd3", seed=0)
    donor = lora_backbone("sd3", adapters=("cold", "rl"))
    l1 = random_lora_like(L.lora_state(donor.transformer, "cold"), 11)
    l2 = random_lora_like(L.lora_state(donor.transformer, "rl"), 12)
    paths = sorted({L.canonical_key(k)[0] for k in l1})
    w0 = _plain_linear_weights(base.transformer, paths)
    r1 = L.merge_lora_into_base(base.transformer, l1, rank=RANK, alpha=ALPHA)
    r2 = L.merge_lora_into_base(base.transformer, l2, rank=RANK, alpha=ALPHA)
    assert (r1.merged, r1.skipped, r2.merged) == (len(paths), 0, len(paths))
    w = _plain_linear_weights(base.transformer, paths)
    s = ALPHA / RANK
    for p in paths:
        expected = (
            w0[p]
            + s * l1[f"{p}.lora_B.default.weight"] @ l1[f"{p}.lora_A.default.weight"]
            + s * l2[f"{p}.lora_B.default.weight"] @ l2[f"{p}.lora_A.default.weight"]
        )
        torch.testing.assert_close(w[p], expected, rtol=1e-6, atol=1e-6)
    # the same two LoRAs as stacked live adapters on ONE base give the merged model's velocity
    L.load_lora_state(donor.transformer, "cold", l1)
    L.load_lora_state(donor.transformer, "rl", l2)
    x, sigma, cond = inputs(base)
    with torch.no_grad(), L.use_adapters(donor.transformer, ["cold", "rl"]):
        v_stacked = donor.velocity(x, sigma, cond)
    with torch.no_grad():
        v_merged = base.velocity(x, sigma, cond)
    torch.testing.assert_close(v_stacked, v_merged, rtol=1e-4, atol=1e-5)


def test_merge_report_transposed_skipped_and_empty():
    t = tiny_backbone("sd3", seed=0).transformer
    layer = "transformer_blocks.0.ff.net.0.proj"  # any Linear merges; a non-square one tells Δ from Δᵀ
    w = dict(t.named_parameters())[f"{layer}.weight"]  # [out, in]
    out_f, in_f = w.shape
    assert out_f != in_f
    before = w.detach().clone()
    a, b = torch.randn(RANK, in_f), torch.randn(out_f, RANK)
    tensors = {
        # stored transposed: B' @ A' = (B @ A)^T, which fits W only transposed
        f"{layer}.lora_A.default.weight": b.T.contiguous(),
        f"{layer}.lora_B.default.weight": a.T.contiguous(),
        "transformer_blocks.0.attn.nope.lora_A.default.weight": a,  # no such module
        "transformer_blocks.0.attn.nope.lora_B.default.weight": b,
        "transformer_blocks.0.attn.to_k.lora_A.default.weight": a,  # incomplete pair
    }
    rep = L.merge_lora_into_base(t, tensors, rank=RANK, alpha=ALPHA)
    assert (rep.merged, rep.skipped) == (1, 2)
    torch.testing.assert_close(w.detach(), before + 2.0 * (b @ a), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="merged 0"):
        L.merge_lora_into_base(t, {"x.lora_A.weight": a, "x.lora_B.weight": b})


def test_merge_lora_files_in_order(tmp_path):
    donor = lora_backbone("flux1", adapters=("cold", "rl"))
    l1 = random_lora_like(L.lora_state(donor.transformer, "cold"), 21)
    l2 = random_lora_like(L.lora_state(donor.transformer, "rl"), 22)
    L.save_lora(tmp_path / "cold.pt", l1)
    L.save_peft_dir(tmp_path / "rl_ckpt" / "transformer", l2, rank=RANK, alpha=ALPHA, target_modules=["x"])
    merged = tiny_backbone("flux1", seed=0)
    # the .pt has no config: pass the fallbacks the run used; the PEFT dir carries its own
    reps = L.merge_lora_files(merged.transformer, [tmp_path / "cold.pt"], rank=RANK, alpha=ALPHA)
    reps += L.merge_lora_files(merged.transformer, [tmp_path / "rl_ckpt"])
    assert all(r.merged > 0 and r.skipped == 0 for r in reps)
    L.load_lora_state(donor.transformer, "cold", l1)
    L.load_lora_state(donor.transformer, "rl", l2)
    x, sigma, cond = inputs(merged)
    with torch.no_grad(), L.use_adapters(donor.transformer, ["cold", "rl"]):
        torch.testing.assert_close(
            merged.velocity(x, sigma, cond), donor.velocity(x, sigma, cond), rtol=1e-4, atol=1e-5
        )


def test_merge_before_training_folds_then_reinits():
    bb = lora_backbone("sd3", adapters=("generator",))
    t = bb.transformer
    cold = random_lora_like(L.lora_state(t, "generator"), 31)
    L.load_lora_state(t, "generator", cold)
    x, sigma, cond = inputs(bb)
    with torch.no_grad():
        v_before = bb.velocity(x, sigma, cond)
    L.merge_before_training(t, "generator", cold, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v_after = bb.velocity(x, sigma, cond)  # B = 0 again: output = merged base
    torch.testing.assert_close(v_after, v_before, rtol=1e-4, atol=1e-5)
    state = L.lora_state(t, "generator")
    a = torch.cat([v.flatten() for k, v in state.items() if ".lora_A." in k])
    assert all(torch.all(v == 0) for k, v in state.items() if ".lora_B." in k)
    assert abs(a.std().item() - 1.0 / RANK) < 0.03  # peft gaussian init std 1/r
    L.merge_before_training(t, "generator", L.lora_state(t, "generator"), reinit_a_std=1.0)
    a = torch.cat([v.flatten() for k, v in L.lora_state(t, "generator").items() if ".lora_A." in k])
    assert abs(a.std().item() - 1.0) < 0.1  # the reference's std 1
    with pytest.raises(ValueError, match="differs from adapter"):
        L.merge_before_training(t, "generator", L.LoraFile(cold, rank=RANK, alpha=RANK))


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_export_loads_back(family, tmp_path):
    import diffusers

    bb = lora_backbone(family, adapters=("generator",))
    state = random_lora_like(L.lora_state(bb.transformer, "generator"), 41)
    L.load_lora_state(bb.transformer, "generator", state)
    x, sigma, cond = inputs(bb)
    with torch.no_grad():
        v_ours = bb.velocity(x, sigma, cond)
    path = L.export_diffusers_lora(tmp_path, state, family=family, rank=RANK, alpha=ALPHA)
    assert path.name == "pytorch_lora_weights.safetensors"
    # the diffusers pipeline loader on a fresh copy of the same base
    fresh = tiny_backbone(family, seed=0)
    pipe_cls = getattr(diffusers, L._DIFFUSERS_PIPELINES[family])
    comps = {k: v for k, v in fresh.components().items()}
    pipe = pipe_cls(**comps)
    pipe.load_lora_weights(tmp_path, adapter_name="exported")
    with torch.no_grad():
        v_diffusers = fresh.velocity(x, sigma, cond)
    torch.testing.assert_close(v_diffusers, v_ours, rtol=1e-4, atol=1e-5)
    # and our reader takes the export back with its rank/alpha
    lf = L.load_lora_file(path)
    assert (lf.rank, lf.alpha) == (RANK, ALPHA) and set(lf.tensors) == set(state)


def test_save_merged_transformer_changes_targeted_layers(tmp_path):
    """Regression for the reference's merge tool, which saved the unmodified base (spec §5.12)."""
    from diffusers import SD3Transformer2DModel

    bb = lora_backbone("sd3", adapters=("generator",))
    state = random_lora_like(L.lora_state(bb.transformer, "generator"), 51)
    L.load_lora_state(bb.transformer, "generator", state)
    L.save_merged_transformer(bb.transformer, "generator", tmp_path / "merged")
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "merged")
    base = tiny_backbone("sd3", seed=0).transformer
    mp, bp = dict(merged.named_parameters()), dict(base.named_parameters())
    assert not torch.equal(
        mp["transformer_blocks.0.attn.to_q.weight"], bp["transformer_blocks.0.attn.to_q.weight"]
    )
    assert torch.equal(
        mp["transformer_blocks.0.ff.net.0.proj.weight"], bp["transformer_blocks.0.ff.net.0.proj.weight"]
    )
    x, sigma, cond = inputs(bb)
    plain = tiny_backbone("sd3", seed=0)
    plain.transformer = merged
    with torch.no_grad():
        torch.testing.assert_close(
            plain.velocity(x, sigma, cond), bb.velocity(x, sigma, cond), rtol=1e-4, atol=1e-5
        )


def test_bf16_base_keeps_fp32_adapters():
    bb = tiny_backbone("flux1", seed=0)
    bb.transformer.to(torch.bfloat16)
    L.add_lora(bb.transformer, "generator", family="flux1", rank=RANK, alpha=ALPHA, seed=0)
    params = L.lora_parameters(bb.transformer, "generator")
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert all(p.dtype == torch.bfloat16 for n, p in bb.transformer.named_parameters() if ".lora_" not in n)
    x, sigma, cond = inputs(bb)
    with torch.autocast("cpu", enabled=False):
        v = bb.velocity(x, sigma, cond)
    assert v.dtype == torch.float32
    v.square().mean().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in params)
    assert any(p.grad is not None for p in params)
