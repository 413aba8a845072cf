"""P3 (issue 10): weight-sync time and bandwidth of our transports vs a raw torch.distributed broadcast.

Topology: one sender actor (learner rank 0 stand-in, with its own default gloo group of world size 1,
as an FSDP learner has) and ``--receivers`` sampler actors, on a private local Ray cluster
(``--runner processes``: plain spawned processes instead, for when a Ray head cannot start; no object store).

For each adapter (ShapeWorld: the real tiny SD3 transformer + peft LoRA; SD3.5-M-sized: rank 32 on the
8 attention projections of 24 joint blocks, hidden 1536, random tensors of those shapes) it times:

* ``ours``: the driver's full sync, ``ticket = send(state, v)`` → every receiver ``recv(ticket)``
  returned: packing, the control-plane hops carrying the manifest, the transfer and unpacking;
* ``ours, in recv``: the seconds spent inside ``recv`` (transfer + unpack) on the slowest receiver;
* ``raw``: one ``broadcast`` of a pre-allocated flat buffer of the same bytes on an already-formed gloo
  group, launched on all ranks at once by the driver (one Ray round trip);
* ``object_store``: the same full sync through ``ray.put`` / ``ray.get``.

It prints medians and the ratio ``bandwidth ours ÷ raw`` (goal ≥ 0.5). Pass ``--learner-step-s`` to also
print ``sync ÷ learner step`` (goal ≤ 5 %).

    source scripts/env.sh && nice -n 15 .venv/bin/python bench/bench_weight_sync.py
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time

import ray
import torch

from rtdmd_ray.models.lora import SD3_FLUX1_TARGETS as SD3_ATTENTION_TARGETS


def shapeworld_lora_shapes(rank: int = 16) -> dict[str, tuple[int, ...]]:
    """LoRA A/B shapes of the real ShapeWorld transformer (configs/rtdmd/shapes.yaml: rank 16)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(SD3_ATTENTION_TARGETS)), model
    )
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" in k}


def sd35m_lora_shapes(rank: int = 32, blocks: int = 24, hidden: int = 1536) -> dict[str, tuple[int, ...]]:
    """Rank-``rank`` LoRA on the 8 attention projections of ``blocks`` joint blocks of width ``hidden``."""
    shapes = {}
    for b in range(blocks):
        for target in SD3_ATTENTION_TARGETS:
            path = f"transformer_blocks.{b}.{target}"
            shapes[f"{path}.lora_A.default.weight"] = (rank, hidden)
            shapes[f"{path}.lora_B.default.weight"] = (hidden, rank)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}  # fp32 master LoRA weights


class BenchSender:
    def __init__(self, *, shapes: dict[str, tuple[int, ...]], bucket_mib: float, timeout_s: float):
        import torch.distributed as dist

        from rtdmd_ray.roles.weight_sync import WeightSender

        torch.set_num_threads(1)
        # an FSDP-like default group already lives here, as on a real learner rank
        store = dist.TCPStore(
            "127.0.0.1", 0, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False
        )
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        self.state = random_state(shapes, seed=0)
        self.senders = {
            t: WeightSender(transport=t, bucket_mib=bucket_mib, timeout_s=timeout_s)
            for t in ("gloo", "object_store")
        }
        self.raw = WeightSender(transport="gloo", timeout_s=timeout_s)  # only its group is used, for raw
        self.raw_buf: torch.Tensor | None = None

    def open(self, transport: str, num_receivers: int):
        return (self.raw if transport == "raw" else self.senders[transport]).open(num_receivers)

    def send(self, transport: str, version: int):
        return self.senders[transport].send(self.state, version)

    def wait(self, transport: str) -> None:
        self.senders[transport].wait()

    def raw_broadcast(self, nbytes: int) -> float:
        if self.raw_buf is None or self.raw_buf.numel() != nbytes:
            self.raw_buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        t0 = time.perf_counter()
        self.raw._group().broadcast(self.raw_buf, 0).wait()
        return time.perf_counter() - t0


class BenchReceiver:
    def __init__(self, *, timeout_s: float):
        from rtdmd_ray.roles.weight_sync import WeightReceiver

        torch.set_num_threads(1)
        self.rx = {t: WeightReceiver(timeout_s=timeout_s) for t in ("gloo", "object_store", "raw")}
        self.raw_buf: torch.Tensor | None = None

    def join(self, transport: str, endpoint, rank: int) -> None:
        self.rx[transport].join(endpoint, rank)

    def recv(self, ticket) -> float:
        t0 = time.perf_counter()
        named, _version = self.rx[ticket.transport].recv(ticket)
        # touch every tensor, as loading into the model would
        assert sum(v.numel() for v in named.values()) > 0
        return time.perf_counter() - t0

    def raw_broadcast(self, nbytes: int) -> float:
        if self.raw_buf is None or self.raw_buf.numel() != nbytes:
            self.raw_buf = torch.empty(nbytes, dtype=torch.uint8)
        t0 = time.perf_counter()
        self.rx["raw"]._pg.broadcast(self.raw_buf, 0).wait()
        return time.perf_counter() - t0


class _ProcessActor:
    """A minimal actor in a spawned process (``--runner processes``): calls run one at a time, in order."""

    def __init__(self, cls: type, kwargs: dict):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, cls, kwargs), daemon=True)
        self.proc.start()

    def call(self, method: str, *args):
        self.conn.send((method, args))
        return self

    def get(self):
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(value)
        return value

    def stop(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


def _serve(conn, cls: type, kwargs: dict) -> None:
    obj = cls(**kwargs)
    while (msg := conn.recv()) is not None:
        try:
            conn.send((True, getattr(obj, msg[0])(*msg[1])))
        except Exception as e:
            conn.send((False, repr(e)))


class _RayActor:
    def __init__(self, cls: type, kwargs: dict):
        self.handle = ray.remote(cls).options(num_cpus=0.5).remote(**kwargs)

    def call(self, method: str, *args) -> ray.ObjectRef:
        return getattr(self.handle, method).remote(*args)

    def stop(self) -> None:
        ray.kill(self.handle)


def get_all(pending: list) -> list:
    return ray.get(pending) if isinstance(pending[0], ray.ObjectRef) else [p.get() for p in pending]


def bench_adapter(
    name: str, shapes: dict[str, tuple[int, ...]], args: argparse.Namespace
) -> dict[str, float]:
    actor = _RayActor if args.runner == "ray" else _ProcessActor
    sender = actor(BenchSender, dict(shapes=shapes, bucket_mib=args.bucket_mib, timeout_s=args.timeout_s))
    receivers = [actor(BenchReceiver, dict(timeout_s=args.timeout_s)) for _ in range(args.receivers)]
    transports = ("gloo", "object_store") if args.runner == "ray" else ("gloo",)
    for transport in (*transports, "raw"):
        endpoint = get_all([sender.call("open", transport, len(receivers))])[0]
        get_all([r.call("join", transport, endpoint, i + 1) for i, r in enumerate(receivers)])
    nbytes = sum(int(torch.Size(s).numel()) * 4 for s in shapes.values())
    times: dict[str, list[float]] = {"ours": [], "ours_in_recv": [], "raw": [], "raw_in_bcast": []}
    times.update({"object_store": []} if "object_store" in transports else {})
    for it in range(args.warmup + args.repeats):
        record = it >= args.warmup
        for transport in transports:
            key = "ours" if transport == "gloo" else transport
            t0 = time.perf_counter()
            ticket = sender.call("send", transport, it)
            if args.runner == "processes":
                ticket = ticket.get()
            # with Ray the receivers get the ticket's ObjectRef: Ray starts them as soon as send returned
            in_recv = get_all([r.call("recv", ticket) for r in receivers])
            elapsed = time.perf_counter() - t0  # the receivers hold the weights: the sync is done
            get_all([sender.call("wait", transport)])  # surfaces sender-side errors; already complete
            if record:
                times[key].append(elapsed)
                if key == "ours":
                    times["ours_in_recv"].append(max(in_recv))
        t0 = time.perf_counter()
        raw = get_all(
            [sender.call("raw_broadcast", nbytes)] + [r.call("raw_broadcast", nbytes) for r in receivers]
        )
        if record:
            times["raw"].append(time.perf_counter() - t0)
            times["raw_in_bcast"].append(max(raw))
    for a in [sender, *receivers]:
        a.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tensors = len(shapes)
    print(
        f"\n== {name}: {n_tensors} tensors, {nbytes / 2**20:.2f} MiB fp32, {args.receivers} receivers, "
        f"bucket {args.bucket_mib} MiB, median of {args.repeats} =="
    )
    for k, label in [
        ("ours", "ours (gloo, end to end)"),
        ("ours_in_recv", "ours (gloo, inside recv)"),
        ("object_store", "object_store (end to end)"),
        ("raw", "raw broadcast (end to end)"),
        ("raw_in_bcast", "raw broadcast (inside)"),
    ]:
        if k not in med:  # object_store needs --runner ray
            continue
        print(f"  {label:30s} {med[k] * 1e3:9.2f} ms  {nbytes / med[k] / 2**30:7.3f} GiB/s")
    print(f"  bandwidth ours ÷ raw (end to end)      {med['raw'] / med['ours']:.2f}   (goal ≥ 0.5)")
    print(f"  bandwidth ours ÷ raw (transfer inside) {med['raw_in_bcast'] / med['ours_in_recv']:.2f}")
    if args.learner_step_s:
        ratio = med["ours"] / args.learner_step_s
        print(f"  sync ÷ learner step ({args.learner_step_s} s)     {ratio:.2%}  (goal ≤ 5 %)")
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--receivers", type=int, default=2, help="sampler actors receiving the weights")
    p.add_argument("--bucket-mib", type=float, default=64.0, help="sync.bucket_mib")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument(
        "--learner-step-s", type=float, default=0.0, help="a measured learner step time, for the ratio"
    )
    p.add_argument("--only", choices=["shapeworld", "sd35m"], default=None)
    p.add_argument(
        "--runner",
        choices=["ray", "processes"],
        default="ray",
        help="ray: actors on a private local Ray cluster; processes: spawned processes (no object store)",
    )
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="rtr-bws-", dir="/tmp")
    if args.runner == "ray":
        ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=True)
    try:
        if args.only in (None, "shapeworld"):
            bench_adapter("ShapeWorld LoRA (rank 16, 4 blocks, hidden 128)", shapeworld_lora_shapes(), args)
        if args.only in (None, "sd35m"):
            bench_adapter(
                "SD3.5-M-sized LoRA (rank 32, 24 blocks x 8 proj, hidden 1536)", sd35m_lora_shapes(), args
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
