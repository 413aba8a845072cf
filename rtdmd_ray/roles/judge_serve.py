"""GenEval2's VLM judge as a Ray Serve application, found by its app name.

Two apps answer the same OpenAI chat-completions route (``POST <route_prefix>/v1/chat/completions`` with
``max_tokens=1``, ``logprobs``, ``top_logprobs``), so ``rewards/geneval2.py``'s ``OpenAIChatJudge`` talks to
either one unchanged:

- ``engine: vllm`` (GPU clusters): a Ray Serve LLM app, ``LLMConfig`` (vLLM ``engine_kwargs``, autoscaling,
  optional ``accelerator_type``) + ``build_openai_app`` (:func:`build_judge_llm_app`). Needs the GPU extra
  (``ray[llm]``, ``vllm``), imported only here.
- ``engine: transformers`` (CPU, or a GPU without vLLM): :func:`transformers_judge_deployment`, a Serve
  deployment with a FastAPI ingress that runs geneval2's own ``TransformersJudge`` (the paper-exact
  processor/prompt path, full-vocabulary softmax) and answers with the first position's top-k log-probs.

Both serve the model under the app's name and behind the route prefix ``/<name>``. :func:`judge_endpoint`
turns an app name into the OpenAI base URL ``http://<proxy host>:<port>/<name>/v1`` (from the Serve
controller's view of the app and its HTTP proxies) and :func:`resolve_judge_options` rewrites geneval2's
``{"serve_app": name}`` option into ``{"endpoint": ..., "served_model": name}``: ``rewards/`` stays Ray-free.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from rtdmd_ray.config.registries import JUDGE_APP_FIELDS
from rtdmd_ray.rewards.geneval2 import HUB_ID

LLM_EXTRA = "pip install 'ray[serve,llm]==2.60.0' 'rtdmd-ray[vllm]'"
# vLLM settings the judge needs: one image per prompt, logprobs up to the client's top_logprobs (20)
JUDGE_ENGINE_DEFAULTS: dict[str, Any] = {
    "max_model_len": 4096,
    "limit_mm_per_prompt": {"image": 1},
    "max_logprobs": 20,
}
MIN_LOGPROB = -9999.0  # what vLLM reports for a token of probability 0 (JSON has no -inf)


class JudgeAppMissing(LookupError):
    """No running Serve application of that name (names the app and how to start it)."""


class JudgeBadRequest(ValueError):
    """A chat-completions request this judge cannot answer (HTTP 400/404 with an OpenAI error body)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------- GPU app


def judge_app_config(
    name: str,
    model_source: str,
    *,
    min_replicas: int = 1,
    max_replicas: int = 1,
    target_ongoing_requests: float = 16.0,
    engine_kwargs: Mapping[str, Any] | None = None,
    accelerator_type: str | None = None,
) -> dict[str, Any]:
    """The ``LLMConfig`` fields of the judge app (Ray 2.60 ``ray.serve.llm``), as a plain dict.

    The model is served under ``name`` (``model_loading_config.model_id``), the app name, so a client that
    found the app by name also knows the model to ask for.
    """
    cfg: dict[str, Any] = {
        "model_loading_config": {"model_id": name, "model_source": model_source},
        "engine_kwargs": {**JUDGE_ENGINE_DEFAULTS, **dict(engine_kwargs or {})},
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": int(min_replicas),
                "max_replicas": int(max_replicas),
                "target_ongoing_requests": float(target_ongoing_requests),
            }
        },
    }
    if accelerator_type:
        cfg["accelerator_type"] = accelerator_type
    return cfg


def build_judge_llm_app(
    name: str,
    model_source: str,
    *,
    min_replicas: int = 1,
    max_replicas: int = 1,
    target_ongoing_requests: float = 16.0,
    engine_kwargs: Mapping[str, Any] | None = None,
    accelerator_type: str | None = None,
) -> Any:
    """A Ray Serve LLM OpenAI app (vLLM) serving the judge under ``name`` (GPU clusters, ``ray[llm]``)."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as exc:
        raise ImportError(
            f"the GenEval2 judge's vllm engine needs Ray Serve LLM and vLLM (GPU machines: {LLM_EXTRA}); "
            f"on CPU use rewards.options.geneval2 engine: transformers ({type(exc).__name__}: {exc})"
        ) from exc
    llm_config = LLMConfig(**judge_app_config(
        name, model_source, min_replicas=min_replicas, max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests, engine_kwargs=engine_kwargs,
        accelerator_type=accelerator_type,
    ))
    return build_openai_app({"llm_configs": [llm_config]})


# ------------------------------------------------------------------------------------- transformers (CPU)


def _data_uri_bytes(url: str) -> bytes:
    if not url.startswith("data:") or "," not in url:
        raise JudgeBadRequest("this judge takes images as data: URIs (base64), not fetched URLs")
    head, payload = url.split(",", 1)
    if not head.endswith(";base64"):
        raise JudgeBadRequest("image data URI must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise JudgeBadRequest(f"image data URI is not valid base64: {exc}") from exc


def parse_judge_request(body: Mapping[str, Any]) -> tuple[bytes, str, int]:
    """(image bytes, user text, top_logprobs) of a judge request: the last user message holds one image
    (``image_url`` data URI) and its text parts; ``max_tokens`` must be 1 and ``logprobs`` true."""
    if body.get("max_tokens", body.get("max_completion_tokens")) != 1 or not body.get("logprobs"):
        raise JudgeBadRequest(
            "this judge answers only max_tokens=1 with logprobs=true (the first token's distribution)"
        )
    k = body.get("top_logprobs", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise JudgeBadRequest(f"top_logprobs must be an integer >= 0, got {k!r}")
    users = [m for m in body.get("messages") or [] if isinstance(m, Mapping) and m.get("role") == "user"]
    if not users:
        raise JudgeBadRequest("messages holds no user message")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    images = [_data_uri_bytes(p["image_url"]["url"]) for p in parts if p.get("type") == "image_url"]
    text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
    if len(images) != 1:
        raise JudgeBadRequest(f"the judge needs exactly one image per request, got {len(images)}")
    return images[0], text, k


def _token_entry(tokenizer: Any, tid: int, logprob: float, as_ids: bool) -> dict[str, Any]:
    text = tokenizer.decode([tid])
    return {
        "token": f"token_id:{tid}" if as_ids else text,
        "logprob": logprob,
        "bytes": list(text.encode("utf-8", errors="replace")),
    }


def chat_completion_response(
    probs: Any, tokenizer: Any, *, model: str, top_logprobs: int, tokens_as_ids: bool = False
) -> dict[str, Any]:
    """The OpenAI chat-completions response of one generated token: the argmax (temperature 0) with the
    first position's ``top_logprobs`` most likely tokens and their log-probabilities."""
    import torch

    probs = torch.as_tensor(probs, dtype=torch.float32).flatten()
    k = min(int(top_logprobs), probs.numel())
    top_p, top_i = torch.topk(probs, max(k, 1))

    def lp(p: float) -> float:
        return max(math.log(p), MIN_LOGPROB) if p > 0 else MIN_LOGPROB

    top = [_token_entry(tokenizer, int(i), lp(float(p)), tokens_as_ids) for p, i in
           zip(top_p, top_i, strict=True)]
    best = top[0]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": tokenizer.decode([int(top_i[0])])},
            "logprobs": {"content": [{**best, "top_logprobs": top[:k]}]},
            "finish_reason": "length",
        }],
    }


class TransformersJudgeServer:
    """The request logic of the transformers judge app (no Serve): geneval2's ``TransformersJudge`` behind
    the chat-completions protocol. ``top_logprobs`` may go up to the vocabulary size (vLLM caps it at its
    ``max_logprobs``); ``return_tokens_as_token_ids`` (vLLM's extension) returns ``"token_id:N"`` tokens."""

    def __init__(self, model_source: str, served_model: str, *, device: str = "cpu", dtype: str = "float16"):
        from rtdmd_ray.rewards.geneval2 import TransformersJudge

        self.served_model = served_model
        self.judge = TransformersJudge(model_source, device=device, dtype=dtype)
        self.tokenizer = self.judge.tokenizer

    def check(self, body: Mapping[str, Any]) -> tuple[bytes, str, int]:
        if body.get("model") not in (None, self.served_model):
            raise JudgeBadRequest(
                f"model {body.get('model')!r} is not served here; this app serves {self.served_model!r}", 404
            )
        png, text, k = parse_judge_request(body)
        from PIL import Image

        try:  # a bad image fails its own request here, not the micro-batch it would join
            Image.open(io.BytesIO(png)).verify()
        except Exception as exc:
            raise JudgeBadRequest(f"the image does not decode ({type(exc).__name__}: {exc})") from exc
        return png, text, k

    def answer(self, body: Mapping[str, Any], probs: Any, k: int) -> dict[str, Any]:
        return chat_completion_response(probs, self.tokenizer, model=self.served_model, top_logprobs=k,
                                        tokens_as_ids=bool(body.get("return_tokens_as_token_ids")))

    def models(self) -> dict[str, Any]:
        card = {"id": self.served_model, "object": "model", "owned_by": "rtdmd-ray"}
        return {"object": "list", "data": [card]}


def transformers_judge_deployment(*, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005) -> Any:
    """The ``TransformersJudgeDeployment`` class: a Serve deployment with a FastAPI ingress serving
    ``POST /v1/chat/completions`` and ``GET /v1/models``. Requests are micro-batched (``serve.batch``) into
    one ``TransformersJudge.first_token_dists`` call, which a worker thread runs while the replica's event
    loop keeps accepting requests. Bind it with ``(model_source, served_model, device=, dtype=)``."""
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title="rtdmd-ray GenEval2 judge (transformers)")

    @serve.deployment(name="TransformersJudgeDeployment", max_ongoing_requests=2 * max_batch_size)
    @serve.ingress(api)
    class TransformersJudgeDeployment:
        def __init__(self, model_source: str, served_model: str, *, device: str = "cpu",
                     dtype: str = "float16") -> None:
            self.server = TransformersJudgeServer(model_source, served_model, device=device, dtype=dtype)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def _dists(self, jobs: list[tuple[bytes, str]]) -> list[Any]:
            dists = await asyncio.to_thread(self.server.judge.first_token_dists, list(jobs))
            return [d.probs for d in dists]

        # Body(): the annotations are strings here (__future__); the default tells FastAPI this is the body
        @api.post("/v1/chat/completions")
        async def chat_completions(self, body: Any = Body(...)) -> Any:  # noqa: B008
            try:
                png, text, k = self.server.check(body)
                probs = await self._dists((png, text))
                return JSONResponse(self.server.answer(body, probs, k))
            except JudgeBadRequest as exc:
                kind = "NotFoundError" if exc.status == 404 else "BadRequestError"
                return JSONResponse({"error": {"message": str(exc), "type": kind, "code": exc.status}},
                                    status_code=exc.status)

        @api.get("/v1/models")
        async def models(self) -> Any:
            return JSONResponse(self.server.models())

    return TransformersJudgeDeployment


def build_judge_transformers_app(
    name: str,
    model_source: str,
    *,
    device: str = "cpu",
    dtype: str = "float16",
    min_replicas: int = 1,
    max_replicas: int = 1,
    target_ongoing_requests: float = 16.0,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    max_batch_size: int = 16,
    accelerator_type: str | None = None,
) -> Any:
    """The transformers judge app (serves the model under ``name``), autoscaled like the LLM app."""
    actor: dict[str, Any] = {"num_cpus": float(cpus_per_replica), "num_gpus": float(gpus_per_replica)}
    if accelerator_type:
        actor["accelerator_type"] = accelerator_type
    deployment = transformers_judge_deployment(max_batch_size=int(max_batch_size)).options(
        ray_actor_options=actor,
        autoscaling_config={
            "min_replicas": int(min_replicas),
            "max_replicas": int(max_replicas),
            "target_ongoing_requests": float(target_ongoing_requests),
        },
    )
    return deployment.bind(model_source, name, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------- apps by name


def _serve_client(app_name: str) -> Any:
    import ray
    from ray.serve.exceptions import RayServeException

    hint = f"start it with `rtdmd-ray serve-rewards CONFIG` (or start_judge_app({app_name!r}, ...))"
    if not ray.is_initialized():
        raise JudgeAppMissing(
            f"GenEval2 judge app {app_name!r}: this process is not connected to Ray (ray.init(address=...) "
            f"to the cluster that serves it), so the app cannot be looked up; {hint}"
        )
    from ray.serve.context import _get_global_client

    try:
        return _get_global_client()
    except RayServeException as exc:
        raise JudgeAppMissing(
            f"GenEval2 judge app {app_name!r}: Ray Serve is not running on this cluster; {hint}"
        ) from exc


def judge_endpoint(app_name: str) -> str:
    """The OpenAI base URL ``http://<host>:<port><route_prefix>/v1`` of the running Serve app ``app_name``.

    The route prefix comes from the Serve controller's view of the app, the port from Serve's HTTP options,
    the host from them too unless the proxies listen on every interface (then the address of the proxy on
    this node, else of the first proxy).

    Raises:
        JudgeAppMissing: no Serve, no such app, the app failed to deploy, or it has no HTTP route.
    """
    import ray
    from ray import serve

    client = _serve_client(app_name)
    hint = f"start it with `rtdmd-ray serve-rewards CONFIG` (or start_judge_app({app_name!r}, ...))"
    status = serve.status().applications.get(app_name)
    details = client.get_serve_details()
    app = (details.get("applications") or {}).get(app_name)
    if status is None or app is None:
        running = sorted(details.get("applications") or {})
        raise JudgeAppMissing(
            f"GenEval2 judge app {app_name!r} is not running on this Ray cluster (running apps: {running}); "
            f"{hint}"
        )
    state = str(getattr(status.status, "value", status.status))
    if state in ("DEPLOY_FAILED", "DELETING"):
        raise JudgeAppMissing(
            f"GenEval2 judge app {app_name!r} is {state} ({status.message.strip()[:300]}); {hint}"
        )
    prefix = app.get("route_prefix")
    if not prefix:
        raise JudgeAppMissing(f"GenEval2 judge app {app_name!r} has no HTTP route prefix; {hint}")
    http = details.get("http_options") or {}
    host, port = http.get("host") or "127.0.0.1", int(http.get("port") or 8000)
    if host in ("0.0.0.0", "::", ""):
        ips = [p.get("node_ip") for p in (details.get("proxies") or {}).values() if p.get("node_ip")]
        here = ray.util.get_node_ip_address()
        host = here if here in ips or not ips else ips[0]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}{prefix.rstrip('/')}/v1"


def resolve_judge_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """GenEval2 scorer options with ``serve_app: <name>`` turned into ``endpoint`` (found by app name) and
    ``served_model`` (the app serves its model under its name, unless ``served_model`` is given).

    Options without ``serve_app`` come back unchanged (a copy).
    """
    out = dict(options)
    app = str(out.pop("serve_app", "") or "")
    if not app:
        return out
    if out.get("endpoint"):
        raise ValueError(
            f"rewards.options.geneval2: give endpoint or serve_app, not both (endpoint={out['endpoint']!r}, "
            f"serve_app={app!r})"
        )
    if out.get("backend", "openai") != "openai":
        raise ValueError(
            f"rewards.options.geneval2.serve_app needs backend 'openai' (the app's chat endpoint), got "
            f"{out['backend']!r}"
        )
    out["endpoint"] = judge_endpoint(app)
    out.setdefault("served_model", app)
    return out


def scorer_options(options: Mapping[str, Mapping[str, Any]], names: Sequence[str] | Mapping[str, Any]
                   ) -> dict[str, dict[str, Any]]:
    """``rewards.options`` as the scorers of ``names`` are built with them, in every role that builds one
    (reward replica, reward worker, eval worker): model directories made absolute, and geneval2's
    ``serve_app`` turned into its app's endpoint (``resolve_judge_options``)."""
    from rtdmd_ray.rewards.multi import resolve_scorer_options

    out = resolve_scorer_options(options, names)
    if out.get("geneval2", {}).get("serve_app"):
        out["geneval2"] = resolve_judge_options(out["geneval2"])
    return out


def judge_app_name(rewards: Any, names: Sequence[str] | Mapping[str, Any]) -> str:
    """The judge app the rewards ``names`` score through (geneval2's ``serve_app`` option), or ""."""
    if "geneval2" not in names:
        return ""
    return str(rewards.options.get("geneval2", {}).get("serve_app") or "")


def delete_app(app_name: str) -> None:
    """Delete the Serve application ``app_name``; nothing if it is already gone or Serve is shutting down."""
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception:  # already gone, or Serve is shutting down
        pass


def ensure_judge_app(rewards: Any, names: Sequence[str] | Mapping[str, Any]) -> str | None:
    """Start the GenEval2 judge's app (``rewards.serve.judge``) when a reward of ``names`` is geneval2 with
    ``rewards.options.geneval2.serve_app`` naming an app that is not running; returns its name when this call
    started it (the caller deletes it at the end, ``delete_app``), else None (no judge app needed, or a shared
    one runs)."""
    app = judge_app_name(rewards, names)
    if not app:
        return None
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        running = serve.status().applications
    except RayServeException:  # Serve not started on this cluster yet
        running = None
    if running is not None and app in running:
        return None
    if running is not None:
        from ray.serve.context import _get_global_client

        if str(_get_global_client().get_serve_details().get("proxy_location", "")).endswith("Disabled"):
            raise JudgeAppMissing(
                f"GenEval2 judge app {app!r} is not running, and Serve on this cluster was started without "
                "HTTP proxies (for a handle-only reward application) while the judge is reached over HTTP: "
                "start the judge first (`rtdmd-ray serve-rewards CONFIG` with geneval2 starts it before the "
                "rewards), or restart Serve with proxies (`serve shutdown`, then rerun)"
            )
    # the judge is reached over HTTP: Serve's proxies on (one per node, 127.0.0.1:8000 by default), unlike the
    # handle-only reward application
    serve.start()
    start_judge_app(app, dict(rewards.serve.judge))
    return app


def start_judge_app(name: str, cfg_options: Mapping[str, Any] | None = None) -> str:
    """Start (or redeploy) the judge app ``name`` under route prefix ``/<name>``; returns its OpenAI base URL.

    ``cfg_options`` (see ``JUDGE_APP_FIELDS``): ``engine`` ``transformers`` (default; CPU or GPU replicas) or
    ``vllm`` (Ray Serve LLM, GPU), ``model`` (default the Qwen3-VL-8B hub id), replicas and resources.
    """
    from ray import serve

    opts = dict(cfg_options or {})
    unknown = sorted(set(opts) - set(JUDGE_APP_FIELDS))
    if unknown:
        raise ValueError(
            f"judge app {name!r}: unknown option(s) {unknown}; known: {sorted(JUDGE_APP_FIELDS)}"
        )
    engine = opts.pop("engine", "transformers")
    model = str(opts.pop("model", "") or HUB_ID)
    common = {k: opts.pop(k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests",
                                        "accelerator_type") if k in opts}
    if engine == "vllm":
        extra = sorted(set(opts) - {"engine_kwargs"})
        if extra:
            raise ValueError(f"judge app {name!r}: {extra} apply to engine transformers only")
        app = build_judge_llm_app(name, model, engine_kwargs=opts.get("engine_kwargs"), **common)
    elif engine == "transformers":
        if "engine_kwargs" in opts:
            raise ValueError(f"judge app {name!r}: engine_kwargs apply to engine vllm only")
        app = build_judge_transformers_app(name, model, **common, **opts)
    else:
        raise ValueError(f"judge app {name!r}: engine must be transformers or vllm, got {engine!r}")
    serve.run(app, name=name, route_prefix=f"/{name}")
    return judge_endpoint(name)
