"""ShapeWorld caption grammar, GenEval-style metadata, and the deterministic disjoint train/test prompt sets.

Every caption has the six GenEval tags' semantics with shapes as the object classes:

- ``single_object``  "a photo of a circle"                     include [{class, count 1}]
- ``two_object``     "a photo of a circle and a square"        include [{class A, 1}, {class B, 1}]
- ``counting``       "a photo of three squares"                include [{class, n}], exclude [{class, n + 1}]
- ``colors``         "a photo of a red circle"                 include [{class, 1, color}]
- ``position``       "a photo of a circle left of a square"    include [{B, 1}, {A, 1, position [rel, 0]}]
- ``color_attr``     "a photo of a red circle and a blue square" include [{A, 1, color}, {B, 1, color}]

Colours not named by the caption are free: the renderer draws them at random (the generator must learn that
they are free). Captions are prefixed by one of ``PREFIXES`` so that even the tags with few compositions
(single_object: 3 shapes) have enough distinct strings for disjoint train/test sets.

The teacher trains on the whole grammar (it is the "pretrained" model); the RL stage trains on
``train_prompts`` and evaluates on ``test_prompts``, which share no caption string.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
# GenEval relation names (image y grows downward)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
PREFIXES: tuple[str, ...] = ("a photo of", "an image of", "a picture of")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# counting captions ask for 2, 3 or 4 objects; 4 is rarer in training (hardest to fit in 32 px)
COUNT_TRAIN_PROBS: dict[int, float] = {2: 0.4, 3: 0.35, 4: 0.25}

MAX_TEXT_TOKENS = 12  # BOS + at most 10 words + EOS (checked by tests/unit/test_shapes_prompts.py)


def caption_contents(tag: str) -> list[tuple[str, dict[str, Any]]]:
    """All compositions of one tag: ``[(caption_body, metadata_without_prompt), ...]`` in a fixed order.

    ``caption_body`` lacks the prefix ("a circle left of a square"); ``make_prompt`` adds it.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    if tag == "single_object":
        for s in SHAPES:
            out.append((f"a {s}", {"tag": tag, "include": [{"class": s, "count": 1}]}))
    elif tag == "two_object":
        for a, b in itertools.permutations(SHAPES, 2):
            out.append((f"a {a} and a {b}", {"tag": tag, "include": [{"class": a, "count": 1},
                                                                     {"class": b, "count": 1}]}))
    elif tag == "counting":
        for s in SHAPES:
            for n, w in COUNT_WORDS.items():
                out.append((f"{w} {PLURALS[s]}", {"tag": tag, "include": [{"class": s, "count": n}],
                                                   "exclude": [{"class": s, "count": n + 1}]}))
    elif tag == "colors":
        for s in SHAPES:
            for c in COLORS:
                out.append((f"a {c} {s}", {"tag": tag, "include": [{"class": s, "count": 1, "color": c}]}))
    elif tag == "position":
        for a, b in itertools.permutations(SHAPES, 2):
            for rel in RELATIONS:
                # GenEval layout: include[0] is the reference object, include[1] stands in `rel` to it
                out.append((f"a {a} {rel} a {b}", {"tag": tag, "include": [
                    {"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]}))
    elif tag == "color_attr":
        for a, b in itertools.permutations(SHAPES, 2):
            for ca, cb in itertools.permutations(COLORS, 2):
                out.append((f"a {ca} {a} and a {cb} {b}", {"tag": tag, "include": [
                    {"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]}))
    else:
        raise ValueError(f"unknown ShapeWorld tag {tag!r}; expected one of {TAGS}")
    return out


def make_prompt(prefix: str, body: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata dict with the GenEval fields (``tag``, ``include``, optional ``exclude``, ``prompt``)."""
    m = json.loads(json.dumps(meta))  # deep copy, JSON-clean
    m["prompt"] = f"{prefix} {body}"
    return m


def all_prompts() -> list[dict[str, Any]]:
    """Every caption of the grammar (prefix × composition), each with its metadata, in a fixed order."""
    return [make_prompt(p, body, meta)
            for tag in TAGS for body, meta in caption_contents(tag) for p in PREFIXES]


def _split_key(prompt: str, seed: int) -> int:
    # a stable hash (Python's hash() is salted per process)
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt}".encode()).digest()[:8], "little")


def split_prompts(
    seed: int = 0, test_fraction: float = 0.5
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic disjoint ``(train, test)`` prompt sets, split per tag by caption string.

    For each tag the captions are ordered by a seeded hash and the first ``test_fraction`` go to test, so
    both sets cover every tag. Returns lists of metadata dicts (GenEval fields).
    """
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for tag in TAGS:
        items = [make_prompt(p, body, meta) for body, meta in caption_contents(tag) for p in PREFIXES]
        items.sort(key=lambda m: _split_key(m["prompt"], seed))
        n_test = max(1, min(len(items) - 1, round(len(items) * test_fraction)))
        test.extend(items[:n_test])
        train.extend(items[n_test:])
    return train, test


def train_prompts(seed: int = 0) -> list[dict[str, Any]]:
    return split_prompts(seed)[0]


def test_prompts(seed: int = 0) -> list[dict[str, Any]]:
    return split_prompts(seed)[1]


def balanced_eval_prompts(prompts: list[dict[str, Any]], n_per_tag: int, seed: int) -> list[dict[str, Any]]:
    """``n_per_tag`` prompts of each tag, cycling through a seeded shuffle of that tag's prompts."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for tag in TAGS:
        pool = [m for m in prompts if m["tag"] == tag]
        if not pool:
            continue
        order = rng.permutation(len(pool))
        out.extend(pool[int(order[i % len(pool)])] for i in range(n_per_tag))
    return out


EVAL_SPLITS = ("test", "validation")
VALIDATION_SEED_OFFSET = 555  # the validation draw is not the CFG pick's (seed + 999) nor a test draw


def eval_captions(split: str, n_captions: int, seed: int) -> list[dict[str, Any]]:
    """THE caption draw of every ShapeWorld evaluation: ``n_captions // 6`` captions of each tag.

    ``split="test"``: held-out test captions (results tables, ``rtdmd-ray eval``); ``"validation"``: captions
    of the train split, the ones training samples from (in-run eval, ``shapes eval --split validation``), so
    choices made while training never look at test. One ``(split, n_captions, seed)`` gives one list, whoever
    asks: an in-run validation figure and a ``shapes eval`` figure of the same adapter are comparable.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"ShapeWorld eval split={split!r}: use one of {EVAL_SPLITS}")
    train, test = split_prompts(0)
    if split == "test":
        return balanced_eval_prompts(test, max(1, n_captions // len(TAGS)), seed)
    return balanced_eval_prompts(train, max(1, n_captions // len(TAGS)), seed + VALIDATION_SEED_OFFSET)


def sample_training_prompt(rng: np.random.Generator) -> dict[str, Any]:
    """One caption from the whole grammar: tag uniform, composition uniform (counting: COUNT_TRAIN_PROBS)."""
    tag = TAGS[int(rng.integers(len(TAGS)))]
    contents = caption_contents_cached(tag)
    if tag == "counting":
        counts = list(COUNT_TRAIN_PROBS)
        n = counts[int(rng.choice(len(counts), p=list(COUNT_TRAIN_PROBS.values())))]
        contents = [c for c in contents if c[1]["include"][0]["count"] == n]
    body, meta = contents[int(rng.integers(len(contents)))]
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    return make_prompt(prefix, body, meta)


_CACHE: dict[str, list[tuple[str, dict[str, Any]]]] = {}


def caption_contents_cached(tag: str) -> list[tuple[str, dict[str, Any]]]:
    if tag not in _CACHE:
        _CACHE[tag] = caption_contents(tag)
    return _CACHE[tag]


def vocabulary() -> list[str]:
    """Every word the grammar uses (the word-level tokenizer's vocabulary, after the special tokens)."""
    words: set[str] = set()
    for m in all_prompts():
        words.update(m["prompt"].split())
    return sorted(words)


def write_jsonl(prompts: list[dict[str, Any]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for m in prompts:
            f.write(json.dumps(m) + "\n")
