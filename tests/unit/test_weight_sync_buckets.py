"""Bucket packing is bit-exact for mixed dtypes; the gloo transport works between threads (no Ray)."""

from __future__ import annotations

import threading

import pytest
import torch

from rtdmd_ray.roles.weight_sync import (
    ManifestMismatchError,
    WeightReceiver,
    WeightSender,
    pack_buckets,
    tensor_layout,
    unpack_buckets,
)
from tests.weight_sync_helpers import assert_bit_equal


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    nan_payload = torch.tensor([0x7FC00001, 0x7F800001, -1], dtype=torch.int32).view(torch.float32)
    return {
        "blocks.0.attn.to_q.lora_A.weight": torch.randn(8, 64, generator=g),
        "blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 8, generator=g).to(torch.bfloat16),
        "blocks.0.ff.lora_A.weight": torch.randn(3, 5, 7, generator=g).to(torch.float16),
        "transposed": torch.randn(6, 4, generator=g).t(),  # non-contiguous input
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "odd_uint8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "nan_payloads": nan_payload,  # bit patterns must survive, not just values
    }


def test_pack_unpack_bit_exact_mixed_dtypes():
    state = mixed_state()
    buckets, manifest = pack_buckets(state, bucket_mib=1.0, version=7)
    assert manifest.version == 7 and len(buckets) == 1
    assert all(b.dtype == torch.uint8 and b.ndim == 1 for b in buckets)
    assert_bit_equal(unpack_buckets(buckets, manifest), state)
    for e in manifest.entries:
        assert e.offset % 16 == 0  # aligned so that every dtype can be viewed in place


def test_tiny_buckets_split_and_oversized_tensor_gets_its_own():
    state = mixed_state()
    state["big"] = torch.randn(1024)  # 4 KiB > the 1 KiB bucket below
    bucket_mib = 1024 / 2**20
    buckets, manifest = pack_buckets(state, bucket_mib=bucket_mib)
    assert len(buckets) > 2
    bucket_of = [e.bucket for e in manifest.entries]
    big = next(e for e in manifest.entries if e.name == "big")
    assert manifest.bucket_nbytes[big.bucket] == 4096 and bucket_of.count(big.bucket) == 1
    for i, n in enumerate(
        manifest.bucket_nbytes
    ):  # full buckets respect the size; oversized tensors go alone
        assert n <= 1024 or bucket_of.count(i) == 1, (i, n)
    assert bucket_of == sorted(bucket_of)  # order kept
    assert [len(b) for b in buckets] == list(manifest.bucket_nbytes)
    assert sum(manifest.bucket_nbytes) == manifest.total_nbytes
    assert_bit_equal(unpack_buckets(buckets, manifest), state)


def test_pack_into_reused_buckets():
    buckets, manifest = pack_buckets(mixed_state(0), bucket_mib=512 / 2**20)
    again, manifest2 = pack_buckets(mixed_state(1), bucket_mib=512 / 2**20, out=buckets)
    assert all(a is b for a, b in zip(again, buckets, strict=True)) and manifest2 == manifest
    assert_bit_equal(unpack_buckets(again, manifest2), mixed_state(1))
    bigger = dict(mixed_state(0), extra=torch.zeros(300))
    fresh, _ = pack_buckets(bigger, bucket_mib=512 / 2**20, out=buckets)  # other sizes: new buckets
    assert not any(f is b for f in fresh for b in buckets)


def test_manifest_layout_check_and_bucket_mismatch():
    state = mixed_state()
    buckets, manifest = pack_buckets(state, bucket_mib=1.0)
    manifest.check_layout(tensor_layout(state))  # matches: no error
    wrong = tensor_layout(state)
    wrong["blocks.0.attn.to_q.lora_A.weight"] = ((8, 32), "float32")
    del wrong["scalar"]
    wrong["extra.lora_A"] = ((1,), torch.float32)
    with pytest.raises(
        ManifestMismatchError,
        match=r"missing: extra.lora_A \| unexpected: scalar \| differing: .*to_q.* \(8, 64\) float32, "
        r"expected \(8, 32\)",
    ):
        manifest.check_layout(wrong)
    with pytest.raises(ManifestMismatchError, match="got 2 buckets"):
        unpack_buckets(buckets + buckets, manifest)
    with pytest.raises(ManifestMismatchError, match="bucket 0"):
        unpack_buckets([buckets[0][:-1]], manifest)
    with pytest.raises(ValueError, match="sync.bucket_mib"):
        pack_buckets(state, bucket_mib=0)


def _run_receivers(endpoint, receivers, tickets, results):
    """Each receiver joins, then receives each ticket as it appears (threads stand in for sampler actors)."""

    def run(rank, rx):
        try:
            rx.join(endpoint, rank)
            for _ in range(len(tickets)):
                named, version = rx.recv(tickets.wait_next(rank))
                # copy out, as loading into the model does: the next recv reuses the buffers
                results[rank].append(({k: v.clone() for k, v in named.items()}, version, named))
        except Exception as e:  # reported by the test
            results[rank].append(e)

    threads = [threading.Thread(target=run, args=(i + 1, rx)) for i, rx in enumerate(receivers)]
    for t in threads:
        t.start()
    return threads


class _Tickets:
    """A tiny mailbox: the test thread posts tickets, receiver threads take them in order."""

    def __init__(self, n: int):
        self._items: list = []
        self._n = n
        self._cv = threading.Condition()
        self._taken: dict[int, int] = {}

    def __len__(self) -> int:
        return self._n

    def post(self, ticket) -> None:
        with self._cv:
            self._items.append(ticket)
            self._cv.notify_all()

    def wait_next(self, rank: int):
        with self._cv:
            i = self._taken.get(rank, 0)
            assert self._cv.wait_for(lambda: len(self._items) > i, timeout=30)
            self._taken[rank] = i + 1
            return self._items[i]


def test_gloo_transport_between_threads_versions_and_rejoin():
    torch.set_num_threads(1)
    sender = WeightSender(transport="gloo", bucket_mib=512 / 2**20, timeout_s=30, host="127.0.0.1")
    receivers = [
        WeightReceiver(timeout_s=30, expected_layout=tensor_layout(mixed_state()), host="127.0.0.1")
        for _ in range(2)
    ]
    for epoch in range(2):  # epoch 1 = every receiver re-joins a fresh group (as after a sampler restart)
        endpoint = sender.open(num_receivers=2)
        assert endpoint.group_epoch == epoch and endpoint.port > 0
        tickets, results = _Tickets(2), {1: [], 2: []}
        threads = _run_receivers(endpoint, receivers, tickets, results)
        sent = []
        for step in range(2):
            version = 10 * epoch + step
            state = mixed_state(seed=version)
            tickets.post(sender.send(state, version))
            sent.append((state, version))
        sender.wait()
        for t in threads:
            t.join(30)
        for rank in (1, 2):
            assert len(results[rank]) == 2, results[rank]
            for (named, got_version, _), (state, version) in zip(results[rank], sent, strict=True):
                assert got_version == version
                assert_bit_equal(named, state)
            # same layout twice: the second sync landed in the first one's receive buffers
            views = [r[2] for r in results[rank]]
            assert all(
                views[0][k].data_ptr() == views[1][k].data_ptr() for k in views[0] if views[0][k].numel()
            )
        assert receivers[0].version == 10 * epoch + 1
    sender.close()
    for rx in receivers:
        rx.close()
