"""The RL driver's metrics reach the Ray dashboard's Prometheus endpoint (``logging.ray_metrics: true``).

A private head is started as a subprocess with a metrics export port (every port picked free, a private temp
dir, token auth set explicitly), the tiny RL job runs against it as ``rtdmd-ray train`` (a separate driver, so
this test never touches the session's local Ray), and ``/metrics`` is polled until the named series appear
with plausible values. The head is stopped by killing exactly the PID started here (never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from rtdmd_ray.runs.metrics import prometheus_series
from tests.ray.heads import free_ports, stop_head

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "debug" / "tiny_sd3.yaml"
RAY = Path(sys.executable).with_name("ray")
RTDMD = Path(sys.executable).with_name("rtdmd-ray")

# the driver keys the test expects on the dashboard, and a check of each value
EXPECTED = {
    "timing/sample_score_s": lambda v: v > 0,
    "timing/update_s": lambda v: v > 0,
    "rollout/sampler_0/images_per_s": lambda v: v > 0,
    "rollout/sampler_0/idle_frac": lambda v: 0 <= v <= 1,
    "reward/pool/worker_0/scores_per_s": lambda v: v > 0,
    "reward/pool/worker_1/queue_depth_max": lambda v: v >= 0,
    "reward/brightness/mean": lambda v: 0 <= v <= 1,
    "reward/total/quarantined": lambda v: v == 0,
    "learner/advantage/std": lambda v: v >= 0,
    "learner/ppo/ratio_mean": lambda v: abs(v - 1) < 1e-4,  # on-policy
    "rollout/policy_lag": lambda v: v == 0,
    "sync/seconds": lambda v: v > 0,
    "sync/bytes": lambda v: v > 1000,
    "timing/learner_update_s": lambda v: v > 0,
    "learner/idle_frac": lambda v: 0 <= v <= 1,
}


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> ``{(name, labels): value}``."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not m or line.startswith("#"):
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def find(series: dict, key: str, run: str) -> float | None:
    name, tags = prometheus_series(key)
    want = {*tags.items(), ("run", run)}
    for (n, labels), v in series.items():
        if n in (name, f"ray_{name}") and want <= labels:
            return v
    return None


def start_head(log: Path) -> tuple[subprocess.Popen, dict, str]:
    """``ray start --head --block`` on free ports; returns the process, its ports and its temp dir."""
    names = ("port", "metrics", "dash", "agent", "agent_grpc", "rt_env", "client")
    p = dict(zip(names, free_ports(len(names)), strict=True))
    tmp = tempfile.mkdtemp(prefix="rtm-", dir="/tmp")  # short: Ray's socket paths must stay < 107 chars
    # token auth set explicitly (a ~/.ray/auth_token would turn it on); metrics exported every second
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_metrics_report_interval_ms": "1000",
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={p['port']}",
         f"--metrics-export-port={p['metrics']}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dash']}",
         f"--dashboard-agent-listen-port={p['agent']}", f"--dashboard-agent-grpc-port={p['agent_grpc']}",
         f"--runtime-env-agent-port={p['rt_env']}", f"--ray-client-server-port={p['client']}",
         f"--temp-dir={tmp}", "--num-cpus=4"],
        env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    return proc, {**p, "env": env}, tmp


@pytest.fixture
def head(tmp_path):
    log = tmp_path / "head.log"
    # Ray gives a new node a hard-coded 30 s to register; a saturated 2-core machine can miss it: retry
    for attempt in range(3):
        proc, ports, tmp = start_head(log)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:  # the metrics endpoint answers once the raylet started the node's agent
                urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=2)
                break
            except OSError:
                time.sleep(1)
        if proc.poll() is None and time.monotonic() < deadline:
            break
        stop_head(proc)
        shutil.rmtree(tmp, ignore_errors=True)
        assert attempt < 2, f"head did not come up 3 times: {log.read_text()[-3000:]}"
    try:
        yield {"address": f"127.0.0.1:{ports['port']}", "metrics_port": ports["metrics"], "env": ports["env"]}
    finally:
        stop_head(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow  # its own head + a 3-epoch job in a second driver: ~1 min quiet, ~4 min on 2 busy cores
def test_rl_metrics_reach_the_prometheus_endpoint(head, tmp_path):
    out, run = tmp_path / "run", "metrics-test"
    cmd = [str(RTDMD), "train", str(TINY_CONFIG), "train.iterations=3", f"train.output_dir={out}",
           "resources.learner.count=1", "grpo.sample_batches_per_epoch=1", "logging.ray_metrics=true",
           f"logging.run_name={run}", "logging.stdout=false"]
    env = {**head["env"], "RAY_ADDRESS": head["address"]}
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(tmp_path / "job.log", "w"),
                           stderr=subprocess.STDOUT)
    seen: dict[str, float] = {}
    url = f"http://127.0.0.1:{head['metrics_port']}/metrics"
    try:
        deadline = time.monotonic() + 600
        # gauges of a finished driver age out of the endpoint after ~2 report intervals: read while it runs
        while len(seen) < len(EXPECTED) and time.monotonic() < deadline:
            try:
                series = parse(urllib.request.urlopen(url, timeout=5).read().decode())
            except OSError:
                series = {}
            for key in EXPECTED:
                v = find(series, key, run)
                if v is not None:
                    seen[key] = v
            if job.poll() is not None and len(seen) < len(EXPECTED):
                time.sleep(3)  # one more export after the last epoch, then a last read
                series = parse(urllib.request.urlopen(url, timeout=5).read().decode())
                seen |= {k: v for k in EXPECTED if (v := find(series, k, run)) is not None}
                break
            time.sleep(0.5)
        job.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if job.poll() is None:
            job.kill()
    log = (tmp_path / "job.log").read_text()
    assert job.returncode == 0, log[-3000:]
    missing = sorted(set(EXPECTED) - set(seen))
    assert not missing, f"not on the Prometheus endpoint: {missing}; seen {seen}"
    for key, ok in EXPECTED.items():
        assert ok(seen[key]), (key, seen[key])
    # the dashboard shows the jsonl's names: every expected key is a column of metrics.jsonl
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(k in lines[-1] for k in EXPECTED)


def test_series_names_follow_the_jsonl_keys():
    from rtdmd_ray.runs.metrics import RayMetrics, idle_fractions

    assert prometheus_series("timing/update_s") == ("rtdmd_timing_update_s", {"role": "driver"})
    assert prometheus_series("reward/total/quarantined") == (
        "rtdmd_reward_quarantined", {"role": "reward", "reward": "total"})
    assert prometheus_series("reward/pool/worker_1/queue_depth_max") == (
        "rtdmd_reward_pool_worker_queue_depth_max", {"role": "reward", "worker": "1"})
    assert prometheus_series("rollout/sampler_0/images_per_s") == (
        "rtdmd_rollout_sampler_images_per_s", {"role": "sampler", "worker": "0"})
    idle = idle_fractions({"rollout/sampler_0/busy_s": 3.0, "reward/pool/worker_0/busy_s": 12.0,
                           "timing/learner_update_s": 1.0}, 4.0)
    assert idle == {"rollout/sampler_0/idle_frac": 0.25, "reward/pool/worker_0/idle_frac": 0.0,
                    "learner/idle_frac": 0.75}
    assert RayMetrics(enabled=False, run="x").record({"timing/update_s": 1.0}) == 0
