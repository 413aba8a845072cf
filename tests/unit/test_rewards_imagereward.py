"""ImageReward on transformers BLIP: original-layout checkpoint loading (checked against a from-scratch
timm-style ViT forward), the normalisation constants, the PIL scoring path and the differentiable path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rtdmd_ray.rewards import RewardWeightsMissing, build_scorer
from rtdmd_ray.rewards.imagereward import REWARD_MEAN, REWARD_STD, blip_vision_to_hf
from rtdmd_ray.rewards.tiny import save_tiny_imagereward

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ir_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ir")
    save_tiny_imagereward(root, image_size=32)
    return root


@pytest.fixture(scope="module")
def scorer(ir_root):
    return build_scorer("imagereward", ckpt_dir=str(ir_root), vision_heads=2, image_size=32)


def _timm_vit(sd, pixels, heads):
    """From-scratch BLIP/timm ViT on the original keys: patchify, CLS + pos, pre-norm blocks, final norm."""
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[p + "pos_embed"]
    n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(p + "blocks."))
    for i in range(n):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, x.shape[-1:], sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = h @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
        bsz, t, d3 = qkv.shape
        q, k, v = qkv.view(bsz, t, 3, heads, d3 // 3 // heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(bsz, t, -1)
        x = x + o @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        h = F.layer_norm(x, x.shape[-1:], sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        x = x + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return F.layer_norm(x, x.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)


def test_vision_mapping_matches_timm_forward(ir_root, scorer):
    sd = torch.load(ir_root / "ImageReward" / "ImageReward.pt", weights_only=True)
    pixels = torch.randn(2, 3, 32, 32)
    want = _timm_vit(sd, pixels, heads=2)
    got = scorer.vision(pixel_values=pixels).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    assert "blip.text_proj.weight" in sd and not any("text_proj" in k for k in blip_vision_to_hf(sd))


def test_score_is_normalised_mlp_of_cls_feature(scorer):
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    x = torch.rand(3, 3, 40, 48)
    prompts = ["a cat", "two dogs", "a cat"]
    got = scorer(x, prompts)["imagereward"]
    pix = scorer.preprocess_pil(
        [
            __import__("PIL.Image").Image.fromarray(a)
            for a in (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
        ]
    )
    assert pix.shape == (3, 3, 32, 32)
    with torch.no_grad():
        emb = scorer.vision(pixel_values=pix).last_hidden_state
        enc = scorer.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        assert enc["input_ids"].shape == (3, 35)
        cls = scorer.text(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], encoder_hidden_states=emb
        ).last_hidden_state[:, 0]
        h = cls
        for i in (0, 2, 4, 6, 7):  # the linear stack, no activations
            h = h @ scorer.mlp.layers[i].weight.T + scorer.mlp.layers[i].bias
    assert torch.allclose(got, (h.squeeze(-1) - REWARD_MEAN) / REWARD_STD, atol=1e-5)
    # each image is scored with its own prompt: same image, different prompt -> different score
    same = scorer(x[:1].repeat(2, 1, 1, 1), ["a cat", "two dogs"])["imagereward"]
    assert same[0] != same[1]


def test_differentiable_path_matches_finite_differences(scorer):
    for m in (scorer.vision, scorer.text, scorer.mlp):
        m.double()
    try:
        x = torch.rand(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda im: scorer.score_differentiable(im, ["a cat"]), (x,), eps=1e-6, atol=1e-5, rtol=1e-3
        )
    finally:
        for m in (scorer.vision, scorer.text, scorer.mlp):
            m.float()


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(RewardWeightsMissing) as e:
        build_scorer("imagereward", ckpt_dir=str(tmp_path))
    assert "ImageReward/ImageReward.pt" in str(e.value) and "\n" not in str(e.value)
