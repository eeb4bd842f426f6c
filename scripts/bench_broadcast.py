"""Benchmark: deliver one weight version of a ~0.5 B-parameter model (bf16, ~1 GB) to local engines.

Tensors of Qwen2-0.5B's shapes stand in for the model (no real model needed). For 1, 2 and 4
engines, each a separate process holding its own bf16 parameters, it measures:

- asyncrl ``zmq``: manifest + streamed buckets over loopback, every bucket checksummed, then the
  swap (copy into the engine's parameters);
- asyncrl ``shm``: the learner keeps the version in one /dev/shm file; engines map, verify, swap;
- asyncrl ``ipc``: the learner also keeps the version as one tensor per bucket on its device
  (``--device``: a torch shared-memory file on CPU, GPU memory opened by CUDA IPC on a GPU);
  engines open each through torch's cross-process handle, copy, check, swap;
- raw ZeroMQ: the same bytes in the same frames, no manifest, no checksums, no swap;
- torch.distributed gloo: the same bytes broadcast bucket by bucket from rank 0.

`delivery_s` is from the moment all engines ask to the moment the last one runs the version;
`transfer_s` / `swap_s` split one engine's time into receiving+verifying and the copy during which
it cannot generate. Run with the loopback interface only; peak memory is about
(2 + 2 x engines) x model size, since each engine holds parameters and one received copy.

    .venv/bin/python scripts/bench_broadcast.py --json runs/bench_broadcast.json
    .venv/bin/python scripts/bench_broadcast.py --json runs/bench_broadcast_cuda.json --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUCKET = 64 << 20


def qwen2_05b_shapes(layers: int = 24) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter, heads, kv, head_dim, vocab = 896, 4864, 14, 2, 64, 151936
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)), (p + "self_attn.q_proj.bias", (heads * head_dim,)),
            (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)), (p + "self_attn.k_proj.bias", (kv * head_dim,)),
            (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)), (p + "self_attn.v_proj.bias", (kv * head_dim,)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return shapes + [("model.norm.weight", (hidden,))]


def make_state(shapes) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16) for name, shape in shapes}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- engine processes ---------------------------------------------------------------------------


def asyncrl_engine(index, address, transport, shapes, device, ready, go, results) -> None:
    torch.set_num_threads(1)
    from asyncrl.weights.codec import tensors_from_buckets
    from asyncrl.weights.receiver import WeightReceiver

    params = {name: torch.empty(shape, dtype=torch.bfloat16, device=device) for name, shape in shapes}
    for t in params.values():
        t.zero_()  # touch the pages now, as a loaded engine would have them
    receiver = WeightReceiver(address, f"e{index}", timeout_s=300, transport=transport)
    ready.release()
    go.wait()
    start = time.time()
    t0 = time.perf_counter()
    fetched = receiver.fetch(-1)
    t1 = time.perf_counter()
    if fetched is None:
        results.put({"error": f"engine {index} got nothing"})
        return
    manifest, buffers = fetched
    if manifest.get("transport") != transport:  # a fallback would put another transport's time in this row
        results.put({"error": f"engine {index} asked for {transport}, the learner sent {manifest.get('transport')}"})
        return
    with torch.no_grad():
        for name, tensor in tensors_from_buckets(manifest, buffers).items():
            params[name].copy_(tensor)
    if device != "cpu":
        torch.cuda.synchronize()  # the swap is done when the copies are
    t2 = time.perf_counter()
    end = time.time()
    receiver.ack(manifest["version"])
    receiver.close()
    results.put({"start": start, "end": end, "transfer_s": t1 - t0, "swap_s": t2 - t1})


def raw_zmq_engine(index, address, ready, go, results) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    ready.release()
    go.wait()
    start = time.time()
    sock.send(b"go")
    count = int(sock.recv())
    received = [sock.recv(copy=False) for _ in range(count)]
    end = time.time()
    results.put({"start": start, "end": end, "bytes": sum(len(f.buffer) for f in received)})


def gloo_engine(init, rank, world, sizes, ready, go, results) -> None:
    torch.set_num_threads(1)
    from asyncrl.weights.transport import broadcast, open_group

    group = open_group(init, rank, world, "gloo", timeout_s=300)
    buffers = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    ready.release()
    go.wait()
    start = time.time()
    for buf in buffers:
        broadcast(group, buf)
    results.put({"start": start, "end": time.time()})


# --- scenarios -------------------------------------------------------------------------------------


def collect(procs, results, n) -> list[dict]:
    out = [results.get(timeout=600) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    errors = [r["error"] for r in out if "error" in r]
    if errors:
        raise RuntimeError("; ".join(errors))
    return out


def summarise(rows: list[dict]) -> dict:
    summary = {"delivery_s": max(r["end"] for r in rows) - min(r["start"] for r in rows)}
    for key in ("transfer_s", "swap_s"):
        if key in rows[0]:
            summary[key] = statistics.mean(r[key] for r in rows)
    return summary


def run_asyncrl(ctx, state, shapes, engines, transport, shm_dir, device) -> dict:
    from asyncrl.weights.broadcaster import WeightBroadcaster

    broadcaster = WeightBroadcaster(f"tcp://127.0.0.1:{free_port()}", bucket_bytes=BUCKET,
                                    shm_dir=shm_dir if transport == "shm" else None, ipc=transport == "ipc")
    publish_s = broadcaster.publish(state.items(), 1)
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=asyncrl_engine, args=(i, broadcaster.address, transport, shapes, device, ready, go, results))
             for i in range(engines)]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        go.set()
        rows = collect(procs, results, engines)
        assert broadcaster.engine_versions == {f"e{i}": 1 for i in range(engines)}, broadcaster.engine_versions
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        broadcaster.close()
    return {**summarise(rows), "publish_s": publish_s}


def run_raw_zmq(ctx, frames, engines) -> dict:
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    address = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(address)
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=raw_zmq_engine, args=(i, address, ready, go, results)) for i in range(engines)]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        go.set()
        for _ in range(engines):
            identity, _ = sock.recv_multipart()
            sock.send_multipart([identity, str(len(frames)).encode()])
            for frame in frames:
                sock.send_multipart([identity, frame], copy=False)
        rows = collect(procs, results, engines)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        sock.close(0)
    return summarise(rows)


def run_gloo(ctx, frames, engines) -> dict:
    from asyncrl.weights.transport import broadcast, open_group

    init, world = f"tcp://127.0.0.1:{free_port()}", engines + 1
    sizes = [len(f) for f in frames]
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=gloo_engine, args=(init, r, world, sizes, ready, go, results)) for r in range(1, world)]
    try:
        for p in procs:
            p.start()
        group = open_group(init, 0, world, "gloo", timeout_s=300)
        tensors = [torch.frombuffer(f, dtype=torch.uint8) for f in frames]
        for _ in procs:
            ready.acquire()
        go.set()
        for tensor in tensors:
            broadcast(group, tensor)
        rows = collect(procs, results, engines)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return summarise(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--engines", default="1,2,4", help="engine counts, comma-separated")
    parser.add_argument("--layers", type=int, default=24, help="transformer layers (24 is Qwen2-0.5B)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest is reported")
    parser.add_argument("--shm-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    parser.add_argument("--device", default="cpu", help="where the learner's tensors and the engines' parameters live "
                        "(cuda:0: the asyncrl rows then include the copy to the GPU; ipc is CUDA IPC)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    shapes = qwen2_05b_shapes(args.layers)
    state = {name: t.to(args.device) for name, t in make_state(shapes).items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    params = sum(t.numel() for t in state.values())
    from asyncrl.weights.codec import iter_buckets

    frames = [b.data for b in iter_buckets(state.items(), BUCKET)]
    print(f"{params / 1e9:.3f} B parameters, {nbytes / 2**30:.3f} GiB in {len(frames)} buckets of <= {BUCKET >> 20} MiB", flush=True)

    def best(fn, *a) -> dict:
        runs = [fn(*a) for _ in range(args.repeats)]
        return min(runs, key=lambda r: r["delivery_s"])

    results = {"params": params, "bytes": nbytes, "bucket_bytes": BUCKET, "repeats": args.repeats, "cpus": os.cpu_count(),
               "device": args.device, "runs": {}}
    for engines in [int(e) for e in args.engines.split(",")]:
        row = {
            "raw_zmq": best(run_raw_zmq, ctx, frames, engines),
            "gloo": best(run_gloo, ctx, frames, engines),
            "asyncrl_zmq": best(run_asyncrl, ctx, state, shapes, engines, "zmq", args.shm_dir, args.device),
            "asyncrl_shm": best(run_asyncrl, ctx, state, shapes, engines, "shm", args.shm_dir, args.device),
            "asyncrl_ipc": best(run_asyncrl, ctx, state, shapes, engines, "ipc", args.shm_dir, args.device),
        }
        for key in ("asyncrl_zmq", "asyncrl_shm", "asyncrl_ipc", "gloo"):
            row[key]["vs_raw_zmq"] = row[key]["delivery_s"] / row["raw_zmq"]["delivery_s"]
        results["runs"][str(engines)] = row
        print(f"{engines} engine(s): " + ", ".join(f"{k} {v['delivery_s']:.2f} s" for k, v in row.items())
              + f"; zmq swap {row['asyncrl_zmq']['swap_s']:.2f} s of transfer {row['asyncrl_zmq']['transfer_s']:.2f} s",
              flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
