"""GenEval2 / Soft-TIFA (spec rewards-inference.md §1.9): a VLM judge answers each prompt's VQA atoms.

Per (image, question) the judge sees the image and ``"<question> Answer in one word."``; the atom score is the
sum, over the expected answer's variants, of the probability of each variant's **first** token at the first
generated position. The prompt's reward is the geometric mean of its atoms (``"gm"``; ``"am"`` is the
arithmetic mean); a zero atom gives 0 and an empty VQA list the -10 sentinel.

Answer variants: "How many ..." questions use the answer, its capitalised form, both with a leading space, and
its digit (``one..ten``; unknown words map to ``"other"``) with and without a leading space; every other
question uses ``Yes, yes, " Yes", " yes"``. Duplicate first tokens are counted twice, as in the reference
(so an atom can slightly exceed 1).

Judges (``backend``):

- ``openai`` (default): an OpenAI-compatible chat-completions endpoint
  (``vllm serve Qwen/Qwen3-VL-8B-Instruct`` or Ray Serve LLM) asked for ``max_tokens=1`` with
  ``logprobs``/``top_logprobs``. Requests for all atoms of a batch go out concurrently (the server batches
  them), each with a timeout and retries with exponential backoff on connection errors, timeouts, 429 and
  5xx. Tokens outside the returned top-k count as 0. Instead of ``endpoint``, the option ``serve_app: <name>``
  names a running Ray Serve judge app (``rtdmd-ray serve-rewards CONFIG`` starts one: Ray Serve LLM on GPU
  clusters, a transformers deployment on CPU); the layer that builds the scorers resolves it to
  ``endpoint`` and ``served_model`` (``roles/judge_serve.py::resolve_judge_options``), so this module stays
  Ray-free and never sees ``serve_app`` itself.
- ``vllm``: an in-process vLLM engine (GPU only, optional import): ``LLM.chat`` with ``logprobs``.
- ``transformers``: the reference's path (paper-exact): ``AutoModelForImageTextToText`` + processor, one
  forward per atom, softmax over the full vocabulary of the first position, model cast to fp16.

The prompt -> VQA lookup comes from JSONL rows ``{"prompt", "vqa_list": [[question, answer], ...]}``
(``data_path`` or ``$RTDMD_GENEVAL2_DATA_PATH``: a file, or a directory with merged.jsonl or
train+test.jsonl).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from rtdmd_ray.rewards._common import (
    SENTINEL,
    as_scores,
    check_images,
    find_pretrained,
    load_or_missing,
    to_pil,
)

logger = logging.getLogger(__name__)

DATA_ENV = "RTDMD_GENEVAL2_DATA_PATH"
MODEL_ENV = "RTDMD_GENEVAL2_MODEL_NAME"
HUB_ID = "Qwen/Qwen3-VL-8B-Instruct"
QUESTION_SUFFIX = " Answer in one word."
YES_VARIANTS = ("Yes", "yes", " Yes", " yes")
NUMBER_WORDS = {
    "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}


# ------------------------------------------------------------------------------------------ arithmetic


def question_text(question: str) -> str:
    """The judge's user text: the question plus ``" Answer in one word."``."""
    return question + QUESTION_SUFFIX


def answer_variants(question: str, answer: str) -> list[str]:
    """Strings whose first-token probabilities are summed for one atom (order as in the reference)."""
    if question.startswith("How many"):
        cap = answer.capitalize()
        digit = NUMBER_WORDS.get(answer.lower(), "other")
        return [answer, cap, " " + answer, " " + cap, digit, " " + digit]
    return list(YES_VARIANTS)


def soft_tifa(atom_scores: Sequence[float], aggregation: str = "gm") -> float:
    """Aggregate atom scores: geometric (``"gm"``, a zero atom gives 0) or arithmetic (``"am"``) mean.

    An empty list gives the -10 sentinel (the reference's value; it is not filtered in training).
    """
    if not atom_scores:
        return SENTINEL
    if aggregation == "am":
        return float(sum(atom_scores) / len(atom_scores))
    if aggregation != "gm":
        raise ValueError(f"rewards.options.geneval2.aggregation must be 'gm' or 'am', got {aggregation!r}")
    if any(a <= 0.0 for a in atom_scores):
        return 0.0
    return float(math.exp(sum(math.log(max(a, 1e-300)) for a in atom_scores) / len(atom_scores)))


class FirstTokenDist(Protocol):
    def get(self, key: int | str, default: float = 0.0) -> float: ...


def atom_score(dist: FirstTokenDist, variants: Sequence[str], tokenizer: Any = None) -> float:
    """Σ over variants of P(first token of the variant) under the judge's first-position distribution.

    With a tokenizer, each variant's first token id is looked up (by id, or by its decoded text for servers
    that return token strings); without one, the whole variant string is looked up (exact when every variant
    is a single token).
    """
    total = 0.0
    for v in variants:
        if tokenizer is None:
            total += dist.get(v, 0.0)
            continue
        tid = tokenizer.encode(v, add_special_tokens=False)[0]
        p = dist.get(tid, None)
        total += p if p is not None else dist.get(tokenizer.decode([tid]), 0.0)
    return total


def load_vqa_lookup(path: str | os.PathLike[str]) -> dict[str, list[tuple[str, str]]]:
    """``{prompt: [(question, answer), ...]}`` from a JSONL file or a directory (merged.jsonl, else
    train.jsonl + test.jsonl, else test.jsonl).

    Raises:
        ValueError: a prompt appears twice with different VQA lists.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        if (p / "merged.jsonl").is_file():
            files = [p / "merged.jsonl"]
        else:
            files = [f for f in (p / "train.jsonl", p / "test.jsonl") if f.is_file()]
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise FileNotFoundError(
            f"geneval2: no VQA data at {p}; set rewards.options.geneval2.data_path or ${DATA_ENV}"
        )
    lookup: dict[str, list[tuple[str, str]]] = {}
    for f in files:
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            vqa = [(str(q), str(a)) for q, a in row["vqa_list"]]
            prev = lookup.setdefault(row["prompt"], vqa)
            if prev != vqa:
                raise ValueError(f"geneval2: prompt {row['prompt']!r} has two different vqa_lists in {files}")
    return lookup


# ---------------------------------------------------------------------------------------------- judges


class Judge(Protocol):
    tokenizer: Any

    def first_token_dists(self, jobs: list[tuple[bytes, str]]) -> list[FirstTokenDist]:
        """For each (PNG bytes, user text): the first generated token's distribution."""
        ...


class JudgeRequestError(RuntimeError):
    """A chat-completions request failed after all retries (names the endpoint and the last error)."""


def _png_bytes(pil_image: Any) -> bytes:
    buf = io.BytesIO()
    pil_image.save(buf, format="PNG")
    return buf.getvalue()


_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


def parse_first_token_logprobs(response: Mapping[str, Any]) -> dict[int | str, float]:
    """``{token: probability}`` of the first generated position from a chat-completions response.

    Reads ``choices[0].logprobs.content[0]`` (its ``top_logprobs`` plus the sampled token). Tokens given as
    ``"token_id:N"`` (vLLM ``return_tokens_as_token_ids``) are keyed by the integer id.
    """
    try:
        first = response["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise JudgeRequestError(
            "geneval2: the response has no choices[0].logprobs.content[0]; the server must support "
            "logprobs/top_logprobs (vllm serve does)"
        ) from exc
    dist: dict[int | str, float] = {}
    for entry in [*first.get("top_logprobs", []), first]:
        tok = entry["token"]
        m = _TOKEN_ID.match(tok)
        dist[int(m.group(1)) if m else tok] = math.exp(float(entry["logprob"]))
    return dist


class OpenAIChatJudge:
    """Client of an OpenAI-compatible chat-completions endpoint serving the judge VLM.

    Args:
        endpoint: base URL, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        model: served model name.
        tokenizer: the judge's tokenizer (exact first-token matching) or None.
        concurrency: requests in flight at once.
        timeout_s: per-request timeout.
        max_retries: retries after the first attempt (connection errors, timeouts, 429, 5xx).
        backoff_s: first retry delay; doubles each retry (with up to 10% jitter).
        top_logprobs: alternatives requested per position (vLLM's default cap is 20).
        api_key: sent as a bearer token when given.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        tokenizer: Any = None,
        concurrency: int = 16,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        top_logprobs: int = 20,
        api_key: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.tokenizer = model, tokenizer
        self.concurrency, self.timeout_s = int(concurrency), float(timeout_s)
        self.max_retries, self.backoff_s = int(max_retries), float(backoff_s)
        self.top_logprobs, self.api_key = int(top_logprobs), api_key
        self.extra_body = dict(extra_body or {})
        self.retries_done = 0

    def _body(self, png: bytes, text: str) -> dict[str, Any]:
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}],
            "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs,
            **self.extra_body,
        }

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries_done += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (1 + 0.1 * random.random()))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:200].decode(errors="replace")
                if exc.code != 429 and exc.code < 500:  # a client error will not heal by retrying
                    raise JudgeRequestError(f"geneval2: {self.url} answered {exc.code}: {detail}") from exc
                last = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = exc
        raise JudgeRequestError(
            f"geneval2: {self.url} failed after {self.max_retries + 1} attempts "
            f"({type(last).__name__}: {last}); "
            "check the judge server (rewards.options.geneval2.endpoint) or raise timeout_s/max_retries"
        )

    def first_token_dists(self, jobs: list[tuple[bytes, str]]) -> list[FirstTokenDist]:
        def one(job: tuple[bytes, str]) -> dict[int | str, float]:
            return parse_first_token_logprobs(self._post(self._body(*job)))

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(jobs)))) as pool:
            return list(pool.map(one, jobs))


class _ProbVector:
    """Full-vocabulary first-token distribution (id-keyed lookups)."""

    def __init__(self, probs: torch.Tensor) -> None:
        self.probs = probs

    def get(self, key: int | str, default: float | None = 0.0) -> float | None:
        if isinstance(key, int) and 0 <= key < self.probs.numel():
            return float(self.probs[key])
        return default


class TransformersJudge:
    """The reference's judge: transformers VLM, one forward per atom, softmax over the vocabulary (fp16)."""

    def __init__(
        self, source: str, device: str = "cpu", dtype: str = "float16", scorer: str = "geneval2"
    ) -> None:
        from transformers import AutoModelForImageTextToText

        from rtdmd_ray.rewards._vlm import load_vlm_processor

        self.device = torch.device(device)
        model = load_or_missing(
            scorer, source, lambda s: AutoModelForImageTextToText.from_pretrained(s), option="model"
        )
        self.model = model.to(self.device).to(getattr(torch, dtype)).eval().requires_grad_(False)
        self.processor = load_or_missing(scorer, source, load_vlm_processor, option="model")
        self.tokenizer = self.processor.tokenizer

    @torch.no_grad()
    def first_token_dists(self, jobs: list[tuple[bytes, str]]) -> list[FirstTokenDist]:
        from PIL import Image

        out: list[FirstTokenDist] = []
        for png, text in jobs:
            image = Image.open(io.BytesIO(png)).convert("RGB")
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
                }
            ]
            inputs = self.processor.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**inputs).logits[0, -1]
            out.append(_ProbVector(logits.float().softmax(-1).cpu()))
        return out


class VllmEngineJudge:
    """An in-process vLLM engine (GPU only): ``LLM.chat`` with ``max_tokens=1`` and ``logprobs``."""

    def __init__(
        self,
        source: str,
        *,
        dtype: str = "bfloat16",
        top_logprobs: int = 20,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int = 4096,
    ) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError(
                "geneval2 backend 'vllm' needs vllm (GPU machines: pip install rtdmd-ray[vllm]); or serve "
                "the judge with `vllm serve` and use backend='openai'"
            ) from exc
        self.llm = LLM(
            model=source,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": 1},
            max_logprobs=top_logprobs,
        )
        self.params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_logprobs)
        self.tokenizer = self.llm.get_tokenizer()

    def first_token_dists(self, jobs: list[tuple[bytes, str]]) -> list[FirstTokenDist]:
        convs = [[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                + base64.b64encode(png).decode()}},
            {"type": "text", "text": text}]}] for png, text in jobs]
        outs = self.llm.chat(convs, self.params, use_tqdm=False)
        return [{tid: math.exp(lp.logprob) for tid, lp in o.outputs[0].logprobs[0].items()} for o in outs]


# ---------------------------------------------------------------------------------------------- scorer


class GenEval2Scorer:
    """Soft-TIFA reward with a VLM judge.

    Args:
        ckpt_dir: reward checkpoint root (local judge directories ``geneval2/`` or ``Qwen3-VL-8B-Instruct/``).
        device: torch device (transformers backend).
        backend: ``"openai"`` (endpoint), ``"vllm"`` (in-process engine) or ``"transformers"`` (reference).
        data_path: VQA JSONL file or directory (default ``$RTDMD_GENEVAL2_DATA_PATH``).
        model: judge directory or hub id (``$RTDMD_GENEVAL2_MODEL_NAME``, else local dirs, else the hub id);
            for ``openai`` it is also the served model name unless ``served_model`` is given.
        endpoint: chat-completions base URL (``openai`` backend). In the config, ``serve_app: <app name>``
            may stand for it (a running Ray Serve judge app); it is resolved to ``endpoint`` and
            ``served_model`` before this class is built (``roles.judge_serve.resolve_judge_options``).
        served_model: the model name the server expects.
        tokenizer: tokenizer dir/hub id for exact first-token matching with ``openai`` ("" = none).
        aggregation: ``"gm"`` (reference) or ``"am"``.
        concurrency, timeout_s, max_retries, backoff_s, top_logprobs: client settings.
        dtype: judge dtype (the reference casts to fp16).
        judge: an already-built judge (tests).
    """

    name = "geneval2"
    differentiable = False

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        backend: str = "openai",
        data_path: str | None = None,
        model: str | None = None,
        endpoint: str | None = None,
        served_model: str | None = None,
        tokenizer: str | None = None,
        aggregation: str = "gm",
        concurrency: int = 16,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        top_logprobs: int = 20,
        dtype: str = "float16",
        judge: Judge | None = None,
    ) -> None:
        soft_tifa([1.0], aggregation)  # validates the option early
        self.aggregation = aggregation
        data = data_path or os.environ.get(DATA_ENV, "").strip()
        if not data:
            raise FileNotFoundError(
                f"geneval2 needs its VQA lists: set rewards.options.geneval2.data_path (a geneval2 jsonl "
                f"file or dir, e.g. <datasets>/geneval2/test.jsonl) or ${DATA_ENV}"
            )
        self.lookup = load_vqa_lookup(data)
        source = model or os.environ.get(MODEL_ENV, "").strip() or None
        source = find_pretrained(
            ckpt_dir,
            ["", "geneval2", "geneval2/Qwen3-VL-8B-Instruct", "Qwen3-VL-8B-Instruct"],
            HUB_ID,
            source,
        )
        if judge is not None:
            self.judge: Judge = judge
        elif backend == "openai":
            if not endpoint:
                raise ValueError(
                    "geneval2 backend 'openai' needs rewards.options.geneval2.endpoint (e.g. "
                    "http://host:8000/v1 of `vllm serve Qwen/Qwen3-VL-8B-Instruct`)"
                )
            tok = None
            if tokenizer != "":
                from transformers import AutoTokenizer

                try:
                    tok = AutoTokenizer.from_pretrained(tokenizer or source)
                except (OSError, ValueError) as exc:
                    logger.warning("geneval2: no tokenizer (%s); matching whole answer strings", exc)
            self.judge = OpenAIChatJudge(
                endpoint,
                served_model or source,
                tokenizer=tok,
                concurrency=concurrency,
                timeout_s=timeout_s,
                max_retries=max_retries,
                backoff_s=backoff_s,
                top_logprobs=top_logprobs,
            )
        elif backend == "transformers":
            self.judge = TransformersJudge(source, device=device, dtype=dtype, scorer=self.name)
        elif backend == "vllm":
            self.judge = VllmEngineJudge(source, top_logprobs=top_logprobs)
        else:
            raise ValueError(
                f"rewards.options.geneval2.backend must be openai, vllm or transformers, got {backend!r}"
            )

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        check_images(images, prompts, self.name)
        missing = [p for p in prompts if p not in self.lookup]
        if missing:
            raise KeyError(
                f"geneval2: prompt {missing[0]!r} is not in the VQA data ({len(self.lookup)} prompts)"
            )
        pngs = [_png_bytes(im) for im in to_pil(images)]
        jobs, owners = [], []
        for i, p in enumerate(prompts):
            for q, a in self.lookup[p]:
                jobs.append((pngs[i], question_text(q)))
                owners.append((i, answer_variants(q, a)))
        dists = self.judge.first_token_dists(jobs) if jobs else []
        atoms: list[list[float]] = [[] for _ in prompts]
        for (i, variants), dist in zip(owners, dists, strict=True):
            atoms[i].append(atom_score(dist, variants, self.judge.tokenizer))
        return {self.name: as_scores([soft_tifa(a, self.aggregation) for a in atoms])}
