"""GenEval2's chat-completions client against a real local HTTP server speaking the OpenAI protocol with
``logprobs``/``top_logprobs``: Soft-TIFA from the returned probabilities, concurrency, retries after a 500,
timeouts, and no retry on a 4xx."""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rtdmd_ray.rewards.geneval2 import GenEval2Scorer, JudgeRequestError, OpenAIChatJudge

# first-token probabilities the fake judge returns, by question
ANSWERS = {
    "How many dogs are in the image? Answer in one word.": {
        "two": 0.5,
        " two": 0.1,
        "2": 0.2,
        "Two": 0.05,
        "cat": 0.15,
    },
    "Are there any dogs in the image? Answer in one word.": {"Yes": 0.6, " yes": 0.2, "No": 0.2},
    "Is the dog red? Answer in one word.": {"No": 0.9, "Yes": 0.1},
}


class JudgeServer:
    """A chat-completions server on 127.0.0.1 (free port) with scripted failures."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.fail_500: dict[str, int] = {}  # question -> number of 500s still to send
        self.sleep_first: dict[str, float] = {}  # question -> seconds to stall on its first request
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body):
                if (
                    self.path != "/v1/chat/completions"
                    or body.get("max_tokens") != 1
                    or not body.get("logprobs")
                ):
                    return self._send(400, {"error": {"message": "bad request"}})
                image, text = body["messages"][0]["content"]
                png = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
                assert png[:8] == b"\x89PNG\r\n\x1a\n"
                q = text["text"]
                with server.lock:
                    stall = server.sleep_first.pop(q, 0.0)
                    fail = server.fail_500.get(q, 0)
                    if fail:
                        server.fail_500[q] = fail - 1
                if stall:
                    time.sleep(stall)
                if fail:
                    return self._send(500, {"error": {"message": "engine hiccup"}})
                time.sleep(server.delay_s)
                probs = ANSWERS.get(q, {"Yes": 0.5})
                top = [
                    {"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in probs.items()
                ]
                top = top[: body["top_logprobs"]]
                best = max(top, key=lambda e: e["logprob"])
                content = [{**best, "top_logprobs": top}]
                self._send(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": best["token"]},
                                "logprobs": {"content": content},
                                "finish_reason": "length",
                            }
                        ],
                    },
                )

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def vqa_file(tmp_path):
    rows = [
        {
            "prompt": "two dogs",
            "vqa_list": [
                ["How many dogs are in the image?", "two"],
                ["Are there any dogs in the image?", "Yes"],
            ],
        },
        {
            "prompt": "a red dog",
            "vqa_list": [["Is the dog red?", "Yes"], ["Are there any dogs in the image?", "Yes"]],
        },
        {"prompt": "nothing to ask", "vqa_list": []},
    ]
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _scorer(server, vqa_file, **kw):
    opts = dict(concurrency=4, timeout_s=2.0, max_retries=2, backoff_s=0.01)
    opts.update(kw)
    return GenEval2Scorer(
        backend="openai",
        endpoint=server.endpoint,
        served_model="judge",
        tokenizer="",
        data_path=str(vqa_file),
        **opts,
    )


def test_soft_tifa_from_server_logprobs(vqa_file):
    with JudgeServer(delay_s=0.05) as server:
        s = _scorer(server, vqa_file)
        out = s(torch.rand(3, 3, 16, 16), ["two dogs", "a red dog", "nothing to ask"])["geneval2"]
    atom_count = 0.5 + 0.1 + 0.2 + 0.05  # two, " two", "2", "Two"; " Two" and " 2" were not returned
    atom_yes = 0.6 + 0.2
    assert out[0].item() == pytest.approx(math.sqrt(atom_count * atom_yes), rel=1e-5)
    assert out[1].item() == pytest.approx(math.sqrt(0.1 * atom_yes), rel=1e-5)
    assert out[2].item() == -10.0  # empty VQA list -> sentinel
    assert len(server.requests) == 4 and server.max_in_flight > 1  # concurrent requests
    req = server.requests[0]
    assert req["model"] == "judge" and req["temperature"] == 0.0 and req["top_logprobs"] == 20


def test_retry_after_500(vqa_file):
    with JudgeServer() as server:
        server.fail_500["Is the dog red? Answer in one word."] = 2
        s = _scorer(server, vqa_file)
        out = s(torch.rand(1, 3, 8, 8), ["a red dog"])["geneval2"]
        assert s.judge.retries_done == 2
    assert out[0].item() == pytest.approx(math.sqrt(0.1 * 0.8), rel=1e-5)


def test_timeout_then_success_and_timeout_exhausted(vqa_file):
    with JudgeServer() as server:
        server.sleep_first["Is the dog red? Answer in one word."] = 1.0
        s = _scorer(server, vqa_file, timeout_s=0.3)
        t0 = time.perf_counter()
        out = s(torch.rand(1, 3, 8, 8), ["a red dog"])["geneval2"]
        assert s.judge.retries_done == 1 and time.perf_counter() - t0 < 1.5
        assert out[0].item() == pytest.approx(math.sqrt(0.1 * 0.8), rel=1e-5)
        judge = OpenAIChatJudge(server.endpoint, "judge", timeout_s=0.2, max_retries=1, backoff_s=0.01)
        server.delay_s = 0.6
        with pytest.raises(JudgeRequestError, match="after 2 attempts"):
            judge.first_token_dists([(b"\x89PNG\r\n\x1a\n", "Is the dog red? Answer in one word.")])


def test_client_error_is_not_retried():
    with JudgeServer() as server:
        judge = OpenAIChatJudge(server.endpoint + "/wrong", "judge", max_retries=3, backoff_s=0.01)
        with pytest.raises(JudgeRequestError, match="400"):
            judge.first_token_dists([(b"png", "q")])
        assert judge.retries_done == 0 and len(server.requests) == 1


def test_unreachable_endpoint_fails_with_teaching_error():
    judge = OpenAIChatJudge("http://127.0.0.1:9/v1", "judge", timeout_s=0.2, max_retries=1, backoff_s=0.01)
    with pytest.raises(JudgeRequestError, match="rewards.options.geneval2.endpoint"):
        judge.first_token_dists([(b"png", "q")])
