"""`ray job submit` end to end, as cluster/README.md tells users to do it: a private Ray head on 127.0.0.1
with token auth on (its own token, never ~/.ray/auth_token), the CLI submits one RL epoch of the tiny config
with a `--runtime-env` (working_dir holding the job's config + env_vars), the job SUCCEEDS and leaves its
metrics and a complete checkpoint. The head is stopped by killing exactly the process (group) this test
started: never `ray stop`, which would stop every Ray on the machine."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ray.heads import free_ports, stop_head

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "debug" / "tiny_sd3.yaml"
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 600.0


def _http(url: str, token: str | None = None, timeout: float = 60.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def head() -> Iterator[dict[str, Any]]:
    """A private Ray head with token auth, started as a subprocess; yields dashboard URL, token and env."""
    # short path: Ray's unix socket paths must stay under ~107 characters
    tmp = tempfile.mkdtemp(prefix="rtj-", dir="/tmp")
    token = secrets.token_hex(32)  # the format `ray get-auth-token --generate` writes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,  # first in Ray's token lookup, before ~/.ray/auth_token (which we never touch)
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `rtdmd-ray` for the job's shell
    )
    gcs, dash, agent, client, metrics = free_ports(5)
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        f"--port={gcs}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        # the defaults of these are fixed ports (52365, 10001) that another Ray on the machine may hold
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}",
        f"--temp-dir={tmp}", "--num-cpus=4", "--num-gpus=0", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(tmp) / "head.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180  # a loaded 2-core machine can take a while
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"ray head exited {proc.returncode}: {(Path(tmp) / 'head.log').read_text()[-3000:]}"
                )
            try:
                status, body = _http(f"{url}/api/version", token, timeout=5.0)
                if status == 200 and json.loads(body).get("ray_version"):
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard {url} not up after 180 s")
            time.sleep(1.0)
        yield {"url": url, "token": token, "env": env, "tmp": Path(tmp)}
    finally:
        stop_head(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _ray_cli(head: dict[str, Any], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args], env=head["env"], capture_output=True, text=True, timeout=timeout
    )


def test_api_needs_the_token(head):
    status, body = _http(f"{head['url']}/api/version", head["token"])
    assert status == 200 and json.loads(body)["ray_version"]
    # the job API refuses a client without the token, and one with a wrong token
    assert _http(f"{head['url']}/api/jobs/")[0] == 401
    assert _http(f"{head['url']}/api/jobs/", "0" * 64)[0] in (401, 403)
    assert _http(f"{head['url']}/api/jobs/", head["token"])[0] == 200


def test_job_submit_one_rl_epoch_with_runtime_env(head, tmp_path):
    # the job's working_dir: its own config, inheriting the tiny debug config by absolute path
    work = tmp_path / "job"
    work.mkdir()
    (work / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "inherit": str(TINY_CONFIG),
                "train": {"iterations": 1, "save_every_iterations": 1},
                # 2 prompts x 4 images = 8 samples: one micro-batch pair per learner rank, the quickest epoch
                "grpo": {"sample_batches_per_epoch": 1, "micro_batch_images_per_rank": 2},
            }
        )
    )
    out = tmp_path / "run"
    runtime_env = {
        "working_dir": str(work),
        "env_vars": {"RTDMD_JOB_MARKER": "from-runtime-env", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    }
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    job_id = f"rtdmd-test-{secrets.token_hex(4)}"
    t0 = time.monotonic()
    submit = _ray_cli(
        head,
        "job", "submit", "--address", head["url"], "--submission-id", job_id, "--no-wait",
        "--runtime-env", str(tmp_path / "runtime_env.yaml"),
        # the CLI shell-quotes each argument, so the variable is expanded by an inner `sh -c`
        "--", "sh", "-c", f"echo marker=$RTDMD_JOB_MARKER && rtdmd-ray train job.yaml train.output_dir={out}",
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr

    status = None
    while time.monotonic() - t0 < JOB_TIMEOUT_S:
        try:
            code, body = _http(f"{head['url']}/api/jobs/{job_id}", head["token"])
        except OSError:  # the dashboard can be slow to answer while the job loads a 2-core machine
            continue
        assert code == 200, body
        status = json.loads(body)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2.0)
    logs = json.loads(_http(f"{head['url']}/api/jobs/{job_id}/logs", head["token"])[1])["logs"]
    assert status == "SUCCEEDED", f"job {job_id}: {status}\n{logs[-4000:]}"
    print(f"job {job_id} SUCCEEDED in {time.monotonic() - t0:.1f} s")

    # the CLI sees the same outcome (with the token from the environment)
    st = _ray_cli(head, "job", "status", "--address", head["url"], job_id)
    assert st.returncode == 0 and f"Job '{job_id}' succeeded" in st.stdout + st.stderr, st.stdout + st.stderr
    # the runtime_env reached the entrypoint; the driver ran the RL stage
    assert "marker=from-runtime-env" in logs
    assert "done: 1 epochs, policy version 1" in logs, logs[-3000:]
    # a successful run stops its actors in order, each exiting on its own: no SIGTERM traceback after "done"
    after = logs.split("done: 1 epochs")[1]
    assert "Traceback" not in after and "SystemExit" not in after, after[-3000:]

    from rtdmd_ray.runs.checkpoint import is_complete, latest_checkpoint

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1]
    assert lines[0]["rollout/images"] == 8 and lines[0]["sync/bytes"] > 0
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and is_complete(ckpt) and ckpt.name == "checkpoint-00000001"
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["iterations"] == 1
