"""ShapeWorld text stack: a word-level tokenizer and a tiny transformers ``CLIPTextModel``.

Both are standard transformers objects, saved with ``save_pretrained`` and loaded with ``from_pretrained``
(``PreTrainedTokenizerFast`` / ``CLIPTextModel``), exactly like an SD3 checkpoint's tokenizer/text_encoder.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from rtdmd_ray.shapes.prompts import MAX_TEXT_TOKENS, vocabulary

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
TEXT_WIDTH = 64  # hidden size of the text encoder = SD3 joint_attention_dim = pooled_projection_dim


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the grammar's vocabulary; pads/truncates to ``MAX_TEXT_TOKENS``."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=MAX_TEXT_TOKENS, **SPECIAL_TOKENS)
    return tok


def build_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    """A 2-layer, width-64 ``CLIPTextModel`` (random init; trained jointly with the teacher)."""
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TEXT_TOKENS,
        projection_dim=TEXT_WIDTH, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(cfg)


def tokenize(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> torch.Tensor:
    """``input_ids [B, MAX_TEXT_TOKENS]`` (padded to the max length like SD3's CLIP tokenizers)."""
    return tokenizer(prompts, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [B, L, 64], pooled [B, 64])``: last hidden state and the EOS-pooled output."""
    out = text_encoder(input_ids=input_ids)
    return out.last_hidden_state, out.pooler_output
