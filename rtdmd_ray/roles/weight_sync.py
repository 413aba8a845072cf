"""Learner → sampler weight sync: bucketed, versioned, one interface over three transports.

Over 600 lines on purpose: the bucket layout, the manifest and the sender/receiver of all three transports
are one wire protocol, which must change together.

Flow (the driver's view; every call is an actor method wrapping these objects)::

    endpoint = learner_rank0.open_weight_sync(num_receivers)       # non-blocking, publishes host:port
    [sampler_i.join_weight_sync(endpoint, rank=i + 1)]              # concurrent; forms the group
    ticket_ref = learner_rank0.send_weights.remote(version)         # packs, posts the transfer, returns
    [sampler_i.recv_weights.remote(ticket_ref)]                     # each gets (named_tensors, version)

The ``SyncTicket`` carries the bucket manifest (names, shapes, dtypes, offsets, version) through the
Ray control plane; only the bucket bytes go over the transport. Because ``send`` returns as soon as
the transfer is posted, the driver code is the same for every transport, and the driver may pass the
ticket's ObjectRef straight to the receivers (Ray starts them once ``send`` returned: one gather).

Transports (``sync.transport``):

* ``gloo``: a standalone ``torch.distributed.ProcessGroupGloo`` over a ``TCPStore`` served by the
  sender. It never touches the default process group, so it lives beside an FSDP/DDP learner's own
  default group (``ray.util.collective`` gloo would take that over: spec ray-landscape.md §d).
* ``nccl``: the same over a standalone ``ProcessGroupNCCL`` (a "stateless" NCCL group), buckets on GPU.
* ``object_store``: ``ray.put`` of the buckets; the ticket carries the object refs.

Re-join: each ``open`` starts a new group epoch (a fresh key prefix on the same store), so after a
sampler restart the driver calls ``open`` again and every receiver ``join``s the new epoch.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

TRANSPORTS: tuple[str, ...] = ("gloo", "nccl", "object_store")
_ALIGN_BYTES = 16  # every tensor starts 16-byte aligned inside its bucket, so `.view(dtype)` is legal
_STORE_PREFIX = "rtdmd_weight_sync"


class ManifestMismatchError(ValueError):
    """The received weights do not have the names/shapes/dtypes the receiver expects, or buckets disagree."""


# ---------------------------------------------------------------------------------------------------
# Buckets and manifest
# ---------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ManifestMismatchError(f"manifest names an unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class ManifestEntry:
    """Where one tensor lives: ``bucket`` index and byte ``offset`` inside it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    bucket: int
    offset: int
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * _dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class BucketManifest:
    """How ``named_tensors`` were flattened into uint8 buckets, and which policy ``version`` they are."""

    version: int
    entries: tuple[ManifestEntry, ...]
    bucket_nbytes: tuple[int, ...]

    @property
    def total_nbytes(self) -> int:
        return sum(self.bucket_nbytes)

    def layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{name: (shape, dtype name)}``, the part a receiver can check against its model."""
        return {e.name: (e.shape, e.dtype) for e in self.entries}

    def check_layout(self, expected: Mapping[str, tuple[Sequence[int], torch.dtype | str]]) -> None:
        """Raise ``ManifestMismatchError`` listing missing, unexpected and differing tensors."""
        want = {k: (tuple(s), d if isinstance(d, str) else _dtype_name(d)) for k, (s, d) in expected.items()}
        have = self.layout()
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        differ = [
            f"{k} sent {have[k][0]} {have[k][1]}, expected {want[k][0]} {want[k][1]}"
            for k in sorted(set(want) & set(have))
            if have[k] != want[k]
        ]
        if missing or extra or differ:

            def first5(items: list[str]) -> str:
                return "; ".join(items[:5]) + ("; ..." if len(items) > 5 else "") if items else "none"

            raise ManifestMismatchError(
                f"weight sync v{self.version}: the sent tensors do not match the receiver's model "
                f"(missing: {first5(missing)} | unexpected: {first5(extra)} | differing: {first5(differ)}). "
                "Learner and samplers must build the same LoRA (config `model.lora` per role) and backbone"
            )


def tensor_layout(named_tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype name)}`` of a state dict, the ``expected_layout`` of a ``WeightReceiver``."""
    return {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in named_tensors.items()}


def _align(n: int) -> int:
    return (n + _ALIGN_BYTES - 1) // _ALIGN_BYTES * _ALIGN_BYTES


def plan_buckets(
    named_tensors: Mapping[str, torch.Tensor], bucket_mib: float, *, version: int = 0
) -> BucketManifest:
    """The layout ``pack_buckets`` uses: tensors in the given order, greedily, 16-byte aligned.

    A tensor larger than a bucket gets a bucket of its own.
    """
    if bucket_mib <= 0:
        raise ValueError(f"bucket_mib must be > 0 (config `sync.bucket_mib`), got {bucket_mib}")
    capacity = int(bucket_mib * 2**20)
    entries: list[ManifestEntry] = []
    sizes: list[int] = []
    for name, t in named_tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pack_buckets: {name!r} is a {type(t).__name__}, expected a torch.Tensor")
        nbytes = t.numel() * t.element_size()
        offset = _align(sizes[-1]) if sizes else 0
        if not sizes or (sizes[-1] > 0 and offset + nbytes > capacity):
            sizes.append(0)
            offset = 0
        entries.append(
            ManifestEntry(
                name=name,
                shape=tuple(t.shape),
                dtype=_dtype_name(t.dtype),
                bucket=len(sizes) - 1,
                offset=offset,
                numel=t.numel(),
            )
        )
        sizes[-1] = offset + nbytes
    return BucketManifest(version=version, entries=tuple(entries), bucket_nbytes=tuple(sizes))


def _fill_bucket(
    bucket: torch.Tensor, entries: Sequence[ManifestEntry], tensors: Sequence[torch.Tensor]
) -> None:
    """Copy the raw bytes of ``tensors`` to their offsets in ``bucket`` and zero the alignment gaps."""
    end = 0
    for e, t in zip(entries, tensors, strict=True):
        if e.offset > end:
            bucket[end : e.offset].zero_()  # deterministic bytes on the wire
        if e.numel:
            bucket[e.offset : e.offset + e.nbytes].copy_(
                t.detach().contiguous().reshape(-1).view(torch.uint8)
            )
        end = e.offset + e.nbytes


def _allocate_buckets(
    sizes: Sequence[int], device: torch.device | str, reuse: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Buckets of ``sizes`` bytes; ``reuse`` is returned when it already has exactly those sizes."""
    if (
        reuse is not None
        and [b.numel() for b in reuse] == list(sizes)
        and all(b.device == torch.device(device) for b in reuse)
    ):
        return reuse
    return [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]


def pack_buckets(
    named_tensors: Mapping[str, torch.Tensor],
    bucket_mib: float,
    *,
    version: int = 0,
    device: torch.device | str | None = None,
    out: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], BucketManifest]:
    """Flatten tensors of any dtype into uint8 buckets of at most ``bucket_mib`` MiB each.

    The bytes are copied raw (``view(uint8)``), so ``unpack_buckets`` is bit-exact for every dtype
    (fp32/bf16/fp16, NaN payloads included). Layout: ``plan_buckets``.

    Args:
        named_tensors: ``{name: tensor}`` of any shapes/dtypes/devices.
        bucket_mib: bucket capacity in MiB (``sync.bucket_mib``).
        version: the policy version recorded in the manifest.
        device: where the buckets live (default: the first tensor's device).
        out: buckets of a previous call to fill in place when their sizes match (saves allocation).

    Returns:
        ``(buckets, manifest)``: buckets are 1-D uint8 tensors ``[bucket_nbytes[i]]``.
    """
    manifest = plan_buckets(named_tensors, bucket_mib, version=version)
    if device is None:
        device = next(iter(named_tensors.values())).device if named_tensors else "cpu"
    buckets = _allocate_buckets(manifest.bucket_nbytes, device, out)
    tensors = list(named_tensors.values())
    for i, bucket in enumerate(buckets):
        idx = [j for j, e in enumerate(manifest.entries) if e.bucket == i]
        _fill_bucket(bucket, [manifest.entries[j] for j in idx], [tensors[j] for j in idx])
    return buckets, manifest


def unpack_buckets(buckets: Sequence[torch.Tensor], manifest: BucketManifest) -> dict[str, torch.Tensor]:
    """Inverse of ``pack_buckets``: ``{name: tensor}`` as views into ``buckets`` (no copy).

    Raises:
        ManifestMismatchError: the buckets' count, dtype or sizes disagree with the manifest.
    """
    if len(buckets) != len(manifest.bucket_nbytes):
        raise ManifestMismatchError(
            f"weight sync v{manifest.version}: got {len(buckets)} buckets, the manifest "
            f"describes {len(manifest.bucket_nbytes)}"
        )
    for i, (b, n) in enumerate(zip(buckets, manifest.bucket_nbytes, strict=True)):
        if b.dtype != torch.uint8 or b.ndim != 1 or b.numel() != n:
            raise ManifestMismatchError(
                f"weight sync v{manifest.version}: bucket {i} is {b.dtype} "
                f"{tuple(b.shape)}, the manifest says uint8 [{n}]"
            )
    out: dict[str, torch.Tensor] = {}
    for e in manifest.entries:
        raw = buckets[e.bucket][e.offset : e.offset + e.nbytes]
        out[e.name] = raw.view(_dtype_from_name(e.dtype)).view(e.shape)
    return out


# ---------------------------------------------------------------------------------------------------
# Endpoint, ticket, process groups
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncEndpoint:
    """What the sender publishes so receivers can join group epoch ``group_epoch``."""

    transport: str
    host: str
    port: int  # the sender's TCPStore port (0 for object_store)
    group_epoch: int
    world_size: int  # sender + receivers
    timeout_s: float


@dataclass(frozen=True)
class SyncTicket:
    """One posted transfer: the manifest (with the version) and, for ``object_store``, the bucket refs."""

    transport: str
    group_epoch: int
    manifest: BucketManifest
    bucket_refs: tuple[Any, ...] = ()  # ray.ObjectRef per bucket, object_store only

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def nbytes(self) -> int:
        return self.manifest.total_nbytes


def _check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(
            f"unknown weight-sync transport {transport!r} (config `sync.transport`); "
            f"choose one of {TRANSPORTS}"
        )
    if transport == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise RuntimeError("sync.transport=nccl needs CUDA and a torch build with NCCL; on CPU use 'gloo'")


def node_ip() -> str:
    """This node's IP as Ray sees it (what other nodes can reach), or loopback outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def _new_group(
    backend: str, store: dist.Store, rank: int, world_size: int, timeout_s: float, host: str
) -> dist.ProcessGroup:
    """A standalone process group (not the default one): blocks until all ``world_size`` ranks joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # bind gloo to the IP other nodes reach us at (hostname resolution can pick an unreachable one)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    # NCCL creates its communicator lazily, on the first broadcast (which then also needs every rank)
    return dist.ProcessGroupNCCL(store, rank, world_size, opts)


def _wait_all(works: Sequence[Any], backend: str, timeout_s: float) -> None:
    for w in works:
        w.wait(datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.current_stream().synchronize()


class _PendingGroup:
    """The sender's side of one group epoch, formed in a background thread (gloo's constructor blocks)."""

    def __init__(self, backend: str, store: dist.Store, world_size: int, timeout_s: float, host: str):
        self.pg: Any = None
        self.error: BaseException | None = None

        def connect() -> None:
            try:
                self.pg = _new_group(backend, store, 0, world_size, timeout_s, host)
            except BaseException as e:  # surfaced on the next send()
                self.error = e

        self.thread = threading.Thread(target=connect, name="rtdmd-weight-sync-connect", daemon=True)
        self.thread.start()


class WeightSender:
    """The learner rank 0 side of weight sync (one per process).

    Args:
        transport: ``"gloo"`` | ``"nccl"`` | ``"object_store"`` (config ``sync.transport``).
        bucket_mib: bucket capacity in MiB (config ``sync.bucket_mib``).
        timeout_s: rendezvous and transfer timeout (config ``sync.timeout_s``).
        host: the address receivers connect to (default: this node's IP).
    """

    def __init__(
        self, *, transport: str, bucket_mib: float = 64.0, timeout_s: float = 120.0, host: str | None = None
    ):
        _check_transport(transport)
        self.transport, self.bucket_mib, self.timeout_s = transport, bucket_mib, timeout_s
        self.host = host or node_ip()
        self._store: dist.TCPStore | None = None
        self._epoch = -1
        self._world_size = 0
        self._pending: _PendingGroup | None = None
        self._inflight: tuple[list[Any], list[torch.Tensor], int] | None = None
        self._last_refs: tuple[Any, ...] = ()
        self._buffers: list[torch.Tensor] | None = None

    @property
    def group_epoch(self) -> int:
        return self._epoch

    def open(self, num_receivers: int) -> SyncEndpoint:
        """Start group epoch ``e + 1`` for ``num_receivers`` receivers and return its endpoint (non-blocking).

        Any previous group is dropped, so call this at start-up and again after a receiver restarted.
        """
        if num_receivers < 1:
            raise ValueError(f"open(num_receivers={num_receivers}): need at least one receiver")
        self._drop_group()
        self._epoch += 1
        self._world_size = num_receivers + 1
        port = 0
        if self.transport != "object_store":
            if self._store is None:
                # port 0: the OS picks a free port; the store outlives epochs, each epoch uses its own prefix
                self._store = dist.TCPStore(
                    self.host,
                    0,
                    None,
                    True,
                    datetime.timedelta(seconds=self.timeout_s),
                    wait_for_workers=False,
                )
            port = self._store.port
            prefixed = dist.PrefixStore(f"{_STORE_PREFIX}/{self._epoch}/", self._store)
            self._pending = _PendingGroup(
                self.transport, prefixed, self._world_size, self.timeout_s, self.host
            )
        return SyncEndpoint(
            transport=self.transport,
            host=self.host,
            port=port,
            group_epoch=self._epoch,
            world_size=self._world_size,
            timeout_s=self.timeout_s,
        )

    def _group(self) -> Any:
        if self._pending is None:
            raise RuntimeError(
                "WeightSender.send before open(): call open(num_receivers) and join() every "
                "receiver with the endpoint it returns"
            )
        self._pending.thread.join(self.timeout_s)
        if self._pending.thread.is_alive() or self._pending.error is not None:
            err = self._pending.error or TimeoutError(f"not all ranks joined within {self.timeout_s} s")
            self._pending = None
            raise RuntimeError(
                f"weight sync group epoch {self._epoch} at {self.host} did not form: {err}. Every "
                f"receiver must call join(endpoint, rank) with ranks 1..{self._world_size - 1} "
                f"(raise `sync.timeout_s` if receivers start slowly)"
            ) from err
        return self._pending.pg

    def send(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> SyncTicket:
        """Pack ``named_tensors`` as policy ``version`` and post the transfer; receivers ``recv(ticket)``.

        Returns once the transfer is posted (collectives) or stored (object store). The previous
        transfer is waited for first, so at most one is in flight.
        """
        if self.transport == "object_store":
            import ray

            buckets, manifest = pack_buckets(named_tensors, self.bucket_mib, version=version, device="cpu")
            # numpy arrays are read zero-copy from the object store by receivers on the same node
            self._last_refs = tuple(ray.put(b.numpy()) for b in buckets)
            return SyncTicket(
                transport=self.transport,
                group_epoch=self._epoch,
                manifest=manifest,
                bucket_refs=self._last_refs,
            )
        pg = self._group()
        self.wait()
        device = torch.device("cuda", torch.cuda.current_device()) if self.transport == "nccl" else "cpu"
        manifest = plan_buckets(named_tensors, self.bucket_mib, version=version)
        # reuse last send's buffers (safe: wait() above finished that transfer); post each bucket as
        # soon as it is filled so packing the next one overlaps the transfer of this one
        buckets = _allocate_buckets(manifest.bucket_nbytes, device, self._buffers)
        self._buffers = buckets
        tensors, works = list(named_tensors.values()), []
        for i, bucket in enumerate(buckets):
            idx = [j for j, e in enumerate(manifest.entries) if e.bucket == i]
            _fill_bucket(bucket, [manifest.entries[j] for j in idx], [tensors[j] for j in idx])
            works.append(pg.broadcast(bucket, 0))
        self._inflight = (works, buckets, version)
        return SyncTicket(transport=self.transport, group_epoch=self._epoch, manifest=manifest)

    def wait(self) -> None:
        """Block until the last posted transfer reached every receiver (raises if one failed or timed out)."""
        if self._inflight is None:
            return
        works, _buckets, version = self._inflight
        self._inflight = None
        try:
            _wait_all(works, self.transport, self.timeout_s)
        except Exception as e:
            self._drop_group()
            raise RuntimeError(
                f"weight sync v{version} (group epoch {self._epoch}) failed: {e}. A receiver died or did not "
                f"call recv(ticket); re-open with open(num_receivers) and join() every receiver"
            ) from e

    def _drop_group(self) -> None:
        pending, self._pending, self._inflight = self._pending, None, None
        if pending is not None and pending.pg is not None:
            try:
                pending.pg.abort()  # do not block on transfers to a dead receiver
            except Exception:
                pass

    def close(self) -> None:
        """Drop the group and stop serving the store."""
        self._drop_group()
        self._store = None
        self._last_refs = ()


class WeightReceiver:
    """A sampler's side of weight sync (one per process).

    Args:
        timeout_s: join and transfer timeout (config ``sync.timeout_s``).
        expected_layout: ``{name: (shape, dtype)}`` of the receiving model (``tensor_layout(lora_state)``);
            when given, a ticket with another layout raises ``ManifestMismatchError``.
        host: this process's reachable address for gloo (default: this node's IP).
        reuse_buffers: receive into the same buffers every time the bucket sizes repeat (no allocation
            and page faults per sync). The tensors ``recv`` returns are then views that the NEXT ``recv``
            overwrites: copy them into the model (``param.copy_``) before receiving again, or pass False.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 120.0,
        expected_layout: Mapping[str, tuple[Sequence[int], torch.dtype | str]] | None = None,
        host: str | None = None,
        reuse_buffers: bool = True,
    ):
        self.timeout_s = timeout_s
        self.reuse_buffers = reuse_buffers
        self._buffers: list[torch.Tensor] | None = None
        self.expected_layout = dict(expected_layout) if expected_layout is not None else None
        self.host = host or node_ip()
        self.version = -1  # the policy version of the last weights received
        self._endpoint: SyncEndpoint | None = None
        self._pg: Any = None

    def join(self, endpoint: SyncEndpoint, rank: int) -> None:
        """Join group epoch ``endpoint.group_epoch`` as ``rank`` (1..world_size-1); blocks until it forms."""
        _check_transport(endpoint.transport)
        if not 1 <= rank < endpoint.world_size:
            raise ValueError(
                f"receiver rank {rank} out of range 1..{endpoint.world_size - 1} (rank 0 is the sender)"
            )
        self.close()
        if endpoint.transport != "object_store":
            if endpoint.transport == "nccl":
                torch.cuda.set_device(torch.cuda.current_device())
            timeout = datetime.timedelta(seconds=endpoint.timeout_s)
            try:
                store = dist.TCPStore(endpoint.host, endpoint.port, None, False, timeout)
                prefixed = dist.PrefixStore(f"{_STORE_PREFIX}/{endpoint.group_epoch}/", store)
                self._pg = _new_group(
                    endpoint.transport, prefixed, rank, endpoint.world_size, endpoint.timeout_s, self.host
                )
            except Exception as e:
                raise RuntimeError(
                    f"could not join weight-sync group epoch {endpoint.group_epoch} at "
                    f"{endpoint.host}:{endpoint.port} as rank {rank}: {e}. Is the sender's open() "
                    f"endpoint current, and can this node reach it?"
                ) from e
        self._endpoint = endpoint

    def recv(self, ticket: SyncTicket) -> tuple[dict[str, torch.Tensor], int]:
        """Receive the weights of ``ticket``; returns ``({name: tensor}, version)``.

        Checks the layout and version before the transfer but raises only after taking part in it,
        so a rejected ticket never leaves the sender's collective hanging.
        """
        problem = self._check(ticket)
        manifest = ticket.manifest
        if ticket.transport == "object_store":
            import numpy as np
            import ray

            arrays = ray.get(list(ticket.bucket_refs), timeout=self.timeout_s)
            buckets = self._receive_buffers(manifest, "cpu")
            for b, a in zip(buckets, arrays, strict=True):
                np.copyto(b.numpy(), a)  # the store's arrays are read-only: copy into writable buckets
        else:
            if self._pg is None or self._endpoint is None or ticket.group_epoch != self._endpoint.group_epoch:
                joined = None if self._endpoint is None else self._endpoint.group_epoch
                raise RuntimeError(
                    f"ticket is for group epoch {ticket.group_epoch}, this receiver joined epoch "
                    f"{joined}: join() the sender's current endpoint first"
                )
            device = (
                torch.device("cuda", torch.cuda.current_device()) if ticket.transport == "nccl" else "cpu"
            )
            buckets = self._receive_buffers(manifest, device)
            works = [self._pg.broadcast(b, 0) for b in buckets]
            try:
                _wait_all(works, ticket.transport, self.timeout_s)
            except Exception as e:
                self.close()
                raise RuntimeError(
                    f"weight sync v{ticket.version} failed while receiving: {e}. The sender must "
                    f"re-open and every receiver re-join"
                ) from e
        if problem is not None:
            raise problem
        named = unpack_buckets(buckets, manifest)
        self.version = ticket.version
        return named, ticket.version

    def _receive_buffers(self, manifest: BucketManifest, device: torch.device | str) -> list[torch.Tensor]:
        buckets = _allocate_buckets(
            manifest.bucket_nbytes, device, self._buffers if self.reuse_buffers else None
        )
        if self.reuse_buffers:
            self._buffers = buckets
        return buckets

    def _check(self, ticket: SyncTicket) -> Exception | None:
        if ticket.version < self.version:
            return ValueError(
                f"stale weights: ticket v{ticket.version} is older than the v{self.version} this "
                f"receiver already holds"
            )
        if self.expected_layout is not None:
            try:
                ticket.manifest.check_layout(self.expected_layout)
            except ManifestMismatchError as e:
                return e
        return None

    def close(self) -> None:
        """Leave the current group (if any)."""
        if self._pg is not None:
            try:
                self._pg.abort()
            except Exception:
                pass
        self._pg, self._endpoint = None, None
