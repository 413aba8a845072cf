"""Tiny random-weight models of the real reward classes, for CPU tests and benchmarks (no downloads).

Each builder creates the real transformers class from a small config and saves it with ``save_pretrained``
(plus tokenizer / image-processor files), so the scorers load it through their normal loading code.
The weights are random: these models exercise code paths, shapes and gradients, not reward quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (the byte-level BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def tiny_clip_tokenizer() -> Any:
    """A character-level ``CLIPTokenizer`` (514 tokens: every byte with and without ``</w>``, SOT, EOT)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_config(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 16,
    max_text_len: int = 24,
    hidden_act: str = "quick_gelu",
) -> Any:
    """A ``CLIPConfig`` with small vision/text towers matching ``tiny_clip_tokenizer``."""
    from transformers import CLIPConfig

    tok = tiny_clip_tokenizer()
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        hidden_act=hidden_act,
    )
    text = dict(
        common,
        vocab_size=len(tok),
        max_position_embeddings=max_text_len,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(common, image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_clip(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    dtype: torch.dtype = torch.float32,
    **config_kwargs: Any,
) -> Path:
    """Save a random tiny ``CLIPModel`` + tokenizer + ``preprocessor_config.json`` into ``path``."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_clip_config(**config_kwargs)
    model = CLIPModel(config).to(dtype)
    model.save_pretrained(path)
    tiny_clip_tokenizer().save_pretrained(path)
    size = config.vision_config.image_size
    kwargs: dict[str, Any] = {}
    if image_mean is not None:
        kwargs["image_mean"] = list(image_mean)
    if image_std is not None:
        kwargs["image_std"] = list(image_std)
    CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **kwargs
    ).save_pretrained(path)
    return path


def save_aesthetic_head(path: str | os.PathLike[str], embed_dim: int, *, seed: int = 0) -> Path:
    """Save a random LAION aesthetic MLP state dict (keys ``layers.{0,2,4,6,7}``) as a ``.pth`` file."""
    from rtdmd_ray.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    path = Path(path)
    torch.save(AestheticMLP(embed_dim).state_dict(), path)
    return path


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(obj))
    return path


def save_tiny_mask2former(
    path: str | os.PathLike[str], *, num_labels: int = 80, image_px: int = 64, seed: int = 0
) -> Path:
    """Save a random tiny ``Mask2FormerForUniversalSegmentation`` (Swin backbone) + PIL image processor."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        SwinConfig,
    )

    path = Path(path)
    torch.manual_seed(seed)
    swin = SwinConfig(
        image_size=image_px,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin,
        num_labels=num_labels,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        num_queries=12,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        common_stride=4,
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessorPil(
        size={"shortest_edge": image_px, "longest_edge": 2 * image_px}, size_divisor=32
    ).save_pretrained(path)
    return path


QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2-VL's chat layout (no default system turn): enough for the processor's image-token expansion.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_tokenizer() -> Any:
    """A byte-level ``Qwen2Tokenizer`` (256 byte tokens + a few merges + Qwen's special tokens)."""
    from transformers import Qwen2Tokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    merges = []
    for word in ("ĠYes", "Ġyes", "ĠNo", "Yes", "yes", "No"):  # a few whole-word tokens
        a = word[0]
        for ch in word[1:]:
            merges.append((a, ch))
            a = a + ch
            vocab.setdefault(a, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tok


def save_tiny_qwen2_vl(path: str | os.PathLike[str], *, seed: int = 0, image_px: int = 56) -> Path:
    """Save a random tiny ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor`` (tokenizer, chat
    template, PIL image processor fixed at ``image_px`` x ``image_px`` pixels)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    path = Path(path)
    torch.manual_seed(seed)
    tok = tiny_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=1,
        embed_dim=16,
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    pixels = image_px * image_px
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    # saved piecewise: ProcessorMixin.save_pretrained needs a video processor (torchvision), we have none
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    write_json(path / "processor_config.json", {"processor_class": Qwen2VLProcessor.__name__})
    return path


def tiny_bert_tokenizer() -> Any:
    """A character-level uncased ``BertTokenizer`` (letters, digits, ``##`` continuations, BERT specials)."""
    from transformers import BertTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def _hf_blip_vision_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``imagereward.blip_vision_to_hf`` (builds checkpoints in the original BLIP layout)."""
    import re

    rules = [
        (r"^embeddings\.class_embedding$", "cls_token"),
        (r"^embeddings\.position_embedding$", "pos_embed"),
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
        (r"^post_layernorm\.", "norm."),
    ]
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k2, n = re.subn(pat, rep, k)
            if n:
                out["blip.visual_encoder." + k2] = v
                break
    return out


def save_tiny_imagereward(root: str | os.PathLike[str], *, seed: int = 0, image_size: int = 32) -> Path:
    """Write ``<root>/ImageReward/{ImageReward.pt, med_config.json, bert-base-uncased/}`` for a tiny random
    BLIP (ViT 2 layers x 32 wide, 2 heads; BERT 2 layers x 32 wide with cross-attention), in the original
    checkpoint layout (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from rtdmd_ray.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    d = Path(root) / "ImageReward"
    d.mkdir(parents=True, exist_ok=True)
    tok = tiny_bert_tokenizer()
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    med = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "max_position_embeddings": 40, "vocab_size": len(tok), "layer_norm_eps": 1e-12,
           "hidden_act": "gelu", "encoder_width": 24, "add_cross_attention": True}
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
        image_size=image_size, layer_norm_eps=1e-6,
    ))
    text_cfg = {k: v for k, v in med.items() if k not in ("encoder_width", "add_cross_attention")}
    text_cfg.update(
        encoder_hidden_size=24,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        sep_token_id=tok.sep_token_id,
    )
    text = BlipTextModel(BlipTextConfig(**text_cfg), add_pooling_layer=False)
    sd = _hf_blip_vision_to_original(vision.state_dict())
    sd.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    sd.update({"mlp." + k: v for k, v in AestheticMLP(32).state_dict().items()})
    sd["blip.text_proj.weight"] = torch.zeros(4, 32)  # other BLIP parts in the file are ignored
    torch.save(sd, d / "ImageReward.pt")
    write_json(d / "med_config.json", med)
    tiny_bert_tokenizer().save_pretrained(d / "bert-base-uncased")
    return d
