"""What the weight-sync tests (unit buckets, local Ray, GPU/NCCL) share: a LoRA-like state and a bit-exact
comparison. Tests that ship code to Ray actors register this module by value too (it is not importable
inside Ray workers)."""

from __future__ import annotations

import torch


def lora_like_state(
    g: torch.Generator, *, blocks: int, rank: int, width: int, ff_width: int
) -> dict[str, torch.Tensor]:
    """A LoRA-like state dict of mixed dtypes (fp32 A, bf16 B, fp16 ff A) drawn from ``g``: the same
    generator state gives the same bits anywhere."""
    state = {}
    for i in range(blocks):
        b = f"blocks.{i}"
        state[f"{b}.attn.to_q.lora_A.weight"] = torch.randn(rank, width, generator=g)
        state[f"{b}.attn.to_q.lora_B.weight"] = torch.randn(width, rank, generator=g).to(torch.bfloat16)
        state[f"{b}.ff.lora_A.weight"] = torch.randn(rank, ff_width, generator=g).to(torch.float16)
    return state


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` on CPU (any layout, any device): NaN payloads and -0.0 compare exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names in the same order, same dtypes and shapes, the same bits (devices may differ)."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k
