"""Shared fixtures: one private local Ray cluster per test session (never attaches to another cluster)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT_SETS = REPO_ROOT / "data" / "prompts"  # vendored copies of the public prompt sets

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray cluster: ``address="local"`` so it never joins another Ray on this machine.

    It advertises 2 of the custom resource ``rtdmd_reward`` (as a reward node of cluster/ does) for the
    role-pinning tests; actors that do not ask for it are unaffected."""
    ray = pytest.importorskip("ray")
    # short path: Ray's unix socket paths must stay under ~107 characters
    tmp = tempfile.mkdtemp(prefix="rtr-", dir="/tmp")
    # Ray waits a hard-coded 30 s for its raylet; on a saturated 2-core machine that can pass, so retry.
    for attempt in range(3):
        try:
            ray.init(
                address="local", num_cpus=4, resources={"rtdmd_reward": 2}, include_dashboard=False,
                _temp_dir=tmp, log_to_driver=False, ignore_reinit_error=True,
            )
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    CPU kernels of tiny models are fastest, and bit-reproducible, that way on a shared machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
