"""Eval prompt sets: prompt files, the datasets each eval reward reads, ShapeWorld's balanced test captions,
the report grid's pick. Shared by ``rtdmd-ray eval`` and the benchmarks; Ray-free.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtdmd_ray.config import Config, resolve_path

# §3.4: the file a prompt-set directory resolves to, first match wins
PROMPT_FILE_ORDER = (
    "test.txt",
    "test.jsonl",
    "test_metadata.jsonl",
    "prompts.json",
    "prompts.txt",
    "metadata.jsonl",
)
SHAPES_DATASET = "shapes_test"


# --------------------------------------------------------------------------------------- prompt sets
def read_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """Prompt records ``[{"prompt": str, ...metadata}]`` of a prompt file or directory (spec §3.4).

    A directory resolves to its first file in ``PROMPT_FILE_ORDER``. ``.json``: a list of strings or of dicts
    with "prompt" (or "text"); ``.jsonl``: one dict (its fields are the metadata) or string per line;
    ``.txt``/``.text``: one prompt per non-blank line, stripped.
    """
    p = Path(path)
    if p.is_dir():
        found = next((p / n for n in PROMPT_FILE_ORDER if (p / n).is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"prompt directory {p} has none of {list(PROMPT_FILE_ORDER)} "
                "(config eval.prompt_file / eval.dataset_map, relative to data.dataset_dir)"
            )
        p = found
    if not p.is_file():
        raise FileNotFoundError(
            f"prompt file {p} not found (config eval.prompt_file / eval.dataset_map, relative "
            "to data.dataset_dir; the repo ships copies under data/prompts)"
        )

    def record(value: Any, where: str) -> dict[str, Any]:
        if isinstance(value, str):
            return {"prompt": value}
        if isinstance(value, dict) and isinstance(value.get("prompt", value.get("text")), str):
            return {**value, "prompt": value.get("prompt", value.get("text"))}
        raise ValueError(f"{where}: expected a prompt string or an object with 'prompt' (or 'text')")

    suffix = p.suffix.lower()
    if suffix == ".json":
        data = json.loads(p.read_text())
        if not isinstance(data, list) or not data:
            raise ValueError(f"{p}: a .json prompt file must hold a non-empty list")
        return [record(v, f"{p} item {i}") for i, v in enumerate(data)]
    if suffix == ".jsonl":
        return [
            record(json.loads(line), f"{p} line {i + 1}")
            for i, line in enumerate(p.read_text().splitlines())
            if line.strip()
        ]
    if suffix in (".txt", ".text"):
        return [{"prompt": line.strip()} for line in p.read_text().splitlines() if line.strip()]
    raise ValueError(f"{p}: unsupported prompt file type {suffix!r} (use .txt, .jsonl or .json)")


def dataset_token(name: str) -> str:
    """File-name token of a prompt set: extension dropped, "/" and " " -> "_", other odd characters -> "_"."""
    stem = re.sub(r"\.(txt|text|jsonl|json)$", "", name.strip())
    tok = re.sub(r"[^A-Za-z0-9._-]", "_", stem.replace("/", "_").replace(" ", "_")).strip(".")
    return tok or "default"


@dataclass(frozen=True)
class PromptSet:
    """One eval prompt set and the rewards scored on it.

    Attributes:
        name: the dataset key (a prompt-file path relative to data.dataset_dir, or "shapes_test" / "inline").
        token: file-name token of its images.
        records: prompt records (GenEval-style metadata where the file has it).
        rewards: eval reward names routed to this set.
    """

    name: str
    token: str
    records: tuple[dict[str, Any], ...]
    rewards: tuple[str, ...]

    def file_name(self, index: int) -> str:
        return f"{self.token}_{index:06d}.png"


def eval_prompt_sets(cfg: Config) -> list[PromptSet]:
    """The prompt sets of ``cfg`` in routing order, each capped at ``eval.num_prompts`` (0 = all)."""
    e, names = cfg.eval, list(cfg.eval.reward_weights)
    if cfg.data.kind == "shapes":
        from rtdmd_ray.shapes.prompts import eval_captions

        recs = eval_captions("test", e.num_prompts or 600, e.seed)  # = `shapes eval --seed <e.seed>`
        return [PromptSet(SHAPES_DATASET, SHAPES_DATASET, tuple(recs), tuple(names))]
    from rtdmd_ray.rewards.multi import route_rewards_to_datasets

    cap = e.num_prompts or None
    if cfg.data.kind == "inline" and not e.prompt_file and not e.dataset_map:
        recs = tuple({"prompt": p} for p in cfg.data.prompts[:cap])
        return [PromptSet("inline", "inline", recs, tuple(names))]
    base = resolve_path(cfg.data.dataset_dir)
    sets, tokens = [], set()
    for ds, rewards in route_rewards_to_datasets(names, e.dataset_map, e.prompt_file).items():
        recs = read_prompt_file(resolve_path(ds, base))[:cap]
        token = dataset_token(ds)
        while token in tokens:
            token += "_"
        tokens.add(token)
        sets.append(PromptSet(ds, token, tuple(recs), tuple(rewards)))
    return sets


def grid_selection(sets: Sequence[PromptSet], count: int) -> list[tuple[int, int]]:
    """``count`` (set position, prompt index) pairs evenly spaced over all prompts, for the report grid."""
    flat = [(si, i) for si, s in enumerate(sets) for i in range(len(s.records))]
    if count <= 0 or not flat:
        return []
    if count >= len(flat):
        return flat
    return [flat[math.floor(k * len(flat) / count)] for k in range(count)]
