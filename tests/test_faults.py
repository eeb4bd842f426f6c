"""Faults injected into real `asyncrl` processes: training continues, no group is trained twice, and
every accepted group is accounted for (the queue's final stats balance). See docs/faults.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from asyncrl.learner.checkpoint import checkpoint_dir, latest_checkpoint
from asyncrl.metrics import read_metrics
from conftest import ROOT, port_overrides, run_cli

FAST = [
    "learner.groups_per_step=4", "rollout.groups_per_batch=4", "sampling.n=4",
    "run.restart_backoff_s=0.2", "run.min_uptime_s=0", "queue.request_timeout_s=2",
]


def start_run(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "asyncrl.cli", "run", "configs/quickstart.yaml", "--out", str(out), *FAST, *port_overrides(), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def steps_done(out: Path) -> int:
    records = read_metrics(out / "metrics.jsonl")  # skips a last line still being written
    return records[-1]["step"] if records else 0


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while steps_done(out) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"run never reached step {step}"
        time.sleep(0.1)


def child_pid(supervisor: subprocess.Popen, *words: str) -> int:
    for pid in subprocess.run(["pgrep", "-P", str(supervisor.pid)], capture_output=True, text=True).stdout.split():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if all(w.encode() in cmdline for w in words):
            return int(pid)
    raise AssertionError(f"no child of the supervisor runs {words}")


def lineage(out: Path) -> dict[int, list[str]]:
    """Groups in the final weights: a resumed learner overwrites the versions it redid."""
    entries = {}
    for line in (out / "trained_groups.jsonl").read_text().splitlines():
        entry = json.loads(line)
        entries[entry["version"]] = entry["group_ids"]
    return entries


def assert_each_group_trained_once(out: Path, steps: int) -> None:
    entries = lineage(out)
    assert sorted(entries) == list(range(1, steps + 1))
    ids = [gid for group_ids in entries.values() for gid in group_ids]
    assert len(ids) == len(set(ids)), "a group was trained twice"


def final_queue_stats(out: Path) -> dict:
    lines = [line for line in (out / "logs" / "queue.log").read_text().splitlines() if "final stats" in line]
    return json.loads(lines[-1].split("final stats ", 1)[1])


def restarts(out: Path) -> list[dict]:
    path = out / "supervisor.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_killed_rollout_server_is_restarted_and_training_continues_on_the_others(tmp_path):
    out = tmp_path / "run"
    # K = 3: on a quiet machine steps take ~10 ms on one server's groups, and a restarted engine
    # fetching each new version would stay more than K = 1 behind (waiting for weights) throughout.
    proc = start_run(out, "rollout.num_servers=2", "learner.steps=100000", "max_staleness=3")
    log = out / "logs" / "rollout-1.log"
    try:
        wait_for_step(out, 10, proc)
        os.kill(child_pid(proc, "--index", "1"), signal.SIGKILL)
        killed_at = steps_done(out)
        deadline = time.monotonic() + 90
        while "now on version" not in log.read_text().partition("--- restart 1 ---")[2]:
            assert proc.poll() is None and time.monotonic() < deadline, "rollout-1 never came back"
            time.sleep(0.1)
        wait_for_step(out, steps_done(out) + 20, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "child rollout-1 killed by SIGKILL; restarting it" in stderr
    assert [(e["child"], e["exit"]) for e in restarts(out)] == [("rollout-1", "killed by SIGKILL")]
    trained = steps_done(out)
    assert trained >= killed_at + 20
    assert_each_group_trained_once(out, trained)
    stats = final_queue_stats(out)
    assert stats["balanced"] and stats["acknowledged"] == trained * 4
    # The restarted server fetched the learner's current version, not version 0, and produced again.
    after = log.read_text().split("--- restart 1 ---")[1]
    versions = [int(line.rsplit(" ", 1)[1]) for line in after.splitlines() if "now on version" in line]
    assert versions[0] >= killed_at
    assert int(after.split("stopped after ")[1].split()[0]) > 0


def test_a_killed_learner_is_restarted_from_its_checkpoint_and_trains_no_group_twice(tmp_path):
    out = tmp_path / "run"
    proc = start_run(out, "learner.steps=50", "learner.checkpoint_every=5", "queue.lease_s=60")
    try:
        wait_for_step(out, 11, proc)
        while steps_done(out) % 5 not in (1, 2, 3):  # between checkpoints: it holds unacknowledged leases
            time.sleep(0.02)
        os.kill(child_pid(proc, "learner"), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert [e["child"] for e in restarts(out)] == ["learner"]
    log = (out / "logs" / "learner.log").read_text().split("--- restart 1 ---")[1]
    resumed_at = int(log.split("resumed from")[1].split("at policy version ")[1].split()[0])
    assert resumed_at >= 10 and resumed_at % 5 == 0
    assert_each_group_trained_once(out, 50)
    stats = final_queue_stats(out)
    # What the dead learner held was delivered again at once (lease_s is 60 s, the run far shorter).
    assert stats["balanced"] and stats["redelivered"] > 0


def test_run_resume_continues_a_stopped_run_at_its_checkpoint_version(tmp_path):
    out = tmp_path / "run"
    first = start_run(out, "learner.steps=40", "learner.checkpoint_every=4", "run.max_restarts=0")
    try:
        wait_for_step(out, 9, first)
        os.kill(child_pid(first, "learner"), signal.SIGKILL)
        _, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1 and "child learner killed by SIGKILL unexpectedly" in stderr
    checkpointed = int(latest_checkpoint(checkpoint_dir(out)).name.split("-")[1])
    records_before = len((out / "metrics.jsonl").read_text().splitlines())
    second = start_run(out, "learner.steps=40", "learner.checkpoint_every=4", "--resume")
    _, stderr = second.communicate(timeout=150)
    assert second.returncode == 0, stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[records_before]["step"] == checkpointed + 1
    assert records[-1]["step"] == 40
    assert_each_group_trained_once(out, 40)


def test_sigterm_stops_the_run_with_a_checkpoint_and_exit_code_0(tmp_path):
    out = tmp_path / "run"
    proc = start_run(out, "learner.steps=100000", "learner.checkpoint_every=100000")
    try:
        wait_for_step(out, 5, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    trained = max(lineage(out))
    assert latest_checkpoint(checkpoint_dir(out)).name == f"step-{trained:08d}"
    stats = final_queue_stats(out)
    assert stats["balanced"] and stats["tickets_running"] == 0


def test_a_stopped_queue_is_reported_by_address_within_the_timeout(tmp_path):
    ports = port_overrides()
    base = [sys.executable, "-m", "asyncrl.cli"]
    queue = subprocess.Popen([*base, "queue", "serve", "--config", "configs/quickstart.yaml", *ports], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        queue.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        learner = subprocess.run(
            [*base, "learner", "--no-queue", "--out", str(tmp_path), "--config", "configs/quickstart.yaml", *ports,
             "queue.request_timeout_s=1"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        took = time.monotonic() - start
    finally:
        queue.send_signal(signal.SIGCONT)
        queue.kill()
        queue.wait()
    address = ports[0].split("=", 1)[1]
    assert learner.returncode == 1
    assert f"queue at {address} did not answer 'hello' within 1 s, 4 tries" in learner.stderr
    assert took < 30  # 4 tries of 1 s, plus starting Python and torch on a loaded machine


def test_a_resent_get_whose_reply_was_lost_gets_the_same_lease(queue_server):
    import zmq

    from asyncrl.queue.client import QueueProducer
    from asyncrl.queue.codec import PROTOCOL_VERSION, pack, unpack_header
    from test_codec import make_group

    server = queue_server(groups_per_step=2, vocab_size=32)
    producer = QueueProducer(server.address, "p", timeout_s=5)
    for _ in range(4):
        producer.put(make_group(version=0), ticketed=False)
    leases = []
    for req in (1, 2):  # the same get, sent again as a client does after a timeout
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(server.address)
        sock.send_multipart([pack({"proto": PROTOCOL_VERSION, "op": "get", "req": req, "version": 0, "groups": 2,
                                   "consumer": "learner-0", "token": "t-1"})])
        assert sock.poll(5000)
        leases.append(unpack_header(sock.recv_multipart()[0])["lease"])
        sock.close(0)
    stats = server.snapshot()
    assert leases[0] == leases[1]
    assert stats["leased"] == 2 and stats["depth"] == 2


def settlements(out: Path) -> list[dict]:
    """Each rollout server's exit line: groups handed over, and how they ended as far as it heard."""
    found = []
    for log in sorted((out / "logs").glob("rollout-*.log")):
        for line in log.read_text().splitlines():
            if "stopped after" in line:
                sent = int(line.split("stopped after ")[1].split()[0])
                found.append({"sent": sent, **json.loads(line.split("settlement ", 1)[1])})
    return found


def test_a_restarted_queue_is_rejoined_and_loses_nothing(tmp_path):
    out = tmp_path / "run"
    # K = 3 leaves admission room for ready groups beside a leased batch (at K = 1 the queue may hold none).
    proc = start_run(out, "learner.steps=100000", "queue.capacity_groups=16", "max_staleness=3")
    try:
        wait_for_step(out, 10, proc)
        # Stop the learner a moment, so that the queue holds ready groups when it dies.
        learner = child_pid(proc, "learner")
        for _ in range(10):
            os.kill(learner, signal.SIGSTOP)
            time.sleep(1.0)  # rollouts fill the queue up to the admission bound
            stats = json.loads(run_cli("queue", "stats", "--json", "--config", str(out / "config.yaml")).stdout)
            # Ready, and leased to the stopped learner: all die with the queue. Nothing is held when the
            # learner stopped between an ack and its next get while the engine lagged K versions behind
            # (admission then lets it start nothing): let the learner go on a moment and try again.
            held, ready = stats["depth"] + stats["leased"], stats["depth"]
            if held > 0:
                break
            os.kill(learner, signal.SIGCONT)
            time.sleep(0.3)
        os.kill(child_pid(proc, "queue", "serve"), signal.SIGKILL)
        os.kill(learner, signal.SIGCONT)
        killed_at = steps_done(out)
        wait_for_step(out, killed_at + 20, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    # The learner and the rollout server reconnected by themselves: only the queue was restarted.
    assert [(e["child"], e["exit"]) for e in restarts(out)] == [("queue", "killed by SIGKILL")]
    trained = steps_done(out)
    assert_each_group_trained_once(out, trained)
    stats = final_queue_stats(out)  # the new queue's
    assert stats["balanced"] and stats["acknowledged"] >= 20 * 4
    # The dead queue held `held` groups. The producer still had them: it put the ready ones again, and the
    # leased ones too unless the learner's hello to the new queue had already named them as trained.
    (rollout,) = settlements(out)
    assert held > 0 and rollout["resent"] >= ready
    # Every group handed over ended trained, dropped with a reason, or was still held by the queue when
    # the rollout server stopped (then trained in the learner's last steps or dropped at shutdown).
    outcomes = rollout["outcomes"]
    assert set(outcomes) <= {"trained", "dropped:stale", "dropped:shutdown", "dropped:lost_version"}
    assert rollout["sent"] == sum(outcomes.values()) + rollout["unsettled"]
    # What the producer heard was trained is in the learner's lineage; the learner trained nothing else.
    trained_ids = {gid for ids in lineage(out).values() for gid in ids}
    assert outcomes["trained"] <= len(trained_ids) <= outcomes["trained"] + rollout["unsettled"]
