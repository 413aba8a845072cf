"""Backbones on tiny in-code models: text stacks, latent layouts, CFG, schedules, decode, loading, errors."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from rtdmd_ray.algorithms.cps import cps_step
from rtdmd_ray.algorithms.schedules import sigma_schedule
from rtdmd_ray.models import build_backbone
from rtdmd_ray.models.base import Conditioning, FlowBackbone
from rtdmd_ray.models.flux1 import Flux1Backbone, latent_image_ids, pack_latents, unpack_latents
from rtdmd_ray.models.flux2 import (
    Flux2Backbone,
    flatten_latents,
    latent_ids,
    patchify,
    text_ids,
    unflatten_latents,
    unpatchify,
)
from rtdmd_ray.models.loading import MissingWeightsError
from rtdmd_ray.models.sd3 import SD3Backbone
from rtdmd_ray.models.tiny import TINY_RESOLUTION, tiny_backbone

FAMILIES = ("sd3", "flux1", "flux2")
STEPS = (1000, 750, 500, 250)
PROMPTS = ["a red cube left of a blue ball", "two green cats"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return {f: tiny_backbone(f, seed=0) for f in FAMILIES}


def sample_cps(bb, cond, *, eta=0.9, seed=0, resolution=TINY_RESOLUTION):
    """4-step CPS rollout; returns the final x0, the per-step log-probs [B, 4] and the schedule."""
    sigmas = bb.sigma_schedule(STEPS, resolution)
    gen = torch.Generator().manual_seed(seed)
    x = bb.randn_latents(cond.batch_size, resolution, gen)
    logps = []
    for i in range(len(STEPS)):
        s = torch.full((x.shape[0],), sigmas[i])
        v = bb.velocity(x, s, cond)
        step = cps_step(x, v, sigmas[i], sigmas[i + 1], eta, generator=gen)
        x = step.sample
        logps.append(step.log_prob)
    return x, torch.stack(logps, dim=1), sigmas


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_sample_decode(tiny, family):
    bb = tiny[family]
    assert isinstance(bb, FlowBackbone)
    cond = bb.encode_prompts(PROMPTS)
    assert cond.batch_size == 2
    # different prompts give different conditioning (the byte-level tokenizers see every character)
    emb = cond.tensors["prompt_embeds"]
    assert not torch.allclose(emb[0], emb[1])
    x0, logp, sigmas = sample_cps(bb, cond)
    assert x0.shape == (2, *bb.latent_shape(TINY_RESOLUTION))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 5
    assert logp.shape == (2, 4) and torch.all(logp[:, -1] == 0) and torch.all(logp[:, :-1] < 0)
    images = bb.decode(x0)
    assert images.shape == (2, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    # seeded end to end: the same seed reproduces, another seed does not
    again, _, _ = sample_cps(bb, cond)
    other, _, _ = sample_cps(bb, cond, seed=1)
    assert torch.equal(x0, again) and not torch.allclose(x0, other)


def test_tiny_backbone_is_seeded_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_backbone("sd3", seed=3), tiny_backbone("sd3", seed=3), tiny_backbone("sd3", seed=4)
    assert torch.rand(1) == before
    wa, wb, wc = (next(iter(m.transformer.parameters())) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("family", ["sd3", "flux2"])
def test_classic_cfg_uses_empty_prompt(tiny, family):
    bb = tiny[family]
    cond = bb.encode_prompts(PROMPTS)
    x = bb.randn_latents(2, TINY_RESOLUTION, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.5])
    v_c = bb.velocity(x, sigma, cond)
    v_u = bb.velocity(x, sigma, bb.encode_prompts(["", ""]))
    v = bb.velocity(x, sigma, cond, guidance=4.5)
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    # an explicit single-row uncond is broadcast like the cached empty prompt
    v_explicit = bb.velocity(x, sigma, cond, guidance=4.5, uncond=bb.encode_prompts([""]))
    torch.testing.assert_close(v, v_explicit, rtol=1e-5, atol=1e-6)


def test_flux1_distilled_guidance_is_one_pass(tiny):
    bb = tiny["flux1"]
    assert bb.guidance_embeds
    cond = bb.encode_prompts(PROMPTS)
    x = bb.randn_latents(2, TINY_RESOLUTION, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.5])
    v1, v35 = bb.velocity(x, sigma, cond, 1.0), bb.velocity(x, sigma, cond, 3.5)
    assert not torch.allclose(v1, v35)
    # uncond is ignored with embedded guidance
    torch.testing.assert_close(v35, bb.velocity(x, sigma, cond, 3.5, uncond=bb.encode_prompts(["x", "y"])))


def test_velocity_timestep_conventions(tiny, monkeypatch):
    """SD3 receives t = 1000 sigma; FLUX.1 / FLUX.2 receive sigma (they multiply by 1000 inside)."""
    seen = {}
    for family in FAMILIES:
        bb = tiny[family]
        orig = bb.transformer.forward

        def spy(*args, _orig=orig, _family=family, **kwargs):
            seen[_family] = kwargs["timestep"].detach().clone()
            return _orig(*args, **kwargs)

        monkeypatch.setattr(bb.transformer, "forward", spy)
        cond = bb.encode_prompts(PROMPTS)
        bb.velocity(bb.randn_latents(2, TINY_RESOLUTION), torch.tensor([0.75, 0.25]), cond)
    assert torch.allclose(seen["sd3"], torch.tensor([750.0, 250.0]))
    assert torch.allclose(seen["flux1"], torch.tensor([0.75, 0.25]))
    assert torch.allclose(seen["flux2"], torch.tensor([0.75, 0.25]))


def test_sd3_text_concatenation_tiny(tiny):
    bb = tiny["sd3"]
    cond = bb.encode_prompts(PROMPTS)
    emb, pooled = cond.tensors["prompt_embeds"], cond.tensors["pooled"]
    d1 = bb.text_encoders["text_encoder"].config.hidden_size
    d2 = bb.text_encoders["text_encoder_2"].config.hidden_size
    d_t5 = bb.text_encoders["text_encoder_3"].config.d_model
    assert emb.shape == (2, 77 + 128, d_t5)
    assert torch.all(emb[:, :77, d1 + d2 :] == 0)  # CLIP features zero-padded to T5's width
    assert emb[:, :77, : d1 + d2].abs().sum() > 0
    p1 = bb.text_encoders["text_encoder"].config.projection_dim
    p2 = bb.text_encoders["text_encoder_2"].config.projection_dim
    assert pooled.shape == (2, p1 + p2)
    # the T5 block is T5 at 128 tokens, unchanged
    ids = bb.tokenizers["tokenizer_3"](
        PROMPTS, padding="max_length", max_length=128, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        t5 = bb.text_encoders["text_encoder_3"](ids).last_hidden_state
    torch.testing.assert_close(emb[:, 77:], t5)


def test_sd3_text_concatenation_real_dims():
    """Spec §7.8 with the real encoder widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096), on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    small = tiny_backbone("sd3")

    def clip(hidden, layers, heads):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=hidden,
                intermediate_size=4 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                projection_dim=hidden,
                vocab_size=49408,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )

    with torch.device("meta"):
        encoders = {
            "text_encoder": clip(768, 12, 12),
            "text_encoder_2": clip(1280, 32, 20),
            "text_encoder_3": T5EncoderModel(
                T5Config(
                    d_model=4096,
                    d_ff=10240,
                    d_kv=64,
                    num_heads=64,
                    num_layers=24,
                    vocab_size=32128,
                    feed_forward_proj="gated-gelu",
                )
            ),
        }
    real = SD3Backbone(
        transformer=small.transformer,
        vae=small.vae,
        scheduler=small.scheduler,
        text_encoders=encoders,
        tokenizers=small.tokenizers,
        device="meta",
    )
    cond = real.encode_prompts(PROMPTS)
    assert cond.tensors["prompt_embeds"].shape == (2, 205, 4096)
    assert cond.tensors["pooled"].shape == (2, 2048)


def test_flux1_and_flux2_text_shapes(tiny):
    c1 = tiny["flux1"].encode_prompts(PROMPTS)
    assert c1.tensors["prompt_embeds"].shape == (
        2,
        512,
        tiny["flux1"].text_encoders["text_encoder_2"].config.d_model,
    )
    assert c1.tensors["pooled"].shape == (2, tiny["flux1"].text_encoders["text_encoder"].config.hidden_size)
    bb = tiny["flux2"]
    c2 = bb.encode_prompts(PROMPTS)
    hidden = bb.text_encoders["text_encoder"].config.hidden_size
    assert c2.tensors["prompt_embeds"].shape == (2, 512, 3 * hidden)
    # layers (9, 18, 27) of the chat-templated prompt, concatenated per token on the feature axis
    chat = bb.chat_text(PROMPTS[0])
    assert chat.startswith("<|im_start|>user\n" + PROMPTS[0]) and chat.endswith("<think>\n\n</think>\n\n")
    enc = bb.tokenizers["tokenizer"](
        [chat], padding="max_length", max_length=512, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        hs = bb.text_encoders["text_encoder"].model(**enc, output_hidden_states=True).hidden_states
    expected = torch.cat([hs[9][0], hs[18][0], hs[27][0]], dim=-1)
    torch.testing.assert_close(c2.tensors["prompt_embeds"][0], expected)


def test_flux1_pack_unpack_round_trip_and_ids():
    x = torch.randn(2, 16, 64, 64)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 1024, 64)
    assert torch.equal(unpack_latents(tokens, 64, 64), x)
    # token (r, c) carries channel-major 2x2 patch: feature c*4 + i*2 + j = x[c, 2r+i, 2c+j]
    r, col = 3, 5
    patch = x[0, :, 2 * r : 2 * r + 2, 2 * col : 2 * col + 2].reshape(-1)
    assert torch.equal(tokens[0, r * 32 + col], patch)
    ids = latent_image_ids(64, 64)
    assert ids.shape == (1024, 3)
    assert torch.all(ids[:, 0] == 0)
    assert ids[r * 32 + col].tolist() == [0.0, float(r), float(col)]
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 7, 8))


def test_flux2_layouts_round_trip():
    z = torch.randn(2, 128, 8, 6)
    assert torch.equal(unflatten_latents(flatten_latents(z), 8, 6), z)
    assert torch.equal(flatten_latents(z)[1, 2 * 6 + 3], z[1, :, 2, 3])  # rows major
    assert torch.equal(patchify(unpatchify(z)), z)
    # unpatchify index mapping: channel c*4 + i*2 + j -> sub-pixel (i, j)
    a = torch.arange(8 * 2 * 3, dtype=torch.float32).reshape(1, 8, 2, 3)
    u = unpatchify(a)
    assert u.shape == (1, 2, 4, 6)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(u[0, c, i::2, j::2], a[0, c * 4 + i * 2 + j])
    ids = latent_ids(3, 4)
    assert ids.shape == (12, 4) and ids[5].tolist() == [0, 1, 1, 0] and torch.all(ids[:, [0, 3]] == 0)
    t = text_ids(7)
    assert t.shape == (7, 4) and t[:, 3].tolist() == list(range(7)) and torch.all(t[:, :3] == 0)


def test_decode_applies_vae_scaling_and_batch_norm(tiny):
    sd3 = tiny["sd3"]
    z = torch.randn(1, *sd3.latent_shape(TINY_RESOLUTION))
    with torch.no_grad():
        ref = sd3.vae.decode(z / 1.5305 + 0.0609).sample
    torch.testing.assert_close(sd3.decode(z), (ref / 2 + 0.5).clamp(0, 1))
    f2 = tiny["flux2"]
    z = torch.randn(1, *f2.latent_shape(TINY_RESOLUTION))
    bn = f2.vae.bn
    den = z * torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + f2.vae.config.batch_norm_eps
    ) + bn.running_mean.view(1, -1, 1, 1)
    with torch.no_grad():
        ref = f2.vae.decode(unpatchify(den)).sample
    torch.testing.assert_close(f2.decode(z), (ref / 2 + 0.5).clamp(0, 1))
    # decode is differentiable with respect to the latents (BP rewards)
    z.requires_grad_(True)
    f2.decode(z).mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_sigma_schedule_matches_spec_at_real_geometry():
    """The backbone's schedule with the real VAE / transformer geometry reproduces spec §4.4."""
    from rtdmd_ray.models.tiny import SCHEDULER_CONFIGS

    def fake(cls, in_channels):
        bb = object.__new__(cls)
        bb.vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(128, 256, 512, 512)))
        bb.transformer = SimpleNamespace(config=SimpleNamespace(in_channels=in_channels, patch_size=2))
        bb.scheduler = SimpleNamespace(config=SCHEDULER_CONFIGS[cls.family])
        return bb

    sd3, f1, f2 = fake(SD3Backbone, 16), fake(Flux1Backbone, 64), fake(Flux2Backbone, 128)
    assert sd3.sigma_schedule(STEPS, 1024) == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert f1.latent_shape(512) == (16, 64, 64) and f1.image_seq_len(512) == 1024
    assert f2.latent_shape(512) == (128, 32, 32) and f2.image_seq_len(1024) == 4096
    expected = {
        (f1, 512): [1.0, 0.849235, 0.652489, 0.384945],
        (f1, 1024): [1.0, 0.904531, 0.759511, 0.512844],
        (f2, 512): [1.0, 0.958085, 0.883982, 0.717497],
        (f2, 1024): [1.0, 0.967384, 0.908144, 0.767200],
    }
    for (bb, res), sig in expected.items():
        got = bb.sigma_schedule(STEPS, res)
        assert got[-1] == 0.0
        assert got[:-1] == pytest.approx(sig, abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 16"):
        f1.latent_shape(520)


def test_tiny_schedule_uses_its_own_token_count(tiny):
    assert tiny["flux1"].image_seq_len(TINY_RESOLUTION) == 64
    assert tiny["flux1"].sigma_schedule(STEPS, TINY_RESOLUTION) == sigma_schedule("flux1", STEPS, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_through_real_loader(tiny, family, tmp_path):
    bb = tiny[family]
    bb.save_pretrained(tmp_path / family)
    loaded = build_backbone(f"tiny_{family}", pretrained_path=tmp_path / family, dtype="fp32")
    assert type(loaded) is type(bb)
    for name, p in bb.transformer.state_dict().items():
        assert torch.equal(p, loaded.transformer.state_dict()[name]), name
    cond, cond2 = bb.encode_prompts(PROMPTS), loaded.encode_prompts(PROMPTS)
    for k in cond.tensors:
        assert torch.equal(cond.tensors[k], cond2.tensors[k])
    x = bb.randn_latents(2, TINY_RESOLUTION, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.3])
    # identical weights; memory alignment of mmap-loaded tensors can change the last ulp of a matmul
    torch.testing.assert_close(
        bb.velocity(x, sigma, cond), loaded.velocity(x, sigma, cond2), rtol=1e-5, atol=1e-6
    )
    assert (tmp_path / family / "model_index.json").exists()


def test_missing_local_path_is_one_line(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(MissingWeightsError) as err:
        build_backbone("sd35", pretrained_path=str(missing))
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and "model.pretrained_path" in msg
    partial = tmp_path / "partial"
    (partial / "transformer").mkdir(parents=True)
    with pytest.raises(MissingWeightsError, match="missing subfolder.*vae") as err:
        Flux2Backbone.from_pretrained(partial)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["sd3", "flux1", "flux2"])
def test_missing_hub_id_fails_fast_offline(monkeypatch, name, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        build_backbone(name)
    assert time.perf_counter() - t0 < 5.0
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE=1" in msg and "huggingface-cli download" in msg


def test_missing_weights_error_carries_no_library_traceback(monkeypatch, tmp_path):
    """No chained library exception: printing it shows our one line only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MissingWeightsError) as err:
        build_backbone("flux1", pretrained_path="black-forest-labs/FLUX.1-dev")
    e = err.value
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    assert str(e).startswith("model.pretrained_path=black-forest-labs/FLUX.1-dev")


def test_registry_lazy_entries_and_errors():
    from rtdmd_ray.models import BACKBONES, register_backbone, resolve_factory

    assert {"sd3", "sd35", "flux1", "flux2", "tiny_sd3", "tiny_flux1", "tiny_flux2", "shapes"} <= set(
        BACKBONES
    )
    register_backbone("test_lazy_tiny", "rtdmd_ray.models.tiny:tiny_backbone", overwrite=True)
    assert resolve_factory("test_lazy_tiny").__name__ == "tiny_backbone"
    register_backbone("test_broken", "rtdmd_ray.models.nope:x", overwrite=True)
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_factory("test_broken")
    with pytest.raises(ValueError, match="model.backbone='nope'"):
        build_backbone("nope")
    BACKBONES.pop("test_lazy_tiny")
    BACKBONES.pop("test_broken")


def test_conditioning_helpers_keep_keys(tiny):
    cond = tiny["sd3"].encode_prompts(PROMPTS)
    assert isinstance(cond, Conditioning)
    both = Conditioning.cat([cond, cond.index([1])])
    assert both.batch_size == 3 and torch.equal(both.tensors["pooled"][2], cond.tensors["pooled"][1])
    assert tiny["sd3"].empty_conditioning(3).batch_size == 3


def test_sigma_as_float_and_load_transformer(tiny, tmp_path):
    bb = tiny["flux2"]
    cond = bb.encode_prompts(PROMPTS)
    x = bb.randn_latents(2, TINY_RESOLUTION, torch.Generator().manual_seed(0))
    torch.testing.assert_close(bb.velocity(x, 0.5, cond), bb.velocity(x, torch.tensor([0.5, 0.5]), cond))
    with pytest.raises(ValueError, match="pass a float or"):
        bb.velocity(x, torch.tensor([0.5, 0.5, 0.5]), cond)
    # a second checkpoint's transformer (e.g. the distilled FLUX.2-klein generator next to the base teacher)
    other = tiny_backbone("flux2", seed=9)
    other.save_pretrained(tmp_path / "gen")
    t = bb.load_transformer(tmp_path / "gen")
    assert type(t) is type(bb.transformer) and not any(p.requires_grad for p in t.parameters())
    ref = other.transformer.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in t.state_dict().items())
    with pytest.raises(MissingWeightsError, match="model.generator_init_path"):
        bb.load_transformer(tmp_path / "nope")
