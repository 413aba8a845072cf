"""OCR reward: the similarity arithmetic of spec §7.4 and real OCR (rapidocr's bundled PP-OCRv4 weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdmd_ray.rewards.ocr import (
    OCRScorer,
    extract_target,
    join_lines,
    levenshtein,
    ocr_similarity,
    paddleocr_home,
)


def test_target_and_similarity_arithmetic():
    t = extract_target('A sign that says "Hello World"')
    assert t == "Hello World"
    assert ocr_similarity("HELLO W0RLD", t) == pytest.approx(0.9)  # one substitution over 10 chars
    assert ocr_similarity("xxhelloworldyy", t) == 1.0  # substring
    assert ocr_similarity("", t) == 0.0
    assert ocr_similarity("q" * 50, t) == 0.0  # distance clamped to len(T)
    assert extract_target('first "one" then "two"') == "one"
    with pytest.raises(IndexError, match="quoted"):
        extract_target("no quotes here")
    with pytest.raises(ValueError, match="empty"):
        ocr_similarity("abc", "   ")


def test_levenshtein_pure_python():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0


def test_zero_confidence_lines_are_dropped():
    assert join_lines([("hel", 0.9), ("xx", 0.0), ("lo", 0.5)]) == "hello"


class FakeEngine:
    def __init__(self, outputs):
        self.outputs = list(outputs)

    def recognize(self, image_rgb):
        out = self.outputs.pop(0)
        if isinstance(out, Exception):
            raise out
        return out


def test_scorer_with_fake_engine_scores_crash_as_zero():
    s = OCRScorer(engine=FakeEngine([[("Hello", 0.9), ("World", 0.8)], RuntimeError("ocr died")]))
    out = s(torch.zeros(2, 3, 8, 8), ['say "hello world"', 'say "hello world"'])["ocr"]
    assert torch.equal(out, torch.tensor([1.0, 0.0]))


def test_paddleocr_cache_order(tmp_path, monkeypatch):
    monkeypatch.delenv("RTDMD_PADDLEOCR_HOME", raising=False)
    ckpt, repo = tmp_path / "ckpt", tmp_path / "repo"
    assert paddleocr_home(ckpt, repo) == ckpt / ".paddleocr"  # nothing populated: the download target
    (repo / ".paddleocr" / "det").mkdir(parents=True)
    (repo / ".paddleocr" / "det" / "inference.pdmodel").write_bytes(b"x")
    assert paddleocr_home(ckpt, repo) == repo / ".paddleocr"
    (ckpt / ".paddleocr").mkdir(parents=True)
    (ckpt / ".paddleocr" / "m.onnx").write_bytes(b"x")
    assert paddleocr_home(ckpt, repo) == ckpt / ".paddleocr"
    monkeypatch.setenv("RTDMD_PADDLEOCR_HOME", str(tmp_path / "env"))
    assert paddleocr_home(ckpt, repo) == tmp_path / "env"


def test_unknown_backend_is_a_teaching_error():
    with pytest.raises(ValueError, match="rewards.options.ocr.backend"):
        OCRScorer(backend="tesseract")


def test_real_ocr_on_rendered_text():
    pytest.importorskip("rapidocr_onnxruntime")
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (224, 64), "white")
    ImageDraw.Draw(img).text((8, 12), "Hello World", fill="black", font=ImageFont.load_default(size=32))
    text = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    blank = torch.ones_like(text)
    s = OCRScorer(backend="rapidocr")
    prompts = ['A sign that says "Hello World"', 'A sign that says "Hello World"']
    out = s(torch.stack([text, blank]), prompts)["ocr"]
    assert out[0] == 1.0 and out[1] == 0.0
    # a different target on the same image: partial credit from the real recognition
    partial = s(text[None], ['A sign that says "Hello Word"'])["ocr"]
    assert partial[0] == pytest.approx(1 - 1 / 9, abs=1e-6)  # "helloworld" vs "helloword": one deletion
