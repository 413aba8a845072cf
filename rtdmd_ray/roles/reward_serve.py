"""The reward role on Ray Serve (``rewards.serving: serve``): one deployment per training reward.

Each reward in ``rewards.weights`` is its own Serve deployment ``reward_<name>`` with its own replicas,
CPUs/GPUs, ``runtime_env`` and micro-batch (``rewards.serve``, ``rewards.batch_images``), autoscaled on its
own queue, so a seconds-per-image VLM judge and a milliseconds-per-image CLIP score grow independently. One
application holds them (an ingress ``RewardRouter`` that only lists them): a run starts its own and deletes it
at the end, or attaches to a named long-lived one (``rewards.serve_app``, started by ``rtdmd-ray
serve-rewards``), so train and eval on one cluster share one set of loaded reward models.

``RewardServePool`` has the actor pool's interface (``score(jobs, resubmit)``, ``shutdown``): as each sampler
call finishes, every image of it goes to every reward deployment as one request ``(ScoreRequest ref,
index)``; a replica's ``@serve.batch`` gathers up to ``rewards.batch_images`` such requests into one scorer
call and fetches each ScoreRequest from the object store once (the images never pass through the driver). The
per-image results are merged with ``rewards.multi.merge_reward_results``, the function ``MultiScorer``
merges with, and ``ScoredBatch.from_scores`` builds the weighted total and the NaN/inf quarantine exactly as
the actor pool does. A request whose replica died (Serve replaces the replica) is sent again: every image is
scored once per reward.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from rtdmd_ray.config import RewardsConfig
from rtdmd_ray.rewards.multi import MEAN_KEY, merge_reward_results
from rtdmd_ray.roles.judge_serve import delete_app
from rtdmd_ray.types import ScoredBatch

DEPLOYMENT_PREFIX = "reward_"
DEFAULT_BATCH_IMAGES = 16  # a reward without rewards.batch_images: micro-batches of this many images
LOOK_BACK_S = 2.0  # autoscaling averages the queue over this window (short: a training epoch is seconds long)
METRICS_INTERVAL_S = 0.5  # how often replicas and handles report their queues (Serve's default is 10 s)
METRICS_INTERVAL_WARNING = "The `metrics_interval_s` field in AutoscalingConfig is deprecated"
START_TIMEOUT_S = 600.0
# no access-log line per request: a run sends one request per image and reward (errors are still logged)
QUIET_LOGS = {"enable_access_log": False}


class RewardLoadError(RuntimeError):
    """A reward deployment could not start (its scorer failed to load): one line naming the reward."""


def deployment_name(reward: str) -> str:
    return f"{DEPLOYMENT_PREFIX}{reward}"


class RewardReplica:
    """One replica of one reward's deployment: the reward's scorer, fed micro-batches of single images.

    Args:
        name: the reward; rewards: the ``rewards`` section (device, checkpoints, options, batch size).
        threads: torch intra-op threads (the replica's CPUs).
    """

    def __init__(self, *, name: str, rewards: RewardsConfig, threads: int = 1) -> None:
        from rtdmd_ray.rewards.multi import MultiScorer
        from rtdmd_ray.roles.judge_serve import scorer_options

        torch.set_num_threads(max(1, threads))
        device = rewards.device_for(name)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        batch = int(rewards.batch_images.get(name, DEFAULT_BATCH_IMAGES))
        self.name = name
        self.scorer = MultiScorer(
            {name: float(rewards.weights.get(name, 1.0))},
            ckpt_dir=rewards.ckpt_dir or None,
            device=device,
            batch_images={name: batch},
            options=scorer_options(rewards.options, [name]),
        )
        if hasattr(self.score_image, "set_max_batch_size"):  # the Serve replica (``serve.batch``-wrapped)
            self.score_image.set_max_batch_size(batch)
            self.score_image.set_batch_wait_timeout_s(float(rewards.serve.for_reward(name)["batch_wait_timeout_s"]))
        self.images_scored = 0

    def _score(self, requests: list[Any], indices: list[int]) -> list[dict[str, float]]:
        images = torch.stack([r.images[i] for r, i in zip(requests, indices, strict=True)]).float() / 255.0
        prompts = [r.prompts[i] for r, i in zip(requests, indices, strict=True)]
        metadata = [r.metadata[i] for r, i in zip(requests, indices, strict=True)]
        out = self.scorer.score_reward(self.name, images, prompts, metadata)
        self.images_scored += len(indices)
        return [{k: float(v[j]) for k, v in out.items()} for j in range(len(indices))]

    async def score_image(self, items: list[tuple[Any, int]]) -> list[dict[str, float]]:
        """``items``: ``(ScoreRequest ref, image index)`` pairs (one request each, batched by Serve); returns
        each image's ``{key: score}`` (the reward's own name and its extra keys)."""
        refs = list(dict.fromkeys(ref for ref, _ in items))  # each ScoreRequest fetched once per batch
        fetched = dict(zip(refs, await asyncio.gather(*refs), strict=True))
        requests, indices = [fetched[ref] for ref, _ in items], [i for _, i in items]
        # the scorer runs off the event loop, so the replica keeps queueing the next micro-batch meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, self._score, requests, indices)

    async def __call__(self, item: tuple[Any, int]) -> dict[str, float]:
        return await self.score_image(item)

    def stats(self) -> dict[str, float]:
        return {"images_scored": float(self.images_scored)}


class RewardRouter:
    """The application's ingress: knows the reward deployments (so ``serve.run`` deploys them with it)."""

    def __init__(self, handles: dict[str, Any]) -> None:
        self.names = sorted(handles)

    async def __call__(self, *_: Any) -> list[str]:
        return self.names


def _serve_classes() -> tuple[Any, Any]:
    """The Serve deployment classes, built on first use (importing ``ray.serve`` is heavy)."""
    global _CLASSES
    if _CLASSES is None:
        from ray import serve

        # metrics_interval_s is "to be replaced by" env vars in a future Serve; 2.60 honours it and warns each
        # time a config holding it is validated (options, run, status). The env vars would have to reach every
        # replica and handle process before Serve is imported, so the field stays and this one warning goes.
        warnings.filterwarnings("ignore", message=METRICS_INTERVAL_WARNING, category=DeprecationWarning)

        replica = type("RewardReplica", (RewardReplica,), {})
        replica.score_image = serve.batch(max_batch_size=DEFAULT_BATCH_IMAGES, batch_wait_timeout_s=0.01)(
            RewardReplica.score_image
        )
        _CLASSES = (serve.deployment(replica), serve.deployment(RewardRouter))
    return _CLASSES


_CLASSES: tuple[Any, Any] | None = None


def max_ongoing_requests(rewards: RewardsConfig, name: str) -> int:
    """Requests one replica of reward ``name`` holds: the micro-batch being scored and the next ones filling
    up (4 micro-batches), or twice the autoscaling target when that is larger."""
    batch = int(rewards.batch_images.get(name, DEFAULT_BATCH_IMAGES))
    target = float(rewards.serve.for_reward(name)["target_ongoing_requests"]) or float(batch)
    return max(4 * batch, math.ceil(2 * target))


def reward_app(rewards: RewardsConfig, names: Sequence[str]) -> Any:
    """The Serve application of the rewards ``names``: one autoscaled deployment each, behind a router."""
    replica_dep, router_dep = _serve_classes()
    bound = {}
    for name in names:
        d = rewards.serve.for_reward(name)
        batch = int(rewards.batch_images.get(name, DEFAULT_BATCH_IMAGES))
        target = float(d["target_ongoing_requests"]) or float(batch)
        env = rewards.serve.runtime_env.get(name)
        actor_options: dict[str, Any] = {"num_cpus": float(d["cpus_per_replica"]),
                                         "num_gpus": float(d["gpus_per_replica"])}
        if env:
            actor_options["runtime_env"] = _plain(env)
        custom = rewards.serve.custom_for(name)
        if custom:  # pins the replicas to the reward node group
            actor_options["resources"] = custom
        autoscaling = {
            "min_replicas": int(d["min_replicas"]),
            "initial_replicas": int(d["min_replicas"]),
            "max_replicas": int(d["max_replicas"]),
            "target_ongoing_requests": target,
            "upscale_delay_s": float(d["upscale_delay_s"]),
            "downscale_delay_s": float(d["downscale_delay_s"]),
            "look_back_period_s": LOOK_BACK_S,
            "metrics_interval_s": METRICS_INTERVAL_S,
        }
        bound[name] = replica_dep.options(
            name=deployment_name(name),
            autoscaling_config=autoscaling,
            max_ongoing_requests=max_ongoing_requests(rewards, name),
            ray_actor_options=actor_options,
            logging_config=QUIET_LOGS,
        ).bind(name=name, rewards=rewards, threads=max(1, math.floor(float(d["cpus_per_replica"]))))
    return router_dep.options(name="RewardRouter", num_replicas=1, ray_actor_options={"num_cpus": 0},
                              logging_config=QUIET_LOGS).bind(bound)


def _plain(x: Any) -> Any:
    """Config maps (read-only ``FrozenDict``) as plain dicts and lists, as Ray's runtime_env wants them."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _failed_deployments(app_name: str) -> dict[str, str]:
    """``{reward: first line of its error}`` for the reward deployments of ``app_name`` that failed."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    out = {}
    for dep_name, dep in (app.deployments if app else {}).items():
        if dep_name.startswith(DEPLOYMENT_PREFIX) and str(dep.status).split(".")[-1] in (
            "DEPLOY_FAILED", "UNHEALTHY"
        ):
            out[dep_name[len(DEPLOYMENT_PREFIX):]] = _teaching_line(dep.message)
    return out


def _teaching_line(message: str) -> str:
    """The scorer's own error out of a Serve failure message (its last ``SomeError: ...`` line)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Missing", "Exception")) and " " not in head:
            return ln
    return lines[-1] if lines else "no message"


def start_reward_app(
    rewards: RewardsConfig, names: Sequence[str], app_name: str, *, wait: bool = True
) -> None:
    """Deploy the reward application ``app_name`` and (``wait``) wait until every replica is up; without
    ``wait`` the replicas load in the background until ``wait_reward_app``.

    Raises:
        RewardLoadError: a reward's scorer failed to load; one line naming the reward and its error (the
            scorers' own errors name the missing file and the fix).
    """
    from ray import serve

    serve.start(proxy_location="Disabled")  # handles only, no HTTP proxy (ignored when Serve already runs)
    try:
        serve.run_many([serve.RunTarget(reward_app(rewards, names), name=app_name, route_prefix=None)],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    except Exception as e:
        delete_app(app_name)
        line = _teaching_line(str(e))
        raise RewardLoadError(f"reward application {app_name} failed to deploy: {line}") from e
    if wait:
        wait_reward_app(app_name)


def wait_reward_app(app_name: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until every replica of the reward application ``app_name`` is up (see ``start_reward_app``).

    Raises:
        RewardLoadError: a reward's deployment failed (the application is deleted), or the timeout passed.
    """
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        status = str(app.status).split(".")[-1] if app else "NOT_STARTED"
        if status == "RUNNING":
            return
        failed = _failed_deployments(app_name)
        if failed or status == "DEPLOY_FAILED":
            delete_app(app_name)
            name, line = next(iter(failed.items())) if failed else ("?", app.message if app else "")
            raise RewardLoadError(f"reward {name} failed to load on its Serve replica: {line}")
        if time.monotonic() > deadline:
            raise RewardLoadError(f"reward application {app_name} not running after {timeout_s:.0f} s "
                                  f"(status {status}); check `serve status` and the replicas' logs")
        time.sleep(0.2)


def replica_counts(app_name: str) -> dict[str, int]:
    """``{reward: RUNNING replicas}`` of the reward deployments of ``app_name`` now (``serve.status()``)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {
        n[len(DEPLOYMENT_PREFIX):]: int(d.replica_states.get("RUNNING", 0))
        for n, d in app.deployments.items()
        if n.startswith(DEPLOYMENT_PREFIX)
    }


def serve_cpus(rewards: RewardsConfig, names: Sequence[str]) -> float:
    """The CPUs the reward deployments of ``names`` may hold at most (0 when attaching to a shared app: its
    replicas are already placed); a local cluster is sized to fit them."""
    if rewards.serve_app:
        return 0.0
    return sum(float(d["max_replicas"]) * float(d["cpus_per_replica"])
               for d in (rewards.serve.for_reward(n) for n in names))


DEFAULT_SHARED_APP = "rtdmd-rewards"


def served_reward_names(cfg: Any) -> list[str]:
    """What `rtdmd-ray serve-rewards` serves: the training rewards, then the eval rewards not among them (so a
    run and an eval of one config attach to one application)."""
    return list(dict.fromkeys([*cfg.rewards.weights, *cfg.eval.reward_weights]))


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder (``import_path: rtdmd_ray.roles.reward_serve:build_app`` in a Serve config,
    e.g. cluster/rayservice.yaml's ``serveConfigV2``): the reward deployments of ``args["config"]`` (a config
    file, with ``args["overrides"]``), serving ``args["rewards"]`` (default: its training and eval
    rewards)."""
    from rtdmd_ray.config import load_config

    unknown = sorted(set(args) - {"config", "overrides", "rewards"})
    if unknown or "config" not in args:
        raise ValueError(f"reward app args: need config (a config file), may give overrides and rewards; got "
                         f"{sorted(args)}")
    cfg = load_config(args["config"], list(args.get("overrides") or []))
    names = list(args.get("rewards") or served_reward_names(cfg))
    return reward_app(cfg.rewards, names)


def serve_rewards(cfg: Any, *, address: str | None = None, delete: bool = False) -> dict[str, Any]:
    """`rtdmd-ray serve-rewards`: start (or with ``delete``, remove) the reward deployments of ``cfg`` as the
    long-lived Serve application ``rewards.serve.app_name`` (default ``rtdmd-rewards``) on the cluster at
    ``address``, with the GenEval2 judge's app when ``rewards.options.geneval2.serve_app`` asks for one.
    Returns ``{"app": name, "replicas": {reward: count}, "judge": app or None}``.

    Raises:
        ConnectionError: no running cluster at ``address`` (a Serve app outlives this process only there).
        RewardLoadError: a reward failed to load (one line naming it).
    """
    import ray

    from rtdmd_ray.roles.judge_serve import ensure_judge_app, judge_app_name

    if not ray.is_initialized():
        where = address or os.environ.get("RAY_ADDRESS") or "auto"
        try:
            ray.init(address=where, include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:
            raise ConnectionError(
                f"no running Ray cluster at {where!r}: serve-rewards leaves its application on a cluster "
                "that outlives it; start one (`ray start --head`) or pass --address / $RAY_ADDRESS"
            ) from e
    app = cfg.rewards.serve.app_name or DEFAULT_SHARED_APP
    names = served_reward_names(cfg)
    if delete:
        judge = judge_app_name(cfg.rewards, names)
        for name in (app, judge):
            if name:
                delete_app(name)
        return {"app": app, "replicas": {}, "judge": judge or None}
    judge = ensure_judge_app(cfg.rewards, names)
    start_reward_app(cfg.rewards, names, app)
    return {"app": app, "replicas": replica_counts(app), "judge": judge}


class _InFlight:
    """Image requests to the reward deployments, each with its bookkeeping ``meta``.

    Flow control on this side: at most ``window(reward)`` requests of a reward are out at once (its running
    replicas x ``max_ongoing_requests``), the rest wait here and go out as results come back. A request Serve
    cannot place (every replica full) would wait in the handle and be retried with a backoff of up to 0.5 s,
    leaving the replica idle meanwhile (measured: one-to-two-image micro-batches, epochs ~1.7x the ideal).
    Replicas still see ``max_ongoing_requests`` each, above ``target_ongoing_requests``, so autoscaling adds
    replicas and the window grows with them. A sent request becomes an ObjectRef once a replica has taken it
    (polled with a zero timeout: converting earlier would block the sender).
    """

    POLL_S = 0.02  # how often requests not yet taken by a replica are checked while waiting

    def __init__(self, send: Callable[[str, Any, int], Any], window: Callable[[str], int]) -> None:
        self.send, self.window = send, window
        self.backlog: dict[str, collections.deque[tuple[Any, int, Any]]] = {}
        self.out: collections.Counter[str] = collections.Counter()  # requests sent and not finished
        self.queued: dict[Any, tuple[str, Any]] = {}  # DeploymentResponse -> (reward, meta)
        self.assigned: dict[Any, tuple[str, Any]] = {}  # ObjectRef -> (reward, meta)

    def __len__(self) -> int:
        return sum(len(q) for q in self.backlog.values()) + len(self.queued) + len(self.assigned)

    def add(self, name: str, request_ref: Any, index: int, meta: Any) -> None:
        """Score image ``index`` of ``request_ref`` with reward ``name`` (sent when the window has room)."""
        self.backlog.setdefault(name, collections.deque()).append((request_ref, index, meta))

    def _pump(self) -> None:
        for name, q in self.backlog.items():
            room = self.window(name) - self.out[name]
            while q and room > 0:
                request_ref, index, meta = q.popleft()
                self.queued[self.send(name, request_ref, index)] = (name, meta)
                self.out[name] += 1
                room -= 1

    def wait(self, others: Sequence[Any], timeout_s: float) -> tuple[list[Any], list[tuple[Any, Any]]]:
        """Wait up to ``timeout_s`` for one of ``others`` (ObjectRefs) or an image request to finish; returns
        (ready ``others``, ``[(ref, meta)]`` of finished image requests, removed from here)."""
        import ray

        self._pump()
        for response in list(self.queued):
            try:
                ref = response._to_object_ref_sync(_timeout_s=0)
            except TimeoutError:  # not taken by a replica yet
                continue
            self.assigned[ref] = self.queued.pop(response)
        refs = [*others, *self.assigned]
        timeout_s = max(0.0, min(timeout_s, self.POLL_S) if self.queued else timeout_s)
        if not refs:
            time.sleep(timeout_s)
            return [], []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready:  # everything else already done comes along
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        mine = []
        for r in ready:
            if r in self.assigned:
                name, meta = self.assigned.pop(r)
                self.out[name] -= 1
                mine.append((r, meta))
        done = {r for r, _ in mine}
        return [r for r in ready if r not in done], mine


class RewardServePool:
    """The reward deployments of one run, with the actor pool's ``score`` / ``shutdown`` interface.

    Args:
        rewards: the ``rewards`` section (``serve_app`` attaches to a running application instead of
            starting one).
        names: the rewards to serve (default: the training rewards, ``rewards.weights``; `rtdmd-ray eval`
            passes its eval rewards).
        wait: wait here until the replicas are up; False = deploy and return (the reward models load while the
            caller builds its other roles), then ``wait_ready()``.
        timeout_s: the longest a scoring phase may take.
        max_attempts: how often one image's request is sent before the pool gives up (replica deaths).
    """

    def __init__(
        self,
        *,
        rewards: RewardsConfig,
        names: Sequence[str] | None = None,
        wait: bool = True,
        timeout_s: float = 3600.0,
        max_attempts: int = 3,
    ) -> None:
        from rtdmd_ray.roles.judge_serve import ensure_judge_app

        self.names = list(rewards.weights if names is None else names)
        self.weights = {k: float(rewards.weights.get(k, 1.0)) for k in self.names}
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.owned = not rewards.serve_app
        self.app_name = rewards.serve_app or rewards.serve.app_name or f"{DEFAULT_SHARED_APP}-{os.getpid()}"
        self.judge_app = ensure_judge_app(rewards, self.names)  # started here: deleted at shutdown
        if self.owned:
            start_reward_app(rewards, self.names, self.app_name, wait=wait)
        else:
            running = replica_counts(self.app_name)
            missing = [n for n in self.names if n not in running]
            if missing:
                raise RewardLoadError(
                    f"rewards.serve_app={self.app_name}: no running deployment for reward(s) {missing} (it "
                    f"serves {sorted(running) or 'nothing'}); start it with `rtdmd-ray serve-rewards CONFIG "
                    f"rewards.serve.app_name={self.app_name}` with these rewards, or set rewards.serve_app=''"
                )
        self.handles: dict[str, Any] = {}  # reward -> DeploymentHandle, once its deployment exists
        if wait or not self.owned:
            self._connect()
        self.max_ongoing = {n: max_ongoing_requests(rewards, n) for n in self.names}
        self._replicas: dict[str, int] = {}
        self._counted_at = -math.inf
        self.redispatched = 0  # image requests sent again after a replica died (whole run)
        self._poison: tuple[str, int] | None = None
        self.resubmitted = 0  # sampler calls submitted again after a sampler died (whole run)

    def __len__(self) -> int:
        return sum(replica_counts(self.app_name).values())

    def wait_ready(self) -> None:
        """Block until the replicas are up (after ``wait=False``); a reward that failed to load raises
        ``RewardLoadError`` here, and the application is deleted."""
        if self.owned:
            wait_reward_app(self.app_name)
        self._connect()

    def _connect(self) -> None:
        from ray import serve

        self.handles = {n: serve.get_deployment_handle(deployment_name(n), app_name=self.app_name)
                        for n in self.names}

    def _send(self, name: str, request_ref: Any, index: int) -> Any:
        return self.handles[name].remote((request_ref, index))

    def _window(self, name: str) -> int:
        """Requests of reward ``name`` that may be out at once: its running replicas x max_ongoing_requests
        (replica counts re-read at most every ``METRICS_INTERVAL_S``)."""
        now = time.monotonic()
        if now - self._counted_at > METRICS_INTERVAL_S:
            self._replicas = replica_counts(self.app_name)
            self._counted_at = now
        return max(1, self._replicas.get(name, 0)) * self.max_ongoing[name]

    def _in_flight(self) -> _InFlight:
        self._counted_at = -math.inf
        return _InFlight(self._send, self._window)

    def score(
        self, jobs: Sequence[Any], resubmit: Callable[[Any], Any] | None = None
    ) -> tuple[dict[Any, ScoredBatch], dict[str, float]]:
        """Score every job's images with every reward as soon as its sampler call finishes (the actor pool's
        ``RewardPool.score`` contract: ``({key: ScoredBatch}, metrics)``)."""

        from rtdmd_ray.roles.reward_pool import take_sampled_call

        waiting = {j.request_ref: j for j in jobs}
        pending = self._in_flight()  # image requests, meta (job, reward, index, attempt)
        parts: dict[Any, dict[str, list[dict[str, float] | None]]] = {}
        left: dict[Any, int] = {}
        results: dict[Any, ScoredBatch] = {}
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        sampled_at = None
        while waiting or pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"reward deployments: {len(waiting)} sampler calls and {len(pending)} image requests not "
                    f"done after {self.timeout_s} s; check `serve status` and the replicas' logs"
                )
            calls, images = pending.wait(list(waiting), remaining)
            for ref in calls:  # a sampler call finished: its images go to every reward now
                job = take_sampled_call(waiting, ref, resubmit)
                if job is None:  # its sampler died: sampled again
                    self.resubmitted += 1
                    continue
                n = int(job.num_images)
                parts[job.key] = {name: [None] * n for name in self.names}
                left[job.key] = n * len(self.names)
                for i in range(n):  # image-major: every reward gets the call's first images first
                    for name in self.names:
                        pending.add(name, ref, i, (job, name, i, 1))
                if not waiting:
                    sampled_at = time.monotonic()
            for ref, (job, name, i, attempt) in images:
                got = self._result(ref, name, i, job.key, attempt)
                if got is None:  # its replica died: sent again
                    pending.add(name, job.request_ref, i, (job, name, i, attempt + 1))
                    continue
                parts[job.key][name][i] = got
                left[job.key] -= 1
                if left[job.key] == 0:
                    results[job.key] = self._combine(parts.pop(job.key))
        wall = time.monotonic() - t0
        images = sum(len(r) for r in results.values())
        m = {
            "timing/reward_wait_s": time.monotonic() - sampled_at if sampled_at is not None else 0.0,
            "reward/pool/redispatched": float(self.redispatched),
            "rollout/resubmitted": float(self.resubmitted),
            "reward/pool/scores_per_s": images / max(wall, 1e-9),
        }
        for name, count in replica_counts(self.app_name).items():
            if name in self.weights:
                m[f"reward/serve/{name}/replicas"] = float(count)
        return results, m

    def _result(self, ref: Any, name: str, index: int, what: Any, attempt: int) -> dict[str, float] | None:
        """One image request's scores, or None when the replica holding it died (the caller sends it again;
        Serve has started a replacement)."""
        import ray

        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            if attempt >= self.max_attempts:
                raise RuntimeError(
                    f"reward {name}: image {index} of {what} failed on {attempt} replicas; last: {e}"
                ) from e
            self.redispatched += 1
            return None

    def score_images(
        self,
        batches: Iterable[tuple[Any, Any, Sequence[str]]],
        on_result: Callable[[Any, dict[str, dict[str, list[float]]]], None],
        *,
        in_flight: int = 4,
    ) -> None:
        """The eval path: each ``(key, request, rewards)`` batch (``request`` with ``images`` uint8
        ``[B, 3, H, W]``, ``prompts``, ``metadata``) is scored by each of its rewards, and
        ``on_result(key, {reward: {score key: [B] floats}})`` is called as each batch completes. At most
        ``in_flight`` batches are in the object store at once (an eval set can be larger than memory)."""
        import ray

        it = iter(batches)
        pending = self._in_flight()  # image requests, meta (key, request ref, reward, index, attempt)
        parts: dict[Any, dict[str, list[dict[str, float] | None]]] = {}
        left: dict[Any, int] = {}
        deadline = time.monotonic() + self.timeout_s

        def push() -> bool:
            nxt = next(it, None)
            if nxt is None:
                return False
            key, request, names = nxt
            missing = [n for n in names if n not in self.handles]
            if missing:
                raise KeyError(f"reward(s) {missing} are not served by application {self.app_name} "
                               f"(it serves {self.names})")
            ref, n = ray.put(request), len(request.prompts)
            parts[key] = {name: [None] * n for name in names}
            left[key] = n * len(names)
            for i in range(n):
                for name in names:
                    pending.add(name, ref, i, (key, ref, name, i, 1))
            return True

        while len(parts) < in_flight and push():
            pass
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"reward deployments: {len(pending)} image requests not done after "
                                   f"{self.timeout_s} s; check `serve status` and the replicas' logs")
            _, images = pending.wait([], remaining)
            for ref, (key, req_ref, name, i, attempt) in images:
                got = self._result(ref, name, i, key, attempt)
                if got is None:
                    pending.add(name, req_ref, i, (key, req_ref, name, i, attempt + 1))
                    continue
                parts[key][name][i] = got
                left[key] -= 1
                if left[key] == 0:
                    done = parts.pop(key)
                    del left[key]
                    on_result(key, {name: {k: [r[k] for r in rows] for k in rows[0]}  # type: ignore[index]
                                    for name, rows in done.items()})
                    while len(parts) < in_flight and push():
                        pass

    def poison(self, name: str, count: int) -> None:
        """Test hook: the reward ``name`` of the next ``count`` samples combined here is NaN (the quarantine
        path end to end, as the actor pool's ``RewardWorker.poison``)."""
        self._poison = (name, count)

    def _combine(self, per_reward: dict[str, list[dict[str, float] | None]]) -> ScoredBatch:
        """One job's per-image results -> ``MultiScorer`` output -> ``ScoredBatch`` (as the actor pool)."""
        if self._poison:
            name, count = self._poison
            rows = per_reward[name]
            k = min(count, len(rows))
            for row in rows[:k]:
                row[name] = math.nan  # type: ignore[index]
            self._poison = (name, count - k) if count > k else None
        tensors = {}
        for name, rows in per_reward.items():
            keys = list(rows[0])  # type: ignore[arg-type]
            tensors[name] = {k: torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in keys}  # type: ignore[index]
        n = len(next(iter(per_reward.values())))
        out = merge_reward_results(tensors, self.weights, n)
        out.pop(MEAN_KEY)  # ScoredBatch.total is the weighted sum over the finite rewards
        return ScoredBatch.from_scores(out, self.weights)

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Delete the applications this run started (an attached shared one keeps running)."""
        if self.owned:
            delete_app(self.app_name)
        if self.judge_app:
            delete_app(self.judge_app)
