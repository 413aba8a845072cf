"""Weight sync on GPU: CUDA buckets are bit-exact; the NCCL transport between two GPU actors.

Run on a GPU machine: ``pytest -m gpu tests/gpu/test_weight_sync_nccl.py`` (the NCCL test needs 2 GPUs:
NCCL cannot place two ranks of one communicator on the same device).
"""

from __future__ import annotations

import sys

import pytest
import torch

from rtdmd_ray.roles.weight_sync import pack_buckets, tensor_layout, unpack_buckets

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL sync needs 2 GPUs")


def lora_state(seed: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(4):
        state[f"blocks.{i}.attn.to_q.lora_A.weight"] = torch.randn(32, 1536, generator=g)
        state[f"blocks.{i}.attn.to_q.lora_B.weight"] = torch.randn(1536, 32, generator=g).to(torch.bfloat16)
        state[f"blocks.{i}.ff.lora_A.weight"] = torch.randn(32, 512, generator=g).to(torch.float16)
    return {k: v.to(device) for k, v in state.items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


@needs_cuda
def test_cuda_buckets_bit_exact_and_cpu_buckets_from_cuda_state():
    state = lora_state(0, "cuda")
    for device in ("cuda", "cpu"):  # nccl packs on the GPU; gloo packs a GPU learner's state into CPU buckets
        buckets, manifest = pack_buckets(state, bucket_mib=0.25, version=3, device=device)
        assert len(buckets) > 1 and all(b.device.type == device for b in buckets)
        out = unpack_buckets(buckets, manifest)
        for k, v in state.items():
            assert out[k].dtype == v.dtype and out[k].shape == v.shape
            assert torch.equal(bits(out[k]), bits(v)), k


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
            for k, v in lora_state(seed, "cpu").items():
                assert torch.equal(bits(named[k]), bits(v)), k
        ray_local.get(join)
    finally:
        senders.shutdown()
        receivers.shutdown()
