"""Qwen-VL scorers on a tiny random Qwen2-VL of the real class: HPSv3 (checkpoint key mapping, reward-token
pooling, RankNet head) and GenEval2's transformers judge (full-vocabulary first-token probabilities)."""

from __future__ import annotations

import json

import pytest
import torch

from rtdmd_ray.rewards import RewardWeightsMissing
from rtdmd_ray.rewards.hpsv3 import REWARD_TOKEN, HPSv3Scorer, hpsv3_text, ranknet_head, remap_hpsv3_keys
from rtdmd_ray.rewards.tiny import save_tiny_qwen2_vl

torch.set_num_threads(1)
PIXELS = 56 * 56


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2-vl")


def test_smart_resize():
    from rtdmd_ray.rewards.hpsv3 import smart_resize

    assert smart_resize(512, 512, 28, 256 * 28 * 28, 256 * 28 * 28) == (448, 448)
    assert smart_resize(1024, 1024, 28, 256 * 28 * 28, 256 * 28 * 28) == (448, 448)
    h, w = smart_resize(512, 1024, 28, 256 * 28 * 28, 256 * 28 * 28)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 256 * 28 * 28 and w == 2 * h


def test_remap_keys():
    sd = {
        "visual.blocks.0.attn.qkv.weight": 1,
        "model.layers.0.mlp.up_proj.weight": 2,
        "lm_head.weight": 3,
        "rm_head.0.weight": 4,
        "model.language_model.norm.weight": 5,
        "module.model.embed_tokens.weight": 6,
    }
    assert remap_hpsv3_keys(sd) == {
        "model.visual.blocks.0.attn.qkv.weight": 1,
        "model.language_model.layers.0.mlp.up_proj.weight": 2,
        "lm_head.weight": 3,
        "rm_head.0.weight": 4,
        "model.language_model.norm.weight": 5,
        "model.language_model.embed_tokens.weight": 6,
    }


def test_missing_checkpoint_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("RTDMD_HPSV3_CHECKPOINT_PATH", raising=False)
    with pytest.raises(RewardWeightsMissing) as e:
        HPSv3Scorer(ckpt_dir=str(tmp_path))
    assert "HPSv3.safetensors" in str(e.value) and "RTDMD_HPSV3_CHECKPOINT_PATH" in str(e.value)
    assert "\n" not in str(e.value)


def _old_layout_checkpoint(qwen_dir, path):
    """An HPSv3-style checkpoint: resized vocab, transformers-4.4x key names, a RankNet head."""
    from transformers import Qwen2VLForConditionalGeneration

    from rtdmd_ray.rewards._vlm import load_vlm_processor

    torch.manual_seed(3)
    vlm = Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir)
    proc = load_vlm_processor(str(qwen_dir))
    proc.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    vlm.resize_token_embeddings(len(proc.tokenizer))
    with torch.no_grad():
        vlm.model.language_model.embed_tokens.weight[-1].normal_()
    head = ranknet_head(vlm.config.text_config.hidden_size)
    sd = {}
    for k, v in vlm.state_dict().items():
        k = k.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        sd[k] = v.contiguous()
    sd.update({"rm_head." + k: v for k, v in head.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return vlm.eval(), head.eval(), proc


def test_hpsv3_scores_match_independent_forward(qwen_dir, tmp_path):
    vlm, head, proc = _old_layout_checkpoint(qwen_dir, tmp_path / "hpsv3" / "HPSv3.safetensors")
    s = HPSv3Scorer(ckpt_dir=str(tmp_path), base_model=str(qwen_dir), dtype="float32", image_pixels=PIXELS)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 112, 112, generator=g)  # smart-resized to 56 x 56 (= PIXELS)
    prompts = ["a cat on a mat", "a very long prompt about a dog " * 3]
    got = s(x, prompts)["hpsv3"]
    assert got.shape == (2,) and torch.isfinite(got).all()
    # independent computation with the original (un-renamed) model
    from PIL import Image

    mus = []
    for img, p in zip(x, prompts, strict=True):
        pil = Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).resize(
            (56, 56), Image.BICUBIC
        )
        conv = [
            {
                "role": "user",
                "content": [{"type": "image", "image": pil}, {"type": "text", "text": hpsv3_text(p)}],
            }
        ]
        text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        enc = proc(text=[text], images=[pil], return_tensors="pt")
        with torch.no_grad():
            h = vlm.model(**enc).last_hidden_state[0]
        pos = (enc["input_ids"][0] == proc.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)).nonzero().item()
        mus.append(head(h[pos])[0])
    assert torch.allclose(got, torch.stack(mus), atol=1e-4)
    assert hpsv3_text("p").rstrip().endswith("<|Reward|>\n\nEND")


def test_geneval2_transformers_judge_soft_tifa(qwen_dir, tmp_path):
    from rtdmd_ray.rewards.geneval2 import GenEval2Scorer, answer_variants

    data = tmp_path / "g2.jsonl"
    vqa = [["How many cats are in the image?", "two"], ["Is the cat black?", "Yes"]]
    data.write_text(json.dumps({"prompt": "two black cats", "vqa_list": vqa}))
    s = GenEval2Scorer(backend="transformers", model=str(qwen_dir), data_path=str(data), dtype="float32")
    x = torch.rand(1, 3, 56, 56)
    got = s(x, ["two black cats"])["geneval2"].item()
    # independent: softmax of the last-position logits, summed over each variant's first token
    tok, proc, model = s.judge.tokenizer, s.judge.processor, s.judge.model
    from PIL import Image

    pil = Image.fromarray((x[0] * 255).round().byte().permute(1, 2, 0).numpy())
    atoms = []
    for q, a in vqa:
        conv = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": pil},
                    {"type": "text", "text": q + " Answer in one word."},
                ],
            }
        ]
        enc = proc.apply_chat_template(
            conv, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            probs = model(**enc).logits[0, -1].softmax(-1)
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
        atoms.append(
            sum(probs[tok.encode(v, add_special_tokens=False)[0]].item() for v in answer_variants(q, a))
        )
    assert tok.encode(" Yes", add_special_tokens=False) != tok.encode("Yes", add_special_tokens=False)
    assert got == pytest.approx((atoms[0] * atoms[1]) ** 0.5, rel=1e-4)
