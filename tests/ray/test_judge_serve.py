"""GenEval2's judge as a Ray Serve app found by name (roles/judge_serve.py), on local CPU Ray.

The CPU app is a Serve deployment answering the OpenAI chat protocol with log-probs from a tiny Qwen3-VL of
the real transformers class (no vLLM). GenEval2Scorer's ``openai`` client, pointed at it by ``serve_app``
(resolved to the endpoint by app name), must give the same Soft-TIFA scores as the in-process
``transformers`` backend on the same model, images and prompts. A missing app fails with one line naming it
and how to start it.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from rtdmd_ray.rewards.geneval2 import GenEval2Scorer

pytestmark = pytest.mark.ray

APP = "g2judge"
IMAGE_PX = 64  # Qwen3-VL patches of 16 px, 2 x 2 merge: 4 image tokens per image
VQA = [
    {"prompt": "two black cats", "vqa_list": [["How many cats are in the image?", "two"],
                                              ["Is the cat black?", "Yes"]]},
    {"prompt": "a red cube", "vqa_list": [["Is there a cube?", "Yes"], ["Is the cube red?", "Yes"],
                                          ["How many cubes are in the image?", "one"]]},
    {"prompt": "nothing to ask", "vqa_list": []},
]


def save_tiny_qwen3_vl(path: Path, *, seed: int = 0) -> Path:
    """A random tiny ``Qwen3VLForConditionalGeneration`` + its processor files (byte-level Qwen tokenizer,
    chat template, PIL image processor fixed at IMAGE_PX x IMAGE_PX), loaded by geneval2's processor loader
    without torchvision. The LM head is scaled up so the first-token distribution is far from uniform."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    from rtdmd_ray.rewards.tiny import (
        QWEN_CHAT_TEMPLATE,
        QWEN_SPECIAL_TOKENS,
        tiny_qwen_tokenizer,
        write_json,
    )

    torch.manual_seed(seed)
    tok = tiny_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    model = Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    pixels = IMAGE_PX * IMAGE_PX
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=16,
                                               merge_size=2)
    image_processor.save_pretrained(path)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    write_json(path / "processor_config.json", {"processor_class": Qwen3VLProcessor.__name__})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return save_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3vl") / "tiny-qwen3-vl")


@pytest.fixture(scope="module")
def vqa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("g2") / "test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in VQA))
    return path


@pytest.fixture(scope="module")
def serve_local(ray_local):
    """Serve on the session's local Ray, its HTTP proxy on 127.0.0.1:<free port>; shut down after the module
    (the session fixture shuts Ray down)."""
    from ray import serve

    port = free_port()
    serve.shutdown()  # an earlier Serve (reward apps start it without HTTP proxies) would keep its options
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


def _post(url: str, body: dict) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_served_judge_found_by_app_name_matches_in_process_transformers(serve_local, judge_dir, vqa_file):
    from ray import serve

    from rtdmd_ray.roles.judge_serve import resolve_judge_options, start_judge_app

    torch.set_num_threads(1)
    endpoint = start_judge_app(APP, {"model": str(judge_dir), "dtype": "float32", "cpus_per_replica": 1,
                                     "max_batch_size": 8})
    try:
        assert endpoint == f"http://127.0.0.1:{serve_local}/{APP}/v1"
        local = GenEval2Scorer(backend="transformers", model=str(judge_dir), data_path=str(vqa_file),
                               dtype="float32")
        vocab = len(local.judge.tokenizer)
        # the options a config gives: the app by name, the judge dir for the tokenizer (exact first tokens),
        # every vocabulary entry's log-prob back (the CPU app allows it; vLLM caps top_logprobs at 20)
        opts = resolve_judge_options({"serve_app": APP, "model": str(judge_dir), "data_path": str(vqa_file),
                                      "top_logprobs": vocab, "concurrency": 4, "timeout_s": 60.0})
        assert opts["endpoint"] == endpoint and opts["served_model"] == APP and "serve_app" not in opts
        served = GenEval2Scorer(backend="openai", **opts)

        g = torch.Generator().manual_seed(0)
        images = torch.rand(4, 3, IMAGE_PX, IMAGE_PX, generator=g)
        prompts = ["two black cats", "a red cube", "nothing to ask", "two black cats"]
        want = local(images, prompts)["geneval2"]
        got = served(images, prompts)["geneval2"]
        assert want[2].item() == got[2].item() == -10.0  # empty VQA list: the sentinel, no request
        assert torch.allclose(got, want, rtol=1e-4, atol=0.0), (got, want)
        # the judge is far from uniform, so a wrong token or image would move the scores
        assert (want[[0, 1, 3]] > 0).all() and abs(want[0] - want[3]) > 1e-3 * want[0]

        # the protocol: OpenAI response shape, a 400 for a non-judge request, a 404 for another model
        from rtdmd_ray.rewards._common import to_pil
        from rtdmd_ray.rewards.geneval2 import _png_bytes

        body = served.judge._body(_png_bytes(to_pil(images[:1])[0]), "Is there a cube? Answer in one word.")
        code, resp = _post(endpoint + "/chat/completions", {**body, "top_logprobs": 5})
        first = resp["choices"][0]["logprobs"]["content"][0]
        assert code == 200 and resp["model"] == APP and len(first["top_logprobs"]) == 5
        assert first["token"] == first["top_logprobs"][0]["token"] == resp["choices"][0]["message"]["content"]
        code, resp = _post(endpoint + "/chat/completions", {**body, "max_tokens": 8})
        assert code == 400 and "max_tokens=1" in resp["error"]["message"]
        code, resp = _post(endpoint + "/chat/completions", {**body, "model": "other"})
        assert code == 404 and APP in resp["error"]["message"]
    finally:
        serve.delete(APP)


def test_missing_app_is_one_teaching_line(serve_local):
    from rtdmd_ray.roles.judge_serve import JudgeAppMissing, judge_endpoint, resolve_judge_options

    with pytest.raises(JudgeAppMissing) as e:
        judge_endpoint("no-such-judge")
    msg = str(e.value)
    assert "'no-such-judge'" in msg and "rtdmd-ray serve-rewards CONFIG" in msg and "\n" not in msg
    with pytest.raises(JudgeAppMissing, match="no-such-judge"):
        resolve_judge_options({"serve_app": "no-such-judge", "data_path": "x"})
    assert resolve_judge_options({"endpoint": "http://h:1/v1"}) == {"endpoint": "http://h:1/v1"}
    with pytest.raises(ValueError, match="not both"):
        resolve_judge_options({"serve_app": "a", "endpoint": "http://h:1/v1"})


def test_llm_app_config_and_missing_extra():
    """The GPU app's LLMConfig fields (Ray 2.60 ray.serve.llm); without ray[llm] one line names the extra."""
    from rtdmd_ray.roles import judge_serve as js

    cfg = js.judge_app_config("judge", "Qwen/Qwen3-VL-8B-Instruct", min_replicas=1, max_replicas=4,
                              target_ongoing_requests=32, engine_kwargs={"max_model_len": 8192},
                              accelerator_type="H100")
    assert cfg["model_loading_config"] == {"model_id": "judge", "model_source": "Qwen/Qwen3-VL-8B-Instruct"}
    assert cfg["engine_kwargs"] == {"max_model_len": 8192, "limit_mm_per_prompt": {"image": 1},
                                    "max_logprobs": 20}
    assert cfg["deployment_config"]["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32.0}
    assert cfg["accelerator_type"] == "H100"
    assert "accelerator_type" not in js.judge_app_config("judge", "m")
    with pytest.raises(ValueError, match="unknown option"):
        js.start_judge_app("judge", {"replicas": 2})
    try:
        import ray.serve.llm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"rtdmd-ray\[vllm\]") as e:
            js.build_judge_llm_app("judge", "m")
        assert "\n" not in str(e.value)
    else:  # a GPU machine with the extra: the config validates against the real LLMConfig
        from ray.serve.llm import LLMConfig

        assert LLMConfig(**cfg).model_id == "judge"


def test_a_run_starts_the_judge_app_it_names_and_scores_through_it(serve_local, judge_dir, vqa_file):
    """The RL reward role with geneval2 on Serve and ``rewards.options.geneval2.serve_app`` naming an app that
    is not running: the pool starts the judge app from ``rewards.serve.judge``, the geneval2 replica finds it
    by name, the scores equal the in-process transformers judge, and shutdown deletes both apps."""
    import ray
    from ray import serve

    from rtdmd_ray.config import RewardsConfig
    from rtdmd_ray.roles.reward_serve import RewardServePool
    from rtdmd_ray.roles.sampler import ScoreRequest
    from rtdmd_ray.types import quantize_images

    torch.set_num_threads(1)
    local = GenEval2Scorer(backend="transformers", model=str(judge_dir), data_path=str(vqa_file),
                           dtype="float32")
    rewards = RewardsConfig(
        weights={"geneval2": 1.0}, device="cpu",
        options={"geneval2": {"serve_app": "g2run", "model": str(judge_dir), "data_path": str(vqa_file),
                              "top_logprobs": len(local.judge.tokenizer), "timeout_s": 60.0}},
        serving="serve",
        serve={"cpus_per_replica": 0.5, "app_name": "t-judge-run",
               "judge": {"model": str(judge_dir), "dtype": "float32", "cpus_per_replica": 1}},
    )
    assert "g2run" not in serve.status().applications
    pool = RewardServePool(rewards=rewards)
    try:
        assert pool.judge_app == "g2run" and "g2run" in serve.status().applications
        g = torch.Generator().manual_seed(1)
        images = quantize_images(torch.rand(3, 3, IMAGE_PX, IMAGE_PX, generator=g))
        prompts = ["two black cats", "a red cube", "two black cats"]
        req = ScoreRequest(images, prompts, [{} for _ in prompts])
        job = type("Job", (), {"key": 0, "num_images": 3, "request_ref": ray.put(req), "stats_ref": None})()
        got, _ = pool.score([job])
        want = local(images.float() / 255.0, prompts)["geneval2"]
        assert torch.allclose(got[0].scores["geneval2"], want.float(), rtol=1e-4, atol=0.0), (got, want)
    finally:
        pool.shutdown()
    apps = serve.status().applications
    assert "g2run" not in apps and "t-judge-run" not in apps
