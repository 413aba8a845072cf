"""Prompt records for both stages, the eval and the benchmarks: files, the training pool, tag balancing and
the cold-start prompt stream. Ray-free; imports only ``config`` and the ShapeWorld captions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rtdmd_ray.config import DataConfig, resolve_path


def load_prompt_records(path: str | Path) -> list[dict[str, Any]]:
    """Prompt records from a ``.txt`` (a prompt per line) or ``.jsonl`` (objects with a ``prompt`` field)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"prompt file {p} not found (config data.train_prompt_file / eval.prompt_file, "
            "relative to data.dataset_dir)"
        )
    if p.suffix == ".jsonl":
        recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        bad = next((i for i, r in enumerate(recs) if "prompt" not in r), None)
        if bad is not None:
            raise ValueError(f"{p}: line {bad + 1} has no 'prompt' field")
        return recs
    return [{"prompt": line.strip()} for line in p.read_text().splitlines() if line.strip()]


def training_prompt_records(data: DataConfig) -> list[dict[str, Any]]:
    """The training prompt pool of ``data.kind`` (ShapeWorld: the train split of the caption grammar),
    tag-balanced when ``data.balance_tags``."""
    if data.kind == "inline":
        records = [{"prompt": p} for p in data.prompts]
    elif data.kind == "shapes":
        from rtdmd_ray.shapes.prompts import train_prompts

        records = train_prompts(0)
    else:
        base = resolve_path(data.dataset_dir)
        records = load_prompt_records(resolve_path(data.train_prompt_file, base))
    return balance_by_tag(records) if data.balance_tags else records


def balance_by_tag(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each tag's records in pool order, cycled up to the largest tag's count; tags in first-seen order.

    A repeated caption is the same prompt string, so its copies in one draw still form one GRPO group.
    """
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for i, r in enumerate(records):
        if "tag" not in r:
            raise ValueError(f"data.balance_tags: training record {i} ({r.get('prompt', r)!r}) has no "
                             "\"tag\"; give every record a tag or set data.balance_tags: false")
        by_tag.setdefault(str(r["tag"]), []).append(r)
    n = max((len(v) for v in by_tag.values()), default=0)
    return [rs[i % len(rs)] for rs in by_tag.values() for i in range(n)]


class PromptStream:
    """Epoch-shuffled prompts as a pure function of ``(seed, iteration)``: resume needs only the iteration.

    Global sample ``g = iteration * prompts_per_step + j`` is ``pool[perm_e[g % n]]``, epoch ``e = g // n``
    and ``perm_e`` a permutation seeded by ``(seed, e)``.
    """

    def __init__(self, records: list[dict[str, Any]], *, prompts_per_step: int, seed: int):
        if not records:
            raise ValueError("the training prompt pool is empty (config data.*)")
        self.records, self.prompts_per_step, self.seed = records, prompts_per_step, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
            self._perms = {epoch: torch.randperm(len(self.records), generator=g).tolist()}
        return self._perms[epoch]

    def global_batch(self, iteration: int) -> list[dict[str, Any]]:
        n = len(self.records)
        out = []
        for j in range(self.prompts_per_step):
            g = iteration * self.prompts_per_step + j
            out.append(self.records[self._perm(g // n)[g % n]])
        return out

    def rank_batch(self, iteration: int, rank: int, world_size: int) -> list[dict[str, Any]]:
        per_rank = self.prompts_per_step // world_size
        return self.global_batch(iteration)[rank * per_rank : (rank + 1) * per_rank]
