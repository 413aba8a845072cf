"""Tiny, seeded, random-weight backbones built in code from the *same* classes as the real models.

No weights can be downloaded on the development machines, so tests (and the Ray-tier tests of the roles)
run on these. Each family keeps its real structure: the text stack (two CLIPs of different widths + T5 for
SD3, CLIP pooled + T5 for FLUX.1, a Qwen3 read at layers 9/18/27 for FLUX.2), the real sequence lengths
(77 + 128, 512, 512), the real latent channel counts (16, 16, 128 = 32 x 2 x 2) and VAE scaling factors,
and the real scheduler configs. Only widths, depths and vocabularies are tiny. Tokenizers are built in code
(byte/character level, so every prompt encodes differently) and survive ``save_pretrained``.

``tiny_backbone(family, seed)`` is the entry point; ``backbone.save_pretrained(dir)`` followed by the
family's ``from_pretrained(dir, dtype="fp32")`` exercises the real loader.
"""

from __future__ import annotations

import string
from typing import Any

import torch

from rtdmd_ray.models.common import DiffusersBackbone

TINY_FAMILIES = ("sd3", "flux1", "flux2")
# the resolution the tiny models are meant to run at: tiny VAEs downsample by 2 (two blocks)
TINY_RESOLUTION = 32

# real scheduler configs (scheduler/scheduler_config.json of the published checkpoints)
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
    "flux1": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "flux2": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "time_shift_type": "exponential",
    },
}

_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


# ---------------------------------------------------------------------- tokenizers
def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_clip_tokenizer() -> Any:
    """A byte-level CLIP BPE without merges (vocab ~515): every character is a token."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)  # the last character of a word carries the end-of-word suffix
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5_tokenizer() -> Any:
    """A character-level T5 unigram tokenizer (vocab ~100, no sentinel ids)."""
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_qwen_tokenizer() -> Any:
    """A byte-level Qwen2 BPE without merges plus the chat special tokens and a Qwen3-style template."""
    from transformers import Qwen2TokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], model_max_length=512)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
    )
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


# ---------------------------------------------------------------------- text encoders
def _clip_config(tok: Any, hidden: int, projection: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _t5_encoder(tok: Any, d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return T5EncoderModel(cfg)


def _qwen3_lm(tok: Any, hidden: int, layers: int) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg)


def _sd_vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    # the real SD3 / FLUX.1 scaling and shift factors, so decode's arithmetic is the real one
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )


# ---------------------------------------------------------------------- families
def _tiny_sd3() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tok1, tok2, tok3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    # two CLIPs of different widths (like CLIP-L 768 / CLIP-G 1280), T5 wider than both (like 4096 >= 2048)
    te1 = CLIPTextModelWithProjection(_clip_config(tok1, hidden=16, projection=16))
    te2 = CLIPTextModelWithProjection(_clip_config(tok2, hidden=24, projection=24))
    te3 = _t5_encoder(tok3, d_model=48)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 2,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=16 + 24,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    return {
        "transformer": transformer,
        "vae": _sd_vae(16),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["sd3"]),
        "text_encoders": {"text_encoder": te1, "text_encoder_2": te2, "text_encoder_3": te3},
        "tokenizers": {"tokenizer": tok1, "tokenizer_2": tok2, "tokenizer_3": tok3},
    }


def _tiny_flux1() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tok1, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    te1 = CLIPTextModel(_clip_config(tok1, hidden=16, projection=16))
    te2 = _t5_encoder(tok2, d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        out_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    return {
        "transformer": transformer,
        "vae": _sd_vae(16),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["flux1"]),
        "text_encoders": {"text_encoder": te1, "text_encoder_2": te2},
        "tokenizers": {"tokenizer": tok1, "tokenizer_2": tok2},
    }


def _tiny_flux2() -> dict[str, Any]:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    tok = tiny_qwen_tokenizer()
    hidden = 8
    lm = _qwen3_lm(tok, hidden=hidden, layers=27)  # deep enough for the real layers 9, 18, 27
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
    )
    # non-trivial batch-norm statistics so the de-normalisation in decode is exercised
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,
        timestep_guidance_channels=16,
        mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["flux2"]),
        "text_encoders": {"text_encoder": lm},
        "tokenizers": {"tokenizer": tok},
    }


_BUILDERS = {"sd3": _tiny_sd3, "flux1": _tiny_flux1, "flux2": _tiny_flux2}


def tiny_backbone(family: str, seed: int = 0, *, device: torch.device | str = "cpu") -> DiffusersBackbone:
    """A random-weight backbone of ``family`` ("sd3" | "flux1" | "flux2"), identical for identical ``seed``.

    fp32 on ``device``; runs encode -> 4-step sample -> decode at ``TINY_RESOLUTION`` (32 px) on CPU in a
    fraction of a second. The global RNG is left untouched.
    """
    family = family.removeprefix("tiny_")
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny backbone family {family!r}: use one of {', '.join(TINY_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = _BUILDERS[family]()
    cls = backbone_class(family)
    return cls(**parts, dtype=torch.float32, device=device)


def backbone_class(family: str) -> type[DiffusersBackbone]:
    """The ``FlowBackbone`` class of a family name."""
    if family == "sd3":
        from rtdmd_ray.models.sd3 import SD3Backbone

        return SD3Backbone
    if family == "flux1":
        from rtdmd_ray.models.flux1 import Flux1Backbone

        return Flux1Backbone
    if family == "flux2":
        from rtdmd_ray.models.flux2 import Flux2Backbone

        return Flux2Backbone
    raise ValueError(f"unknown backbone family {family!r}: use one of {', '.join(TINY_FAMILIES)}")
