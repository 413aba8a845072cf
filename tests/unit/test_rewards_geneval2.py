"""GenEval2 Soft-TIFA arithmetic (spec §7.5), VQA lookup loading and first-token matching."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rtdmd_ray.rewards.geneval2 import (
    GenEval2Scorer,
    answer_variants,
    atom_score,
    load_vqa_lookup,
    parse_first_token_logprobs,
    question_text,
    soft_tifa,
)


def test_answer_variants():
    q = "How many cats are in the image?"
    assert answer_variants(q, "three") == ["three", "Three", " three", " Three", "3", " 3"]
    assert answer_variants(q, "ten")[4:] == ["10", " 10"]
    assert answer_variants(q, "dozens")[4:] == ["other", " other"]
    assert answer_variants("Is the cat black?", "Yes") == ["Yes", "yes", " Yes", " yes"]
    assert question_text("Is the cat black?") == "Is the cat black? Answer in one word."


def test_soft_tifa_aggregation():
    assert soft_tifa([0.9, 0.8, 0.5]) == pytest.approx(0.7114, abs=1e-4)
    assert soft_tifa([0.9, 0.8, 0.5], "am") == pytest.approx(0.7333, abs=1e-4)
    assert soft_tifa([0.9, 0.0]) == 0.0
    assert soft_tifa([]) == -10.0
    with pytest.raises(ValueError, match="aggregation"):
        soft_tifa([0.5], "median")


class SplitDigitTokenizer:
    """Like Qwen's tokenizer for these strings: a leading space before a digit is its own token."""

    vocab = {"three": 1, "Three": 2, " three": 3, " Three": 4, "3": 5, " ": 6, "1": 7, "0": 8}

    def encode(self, text, add_special_tokens=False):
        if text.startswith(" ") and text[1:].isdigit():
            return [6] + [self.vocab[c] for c in text[1:]]
        if text.isdigit():
            return [self.vocab[c] for c in text]
        return [self.vocab[text]]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def test_atom_score_first_token_quirks():
    variants = answer_variants("How many cats are in the image?", "three")
    dist = {1: 0.4, 3: 0.1, 5: 0.2, 6: 0.05, 2: 0.01}
    # " 3" contributes P(" "), the bare-space token (reference quirk); " Three" (id 4) is absent -> 0
    assert atom_score(dist, variants, SplitDigitTokenizer()) == pytest.approx(0.4 + 0.01 + 0.1 + 0.2 + 0.05)
    # string-keyed server output is matched through the decoded first token
    sdist = {"three": 0.4, " ": 0.05, "3": 0.2}
    assert atom_score(sdist, variants, SplitDigitTokenizer()) == pytest.approx(0.65)
    # "ten" -> "10" whose first token is "1"
    ten = answer_variants("How many?", "ten")[4:]
    assert atom_score({7: 0.3, 6: 0.1}, ten, SplitDigitTokenizer()) == pytest.approx(0.4)
    assert atom_score({"Yes": 0.5, " yes": 0.25}, ["Yes", "yes", " Yes", " yes"]) == pytest.approx(0.75)
    # two variants with the same first token are both counted (the atom can exceed 1)
    assert atom_score({"Yes": 0.6}, ["Yes", "Yes"]) == pytest.approx(1.2)


def test_parse_response_ids_and_strings():
    resp = {
        "choices": [
            {
                "logprobs": {
                    "content": [
                        {
                            "token": "Yes",
                            "logprob": math.log(0.7),
                            "top_logprobs": [
                                {"token": "Yes", "logprob": math.log(0.7)},
                                {"token": "token_id:42", "logprob": math.log(0.2)},
                            ],
                        }
                    ]
                }
            }
        ]
    }
    dist = parse_first_token_logprobs(resp)
    assert dist["Yes"] == pytest.approx(0.7) and dist[42] == pytest.approx(0.2)


def test_vqa_lookup_loading(tmp_path):
    rows = [{"prompt": "a", "vqa_list": [["Is it?", "Yes"]]}, {"prompt": "b", "vqa_list": []}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "a", "vqa_list": [["Is it?", "Yes"]]}))
    assert load_vqa_lookup(tmp_path) == {"a": [("Is it?", "Yes")], "b": []}
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "a", "vqa_list": [["Is it not?", "Yes"]]}))
    with pytest.raises(ValueError, match="two different vqa_lists"):
        load_vqa_lookup(tmp_path)
    (tmp_path / "merged.jsonl").write_text(json.dumps(rows[0]))
    assert load_vqa_lookup(tmp_path) == {"a": [("Is it?", "Yes")]}


def test_shipped_geneval2_test_set_parses():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "data" / "prompts" / "geneval2" / "test.jsonl"
    if not path.is_file():
        pytest.skip("vendored prompt sets not present (data/prompts)")
    lookup = load_vqa_lookup(path)
    assert len(lookup) == 800 and all(3 <= len(v) <= 11 for v in lookup.values())


class FixedJudge:
    tokenizer = None

    def __init__(self):
        self.jobs = []

    def first_token_dists(self, jobs):
        self.jobs += jobs
        return [{"Yes": 0.81} for _ in jobs]


def test_scorer_missing_prompt_and_options(tmp_path, monkeypatch):
    monkeypatch.delenv("RTDMD_GENEVAL2_DATA_PATH", raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "vqa_list": [["Is it?", "Yes"], ["Is it blue?", "Yes"]]}))
    judge = FixedJudge()
    s = GenEval2Scorer(data_path=str(data), judge=judge)
    out = s(torch.rand(2, 3, 8, 8), ["p", "p"])["geneval2"]
    assert torch.allclose(out, torch.full((2,), 0.81)) and len(judge.jobs) == 4
    assert judge.jobs[1][1] == "Is it blue? Answer in one word."
    with pytest.raises(KeyError, match="not in the VQA data"):
        s(torch.rand(1, 3, 8, 8), ["unknown prompt"])
    with pytest.raises(FileNotFoundError, match="data_path"):
        GenEval2Scorer(judge=judge)
    with pytest.raises(ValueError, match="endpoint"):
        GenEval2Scorer(data_path=str(data), backend="openai")
