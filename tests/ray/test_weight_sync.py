"""Weight sync on local CPU Ray: a 2-rank learner (own default gloo group) → 2 sampler actors.

Covers: bit-exact transfer with the new version over the standalone gloo group (several buckets,
mixed dtypes), coexistence with the learner's default process group, the object-store transport,
re-join after a sampler restart, and manifest mismatch.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import ray.cloudpickle
import torch

from rtdmd_ray.roles.groups import RoleResources, create_actor_group, create_learner_group, gather
from rtdmd_ray.roles.weight_sync import ManifestMismatchError, tensor_layout
from tests import weight_sync_helpers
from tests.weight_sync_helpers import assert_bit_equal, lora_like_state

pytestmark = pytest.mark.ray

# test modules are not importable inside Ray workers: ship this module's code (and its helpers') by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(weight_sync_helpers)

TINY_BUCKET_MIB = 2048 / 2**20  # 2 KiB buckets: the state below spans several
TIMEOUT_S = 60.0


def lora_state(seed: int, *, wrong_shape: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA-like state dict of mixed dtypes (~10 KiB); the same seed gives the same bits anywhere."""
    g = torch.Generator().manual_seed(seed)
    state = lora_like_state(g, blocks=3, rank=4, width=96, ff_width=32)
    if wrong_shape:
        state["blocks.0.attn.to_q.lora_A.weight"] = torch.randn(8, 96, generator=g)
    return state


class SyncLearner:
    """A learner rank: rank 0 owns the weight senders; every rank has the default gloo group."""

    def __init__(self, *, bucket_mib: float):
        from rtdmd_ray.roles.weight_sync import WeightSender

        self.bucket_mib = bucket_mib
        self.senders = {}
        self.make_sender = lambda t: WeightSender(transport=t, bucket_mib=bucket_mib, timeout_s=TIMEOUT_S)

    def open_weight_sync(self, transport: str, num_receivers: int):
        import torch.distributed as dist

        # the point of the standalone group: the default (FSDP-like) group already exists here
        assert dist.is_initialized() and dist.get_world_size() == 2
        if transport not in self.senders:
            self.senders[transport] = self.make_sender(transport)
        return self.senders[transport].open(num_receivers)

    def send_weights(self, transport: str, seed: int, version: int, wrong_shape: bool = False):
        return self.senders[transport].send(lora_state(seed, wrong_shape=wrong_shape), version)

    def wait_sent(self, transport: str) -> None:
        self.senders[transport].wait()

    def allreduce(self, x: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([x])
        dist.all_reduce(t)
        return float(t.item())


class SyncSampler:
    def __init__(self):
        from rtdmd_ray.roles.weight_sync import WeightReceiver

        self.receiver = WeightReceiver(timeout_s=TIMEOUT_S, expected_layout=tensor_layout(lora_state(0)))

    def pid(self) -> int:
        return os.getpid()

    def join_weight_sync(self, endpoint, rank: int) -> None:
        self.receiver.join(endpoint, rank)

    def recv_weights(self, ticket) -> tuple[dict[str, torch.Tensor], int]:
        named, version = self.receiver.recv(ticket)
        return {k: v.clone() for k, v in named.items()}, version

    def version(self) -> int:
        return self.receiver.version


@pytest.fixture(scope="module")
def topology(ray_local):
    learners, _info = create_learner_group(
        SyncLearner,
        RoleResources(count=2, cpus_per_actor=0.5),
        init_kwargs={"bucket_mib": TINY_BUCKET_MIB},
        timeout_s=TIMEOUT_S,
    )
    samplers = create_actor_group(
        SyncSampler, RoleResources(count=2, cpus_per_actor=0.25, max_restarts=1), role="sampler"
    )
    samplers.wait_ready(timeout_s=TIMEOUT_S)
    yield learners, samplers
    samplers.shutdown()
    learners.shutdown()


def open_and_join(learners, samplers, transport: str):
    endpoint = ray.get(learners[0].open_weight_sync.remote(transport, len(samplers)))
    gather(
        samplers.map_ranked_async(lambda r, s: s.join_weight_sync.remote(endpoint, r + 1)),
        timeout_s=TIMEOUT_S,
        what="join",
    )
    return endpoint


def sync(learners, samplers, transport: str, seed: int, version: int, *, wrong_shape: bool = False):
    """The driver's sync phase: the ticket's ObjectRef goes straight to the receivers (no extra get)."""
    ticket_ref = learners[0].send_weights.remote(transport, seed, version, wrong_shape)
    return ticket_ref, samplers.map_async(lambda s: s.recv_weights.remote(ticket_ref))


def test_gloo_sync_beside_the_learners_default_group(topology):
    learners, samplers = topology
    endpoint = open_and_join(learners, samplers, "gloo")
    assert endpoint.world_size == 3 and endpoint.transport == "gloo"
    for version, seed in [(1, 11), (2, 12)]:
        ticket_ref, recv_refs = sync(learners, samplers, "gloo", seed, version)
        assert len(ray.get(ticket_ref).manifest.bucket_nbytes) >= 4  # several buckets
        # the learners use their default group while the weight transfer is in flight
        reduce_refs = learners.map_ranked_async(lambda r, a: a.allreduce.remote(float(r + 1)))
        assert gather(reduce_refs, timeout_s=TIMEOUT_S, what="allreduce") == [3.0, 3.0]
        received = gather(recv_refs, timeout_s=TIMEOUT_S, what="recv")
        ray.get(learners[0].wait_sent.remote("gloo"))
        for named, got_version in received:
            assert got_version == version
            assert_bit_equal(named, lora_state(seed))
    assert samplers.map(lambda s: s.version.remote(), timeout_s=TIMEOUT_S) == [2, 2]


def test_object_store_sync(topology):
    learners, samplers = topology
    open_and_join(learners, samplers, "object_store")
    ticket_ref, recv_refs = sync(learners, samplers, "object_store", seed=21, version=3)
    ticket = ray.get(ticket_ref)
    assert len(ticket.bucket_refs) == len(ticket.manifest.bucket_nbytes) >= 4
    for named, got_version in gather(recv_refs, timeout_s=TIMEOUT_S, what="recv"):
        assert got_version == 3
        assert_bit_equal(named, lora_state(21))


def test_manifest_mismatch_raises_and_group_stays_usable(topology):
    learners, samplers = topology
    open_and_join(learners, samplers, "gloo")
    _ticket, recv_refs = sync(learners, samplers, "gloo", seed=31, version=4, wrong_shape=True)
    for ref in recv_refs:
        with pytest.raises(
            ManifestMismatchError, match=r"differing: blocks.0.attn.to_q.lora_A.weight sent \(8, 96\)"
        ):
            ray.get(ref, timeout=TIMEOUT_S)
    ray.get(learners[0].wait_sent.remote("gloo"))  # receivers drained the transfer: no hang
    _ticket, recv_refs = sync(learners, samplers, "gloo", seed=32, version=5)
    for named, got_version in gather(recv_refs, timeout_s=TIMEOUT_S, what="recv"):
        assert got_version == 5
        assert_bit_equal(named, lora_state(32))


def test_restarted_sampler_rejoins_a_new_group_epoch(topology):
    learners, samplers = topology
    old = open_and_join(learners, samplers, "gloo")
    old_ticket, recv_refs = sync(learners, samplers, "gloo", seed=41, version=6)
    gather(recv_refs, timeout_s=TIMEOUT_S, what="recv")
    old_ticket = ray.get(old_ticket)
    pid = ray.get(samplers[1].pid.remote())
    os.kill(pid, signal.SIGKILL)  # crash the sampler process this test started; Ray restarts the actor
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            if ray.get(samplers[1].pid.remote(), timeout=TIMEOUT_S) != pid:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "sampler 1 was not restarted"
        time.sleep(0.2)
    assert ray.get(samplers[1].version.remote()) == -1  # fresh process, no weights yet
    with pytest.raises(RuntimeError, match="join\\(\\) the sender's current endpoint"):
        ray.get(samplers[1].recv_weights.remote(old_ticket), timeout=TIMEOUT_S)
    new = open_and_join(learners, samplers, "gloo")
    assert new.group_epoch == old.group_epoch + 1
    _ticket, recv_refs = sync(learners, samplers, "gloo", seed=42, version=7)
    for named, got_version in gather(recv_refs, timeout_s=TIMEOUT_S, what="recv after rejoin"):
        assert got_version == 7
        assert_bit_equal(named, lora_state(42))
