"""Soak test: the quickstart under `asyncrl run` while rollout servers and the learner are SIGKILLed
at random times; the supervisor restarts them (the learner from its checkpoint).

    .venv/bin/python scripts/soak.py --minutes 4 --json soak.json

At the end the run is stopped with SIGTERM (a graceful stop) and the script reports steps done,
kills, restarts, and from the run's own records:

- duplicated: group ids that occur more than once in the final weights' lineage (for each policy
  version, the last ledger entry in <out>/trained_groups.jsonl: a resumed learner redoes the
  versions after its checkpoint). Must be 0.
- lost: groups the queue settled as trained (acknowledged) that are not in that lineage, plus any
  imbalance in the queue's books (accepted != acknowledged + already_trained + dropped + held). Must be 0.
- dropped: groups the queue dropped, by reason (stale, lost_version, shutdown): accounted, not lost.

The queue process is not killed here: its restart is tested alone (tests/test_faults.py), and with
rollout servers dying at random too, a queue and a producer dying before a group settles would lose
it, a double fault docs/faults.md describes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from asyncrl.metrics import read_metrics
from asyncrl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def child_pid(supervisor: int, name: str) -> int | None:
    words = [b"learner"] if name == "learner" else [b"--index", name.split("-")[1].encode()]
    out = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in cmdline for w in words) and (name != "learner" or b"rollout" not in cmdline):
            return int(pid)
    return None


def steps_done(out: Path) -> int:
    records = read_metrics(out / "metrics.jsonl")  # skips a last line still being written
    return records[-1]["step"] if records else 0


def report(out: Path, kills: list[dict], seconds: float, returncode: int) -> dict:
    lineage: dict[int, list[str]] = {}
    for line in (out / "trained_groups.jsonl").read_text().splitlines():
        entry = json.loads(line)
        lineage[entry["version"]] = entry["group_ids"]
    ids = [gid for group_ids in lineage.values() for gid in group_ids]
    queue_lines = [line for line in (out / "logs" / "queue.log").read_text().splitlines() if "final stats" in line]
    stats = json.loads(queue_lines[-1].split("final stats ", 1)[1])
    held = stats["depth"] + stats["leased"]
    dropped = sum(stats["dropped"].values())
    imbalance = stats["accepted"] - (stats["acknowledged"] + stats.get("already_trained", 0) + dropped + held)
    events = [json.loads(line) for line in (out / "supervisor.jsonl").read_text().splitlines()] if (out / "supervisor.jsonl").exists() else []
    return {
        "seconds": round(seconds, 1),
        "exit_code": returncode,
        "steps": max(lineage) if lineage else 0,
        "versions_missing": sorted(set(range(1, max(lineage, default=0) + 1)) - set(lineage)),
        "kills": kills,
        "restarts": len(events),
        "restarts_by_child": {c: sum(e["child"] == c for e in events) for c in sorted({e["child"] for e in events})},
        "groups_trained": len(set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "lost": max(0, stats["acknowledged"] - len(set(ids))) + abs(imbalance),
        "queue": {k: stats[k] for k in ("accepted", "acknowledged", "redelivered", "duplicates", "dropped", "balanced")},
        "out": str(out),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--json", dest="json_out", required=True, help="Where to write the report.")
    parser.add_argument("--out", default=None, help="Run directory (default: a fresh temporary one).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(8.0, 20.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--learner-share", type=float, default=0.3, help="Share of kills that hit the learner.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="A config override for the run, e.g. queue.shm_min_bytes=0 (repeatable).")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="asyncrl-soak-"))
    cmd = [
        sys.executable, "-m", "asyncrl.cli", "run", "configs/quickstart.yaml", "--out", str(out),
        "rollout.num_servers=2", "learner.steps=1000000", "learner.checkpoint_every=10",
        "run.max_restarts=1000", "run.restart_backoff_s=0.5", "run.restart_backoff_max_s=2", "run.min_uptime_s=0",
        "queue.lease_s=60", "queue.request_timeout_s=5",
        f"queue.address=tcp://127.0.0.1:{free_port()}", f"weights.address=tcp://127.0.0.1:{free_port()}",
        *args.overrides,
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    kills = []
    end = start + args.minutes * 60
    next_kill = time.monotonic() + rng.uniform(*args.kill_every)
    while time.monotonic() < end and proc.poll() is None:
        time.sleep(0.2)
        if time.monotonic() < next_kill:
            continue
        name = "learner" if rng.random() < args.learner_share else f"rollout-{rng.randrange(2)}"
        pid = child_pid(proc.pid, name)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            kills.append({"child": name, "at_s": round(time.monotonic() - start, 1), "step": steps_done(out)})
            print(f"[{time.monotonic() - start:6.1f} s] killed {name} at step {steps_done(out)}", flush=True)
        next_kill = time.monotonic() + rng.uniform(*args.kill_every)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    result = report(out, kills, time.monotonic() - start, proc.returncode)
    if proc.returncode != 0:
        result["stderr_tail"] = stderr[-3000:]
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=2))
    ok = proc.returncode == 0 and result["lost"] == 0 and result["duplicated"] == 0 and not result["versions_missing"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
