"""CLIP-family scorers (clipscore, pickscore, hpsv2, aesthetic) on tiny random CLIPs of the real classes.

Every scorer is loaded from disk through its real loading code; its numbers are checked against an independent
computation (plain ``CLIPModel`` forward, or a from-scratch OpenCLIP forward for the HPSv2 key mapping), and
the differentiable paths against finite differences in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rtdmd_ray.rewards import RewardWeightsMissing, build_scorer
from rtdmd_ray.rewards._common import quantized_float, resize_max_side_and_pad, resize_shorter_side
from rtdmd_ray.rewards.tiny import save_aesthetic_head, save_tiny_clip, tiny_clip_tokenizer

torch.set_num_threads(1)
PROMPTS = ["a red circle", "two blue squares", "a red circle"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", image_size=32, patch_size=8)


def _images(n=3, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def _clip_forward_diag(model, tok, pixel_values, prompts, padding):
    """Independent reference: the plain CLIPModel forward's ``logits_per_image`` diagonal."""
    enc = tok(
        prompts,
        padding=padding,
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    )
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixel_values)
    return out.logits_per_image.diagonal()


def test_clipscore_matches_clip_forward_and_quantises(clip_dir):
    s = build_scorer("clipscore", model=str(clip_dir))
    x = _images()
    got = s(x, PROMPTS)["clipscore"]
    assert got.shape == (3,) and got.dtype == torch.float32
    # reference: quantise, bilinear shorter side 32, centre crop, normalise (CLIP mean/std from the dir)
    q = quantized_float(x)
    pix = resize_shorter_side(q, 32, mode="bilinear")
    top, left = round((pix.shape[2] - 32) / 2), round((pix.shape[3] - 32) / 2)
    pix = pix[:, :, top : top + 32, left : left + 32]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    want = (
        _clip_forward_diag(s.tower.model, s.tower.tokenizer, (pix - mean) / std, PROMPTS, "max_length") / 100
    )
    assert torch.allclose(got, want, atol=1e-5)
    # the 8-bit quantisation is really applied in the no-grad path (not in the differentiable one)
    assert torch.allclose(s.score_differentiable(q, PROMPTS), got, atol=1e-6)


def test_clipscore_reads_image_settings_from_any_clip_dir(tmp_path):
    d = save_tiny_clip(
        tmp_path / "odd",
        image_size=16,
        patch_size=4,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.25, 0.25, 0.25),
    )
    s = build_scorer("clipscore", model=str(d))
    assert s.tower.image_settings == {
        "size": 16,
        "crop_size": (16, 16),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
    }
    assert s(_images(2, 20, 20), ["a", "b"])["clipscore"].shape == (2,)


def _fd_check(fn, x):
    """Gradient vs central finite differences on float64."""
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name", ["clipscore", "pickscore"])
def test_clip_family_gradients_match_finite_differences(clip_dir, name):
    opts = (
        {"model": str(clip_dir)}
        if name == "clipscore"
        else {"model": str(clip_dir), "processor": str(clip_dir)}
    )
    s = build_scorer(name, **opts)
    s.tower.model.double()
    x = torch.rand(1, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    y = s.score_differentiable(x, ["a cat"])
    assert y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    _fd_check(lambda im: s.score_differentiable(im, ["a cat"]), x.detach().requires_grad_(True))


def test_pickscore_scale_and_pil_path(clip_dir):
    s = build_scorer("pickscore", model=str(clip_dir), processor=str(clip_dir))
    assert s.divisor == 26.0
    assert 100 * 0.2236 / s.divisor == pytest.approx(0.86, abs=1e-4)  # spec §7.6
    x = _images()
    got = s(x, PROMPTS)["pickscore"]
    from PIL import Image

    pils = [Image.fromarray(a) for a in (quantized_float(x) * 255).round().byte().permute(0, 2, 3, 1).numpy()]
    pix = s.tower.image_processor(images=pils, return_tensors="pt")["pixel_values"]
    want = _clip_forward_diag(s.tower.model, s.tower.tokenizer, pix, PROMPTS, True) / 26
    assert torch.allclose(got, want, atol=1e-5)


def test_missing_weights_fail_at_construction_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RTDMD_REWARD_CKPT_PATH", str(tmp_path))
    for name, needle in [
        ("hpsv2", "HPS_v2.1_compressed.pt"),
        ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
    ]:
        with pytest.raises(RewardWeightsMissing) as e:
            build_scorer(name)
        msg = str(e.value)
        assert needle in msg and "RTDMD_REWARD_CKPT_PATH" in msg and "\n" not in msg
    with pytest.raises(RewardWeightsMissing) as e:
        build_scorer("pickscore", model=str(tmp_path / "nope"))
    assert "nope" in str(e.value) and "\n" not in str(e.value)


def test_aesthetic_is_linear_mlp_on_normalised_embedding(clip_dir, tmp_path):
    save_aesthetic_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", embed_dim=16)
    s = build_scorer("aesthetic", ckpt_dir=str(tmp_path), clip_model=str(clip_dir))
    x = _images(2)
    got = s(x, ["", ""])["aesthetic"]
    from PIL import Image

    pils = [Image.fromarray(a) for a in (quantized_float(x) * 255).round().byte().permute(0, 2, 3, 1).numpy()]
    pix = s.tower.image_processor(images=pils, return_tensors="pt")["pixel_values"]
    m = s.tower.model
    emb = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    sd = torch.load(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    h = emb
    for i in (0, 2, 4, 6, 7):  # no activations between the linear layers
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    assert torch.allclose(got, h.squeeze(-1), atol=1e-5)


# ------------------------------------------------------------------------------------------- HPSv2


def test_hpsv2_resize_and_pad_shapes():
    x = torch.ones(1, 3, 512, 1024)
    y = resize_max_side_and_pad(x, 224)
    assert y.shape == (1, 3, 224, 224)
    rows = y[0, 0].abs().sum(dim=1) > 0
    assert not rows[:56].any() and rows[56:168].all() and not rows[168:].any()
    sq = resize_max_side_and_pad(torch.rand(1, 3, 512, 512), 224)
    assert sq.shape == (1, 3, 224, 224) and (sq[0, :, 0] != 0).any()  # no padding rows


def _openclip_state_dict(
    width=32, layers=2, patch=8, image=32, tw=32, tlayers=2, vocab=514, ctx=24, embed=16
):
    g = torch.Generator().manual_seed(1)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r((image // patch) ** 2 + 1, width),
        "visual.proj": r(width, embed),
        "visual.conv1.weight": r(width, 3, patch, patch),
        "visual.ln_pre.weight": 1 + r(width),
        "visual.ln_pre.bias": r(width),
        "visual.ln_post.weight": 1 + r(width),
        "visual.ln_post.bias": r(width),
        "token_embedding.weight": r(vocab, tw),
        "positional_embedding": r(ctx, tw),
        "text_projection": r(tw, embed),
        "ln_final.weight": 1 + r(tw),
        "ln_final.bias": r(tw),
        "logit_scale": torch.tensor(math.log(100.0)),
    }
    for pre, w, n in (
        ("visual.transformer.resblocks.", width, layers),
        ("transformer.resblocks.", tw, tlayers),
    ):
        for i in range(n):
            p = f"{pre}{i}."
            sd.update(
                {
                    p + "ln_1.weight": 1 + r(w),
                    p + "ln_1.bias": r(w),
                    p + "ln_2.weight": 1 + r(w),
                    p + "ln_2.bias": r(w),
                    p + "attn.in_proj_weight": r(3 * w, w),
                    p + "attn.in_proj_bias": r(3 * w),
                    p + "attn.out_proj.weight": r(w, w),
                    p + "attn.out_proj.bias": r(w),
                    p + "mlp.c_fc.weight": r(2 * w, w),
                    p + "mlp.c_fc.bias": r(2 * w),
                    p + "mlp.c_proj.weight": r(w, 2 * w),
                    p + "mlp.c_proj.bias": r(w),
                }
            )
    return sd


def _openclip_reference(sd, pixels, ids, heads):
    """From-scratch OpenCLIP forward (pre-norm blocks, fused in_proj, GELU, CLS / argmax-EOT pooling)."""

    def block(x, p, mask):
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        b, n, d = q.shape
        q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
        if mask is not None:
            att = att + mask
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]

    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1)
        + sd["visual.positional_embedding"]
    )
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(2):
        x = block(x, f"visual.transformer.resblocks.{i}.", None)
    img = (
        F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
        @ sd["visual.proj"]
    )
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(2):
        t = block(t, f"transformer.resblocks.{i}.", mask)
    t = F.layer_norm(t, t.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_hpsv2_openclip_mapping_reproduces_openclip_forward(tmp_path):
    sd = _openclip_state_dict()
    torch.save(
        {"state_dict": {"module." + k: v.half() for k, v in sd.items()}}, tmp_path / "HPS_v2.1_compressed.pt"
    )
    tiny_clip_tokenizer().save_pretrained(tmp_path / "tok")
    s = build_scorer(
        "hpsv2",
        ckpt_dir=str(tmp_path),
        tokenizer=str(tmp_path / "tok"),
        vision_heads=2,
        text_heads=2,
        image_size=32,
    )
    x = _images(2, 30, 50)
    got = s.score_differentiable(x, PROMPTS[:2])
    # reference with OpenCLIP-style ids: [SOT] tokens [EOT] then zero padding (EOT is the largest id)
    tok = tiny_clip_tokenizer()
    ids = torch.zeros(2, 24, dtype=torch.long)
    for i, p in enumerate(PROMPTS[:2]):
        row = tok(p)["input_ids"]
        ids[i, : len(row)] = torch.tensor(row)
    sdf = {k: v.half().float() for k, v in sd.items()}  # the file holds fp16 weights
    img, txt = _openclip_reference(sdf, s.preprocess(x), ids, heads=2)
    assert torch.allclose(got, (img * txt).sum(-1), atol=1e-4)
    assert torch.allclose(s(x, PROMPTS[:2])["hpsv2"], s.score_differentiable(quantized_float(x), PROMPTS[:2]))
    # gradients flow from the cosine to the image
    xg = x.clone().requires_grad_(True)
    s.score_differentiable(xg, PROMPTS[:2]).sum().backward()
    assert xg.grad.abs().sum() > 0


def test_hpsv2_gradient_matches_finite_differences(tmp_path):
    torch.save({"state_dict": _openclip_state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    tiny_clip_tokenizer().save_pretrained(tmp_path / "tok")
    s = build_scorer(
        "hpsv2",
        ckpt_dir=str(tmp_path),
        tokenizer=str(tmp_path / "tok"),
        vision_heads=2,
        text_heads=2,
        image_size=32,
    )
    s.tower.model.double()
    x = torch.rand(1, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    _fd_check(lambda im: s.score_differentiable(im, ["a dog"]), x)
