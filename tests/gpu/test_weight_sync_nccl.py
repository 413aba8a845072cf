"""Weight sync on GPU: CUDA buckets are bit-exact; the NCCL transport between two GPU actors.

Run on a GPU machine: ``pytest -m gpu tests/gpu/test_weight_sync_nccl.py`` (the NCCL test needs 2 GPUs:
NCCL cannot place two ranks of one communicator on the same device).
"""

from __future__ import annotations

import sys

import pytest
import torch

from rtdmd_ray.roles.weight_sync import pack_buckets, tensor_layout, unpack_buckets
from tests import weight_sync_helpers
from tests.weight_sync_helpers import assert_bit_equal, lora_like_state

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL sync needs 2 GPUs")


def lora_state(seed: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = lora_like_state(g, blocks=4, rank=32, width=1536, ff_width=512)
    return {k: v.to(device) for k, v in state.items()}


@needs_cuda
def test_cuda_buckets_bit_exact_and_cpu_buckets_from_cuda_state():
    state = lora_state(0, "cuda")
    for device in ("cuda", "cpu"):  # nccl packs on the GPU; gloo packs a GPU learner's state into CPU buckets
        buckets, manifest = pack_buckets(state, bucket_mib=0.25, version=3, device=device)
        assert len(buckets) > 1 and all(b.device.type == device for b in buckets)
        assert_bit_equal(unpack_buckets(buckets, manifest), state)


class NcclSender:
    def __init__(self):
        from rtdmd_ray.roles.weight_sync import WeightSender

        self.sender = WeightSender(transport="nccl", bucket_mib=0.25, timeout_s=120)

    def open(self, n: int):
        return self.sender.open(n)

    def send(self, seed: int, version: int):
        return self.sender.send(lora_state(seed, "cuda"), version)

    def wait(self) -> None:
        self.sender.wait()


class NcclReceiver:
    def __init__(self):
        from rtdmd_ray.roles.weight_sync import WeightReceiver

        self.rx = WeightReceiver(timeout_s=120, expected_layout=tensor_layout(lora_state(0, "cpu")))

    def join(self, endpoint, rank: int) -> None:
        self.rx.join(endpoint, rank)

    def recv(self, ticket):
        named, version = self.rx.recv(ticket)
        assert all(v.is_cuda for v in named.values())
        return {k: v.cpu() for k, v in named.items()}, version


@needs_two_gpus
def test_nccl_sync_between_gpu_actors(ray_local):
    import ray.cloudpickle

    from rtdmd_ray.roles.groups import RoleResources, create_actor_group, gather

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(weight_sync_helpers)
    res = RoleResources(count=1, cpus_per_actor=1, gpus_per_actor=1)
    senders = create_actor_group(NcclSender, res, role="learner")
    receivers = create_actor_group(NcclReceiver, res, role="sampler")
    try:
        endpoint = ray_local.get(senders[0].open.remote(1))
        join = receivers[0].join.remote(endpoint, 1)
        for version, seed in [(1, 5), (2, 6)]:
            ticket = ray_local.get(senders[0].send.remote(seed, version))
            named, got = gather([receivers[0].recv.remote(ticket)], timeout_s=120, what="nccl recv")[0]
            ray_local.get(senders[0].wait.remote())
            assert got == version
            assert_bit_equal(named, lora_state(seed, "cpu"))
        ray_local.get(join)
    finally:
        senders.shutdown()
        receivers.shutdown()
