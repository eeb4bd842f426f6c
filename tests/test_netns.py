"""Several hosts on one machine: network namespaces joined by veth pairs on a bridge, with the queue
and the learner on one host and rollout servers on others; links are cut and slowed with `ip link`
and `tc`. See docs/faults.md.

Layout: a switch namespace holds the bridge; each host namespace has one `eth0` with a 10.77.0.x
address, whose peer is a port of the bridge. Traffic stays between these namespaces: the machine's
own namespace gets no address and no route. Skipped, with the reason, where namespaces cannot be
made (not root, no iproute2, no namespace support), or traffic cannot be shaped (tc, htb).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_faults import assert_each_group_trained_once, steps_done

SUBNET = "10.77.0"
QUEUE_HOST = f"{SUBNET}.1"
WEIGHTS_PORT = 5556


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def _ip(*args: str) -> None:
    _run("ip", *args)


class Hosts:
    """Namespaces named `<tag>-<host>` on one bridge; `run` starts an asyncrl command on a host."""

    def __init__(self, tag: str, logs: Path):
        self.tag = tag
        self.logs = logs
        self.switch = f"{tag}-sw"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def add(self, host: str, address: str) -> None:
        ns = self.ns(host)
        self._add_namespace(ns)
        _ip("-n", self.switch, "link", "add", f"p-{host}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", self.switch, "link", "set", f"p-{host}", "master", "br0", "up")

    def cut(self, host: str) -> None:
        """Pull the host's cable: its bridge port goes down."""
        _ip("-n", self.switch, "link", "set", f"p-{host}", "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", f"p-{host}", "up")

    def slow_port(self, host: str, port: int, rate: str) -> None:
        """Traffic the host sends from `port` crosses its link at `rate`; everything else at full speed."""
        tc = ["ip", "netns", "exec", self.ns(host), "tc"]
        if shutil.which("tc") is None:
            raise RuntimeError("tc (iproute2) is not installed")
        for args in (  # htb, which kernels here have (prio and netem may be missing): a fast default class, a slow one
            ["qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10"],
            ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit"],
            ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:30", "htb", "rate", rate],
            ["filter", "add", "dev", "eth0", "protocol", "ip", "parent", "1:0", "prio", "1", "u32",
             "match", "ip", "sport", str(port), "0xffff", "flowid", "1:30"],
        ):
            _run(*tc, *args)

    def full_speed(self, host: str) -> None:
        _run("ip", "netns", "exec", self.ns(host), "tc", "qdisc", "del", "dev", "eth0", "root")

    def run(self, host: str, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), sys.executable, "-m", "asyncrl.cli", *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def hosts(tmp_path):
    """A queue host (10.77.0.1) and two rollout hosts (.2, .3); removed, with their processes, afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces")
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        made = Hosts(f"arl{os.getpid() % 100000}", logs)
    except RuntimeError as exc:
        pytest.skip(f"cannot make network namespaces here: {exc}")
    try:
        made.add("q", QUEUE_HOST)
        made.add("r0", f"{SUBNET}.2")
        made.add("r1", f"{SUBNET}.3")
        yield made
    finally:
        made.close()


def overrides(*extra: str) -> list[str]:
    return [
        "--config", "configs/quickstart.yaml",
        f"queue.address=tcp://{QUEUE_HOST}:5555", f"weights.address=tcp://{QUEUE_HOST}:{WEIGHTS_PORT}",
        "learner.groups_per_step=4", "rollout.groups_per_batch=4", "sampling.n=4", "learner.steps=100000",
        # K = 3: steps here take tens of ms, and an engine fetching a version over the network is
        # then always a few behind; K = 1 would keep a second engine waiting for weights throughout.
        "max_staleness=3", "queue.request_timeout_s=3", "queue.ticket_lease_s=3", *extra,
    ]


def queue_stats(hosts: Hosts, *extra: str) -> dict:
    """The queue's counters, asked from the queue host (the test's own namespace cannot reach it)."""
    result = subprocess.run(["ip", "netns", "exec", hosts.ns("q"), sys.executable, "-m", "asyncrl.cli", "queue", "stats",
                             "--json", *overrides(*extra)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def wait_for_step(out: Path, step: int, learner: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while steps_done(out) < step:
        assert learner.poll() is None, f"the learner exited with {learner.returncode}; see its log"
        assert time.monotonic() < deadline, f"training never reached step {step}"
        time.sleep(0.1)


def final_stats(log: Path) -> dict:
    line = [line for line in log.read_text().splitlines() if "final stats" in line][-1]
    return json.loads(line.split("final stats ", 1)[1])


def swaps(log: Path) -> list[int]:
    """Versions the rollout server swapped in, in order."""
    return [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines() if "now on version" in line]


def stop(learner: subprocess.Popen, queue: subprocess.Popen, rollouts: list[subprocess.Popen]) -> None:
    """SIGTERM the learner (checkpoint, then it closes the queue, which stops the rollouts), then the queue."""
    learner.send_signal(signal.SIGTERM)
    assert learner.wait(timeout=60) == 0
    for proc in rollouts:
        assert proc.wait(timeout=60) == 0
    queue.send_signal(signal.SIGTERM)
    assert queue.wait(timeout=30) == 0


def test_training_continues_while_a_rollout_hosts_link_is_cut_and_the_host_rejoins(hosts, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    out.mkdir()
    queue = hosts.run("q", "queue", "queue", "serve", *overrides())
    learner = hosts.run("q", "learner", "learner", "--no-queue", "--out", str(out), *overrides())
    rollouts = [hosts.run(f"r{i}", f"rollout-{i}", "rollout", "--index", str(i), *overrides()) for i in (0, 1)]
    wait_for_step(out, 10, learner, timeout=120)
    hosts.cut("r1")
    cut_at, cut_start = steps_done(out), time.monotonic()
    wait_for_step(out, cut_at + 10, learner)  # on rollout-0's groups alone
    time.sleep(max(0.0, 5.0 - (time.monotonic() - cut_start)))  # longer than one request timeout
    during_cut = queue_stats(hosts)["accepted_by_engine"].get("rollout-1", 0)
    hosts.restore("r1")
    restored_at = steps_done(out)
    deadline = time.monotonic() + 60
    while not [v for v in swaps(logs / "rollout-1.log") if v > restored_at]:
        assert rollouts[1].poll() is None and time.monotonic() < deadline, "rollout-1 never fetched a version after the link came back"
        time.sleep(0.2)
    wait_for_step(out, steps_done(out) + 10, learner)
    stop(learner, queue, rollouts)
    trained = steps_done(out)
    assert_each_group_trained_once(out, trained)
    stats = final_stats(logs / "queue.log")
    assert stats["balanced"] and stats["acknowledged"] == trained * 4
    # The host rejoined: it produced again after the cut (it could put nothing during it).
    assert stats["accepted_by_engine"]["rollout-1"] > during_cut
    warnings = [line for line in (logs / "rollout-1.log").read_text().splitlines() if "WARNING" in line]
    assert any(QUEUE_HOST in line for line in warnings)  # it noticed the silence, and named the peer


def test_a_weight_transfer_cut_midway_leaves_the_engine_on_its_version_until_the_learner_returns(hosts, tmp_path):
    try:  # can this kernel shape traffic (the htb qdisc and the u32 filter)?
        hosts.slow_port("q", WEIGHTS_PORT, "256kbit")
        hosts.full_speed("q")
    except RuntimeError as exc:
        pytest.skip(f"cannot slow a port with tc here: {exc}")
    out, logs = tmp_path / "run", tmp_path / "logs"
    out.mkdir()
    # Small buckets, so that a version (about 300 KB) is many messages, and checkpoints to resume from.
    extra = ("weights.bucket_bytes=16384", "learner.checkpoint_every=5", "queue.lease_s=60")
    queue = hosts.run("q", "queue", "queue", "serve", *overrides(*extra))
    learner = hosts.run("q", "learner", "learner", "--no-queue", "--out", str(out), *overrides(*extra))
    rollout = hosts.run("r0", "rollout-0", "rollout", "--index", "0", *overrides(*extra))
    wait_for_step(out, 8, learner, timeout=120)
    # Weights now leave the learner's host at 256 kbit/s (about 10 s a version); queue traffic is unslowed.
    hosts.slow_port("q", WEIGHTS_PORT, "256kbit")
    time.sleep(2.5)  # the engine, a few versions behind, is now a couple of seconds into one
    rollout_log = logs / "rollout-0.log"
    swapped_before, seen = swaps(rollout_log), len(rollout_log.read_text().splitlines())
    # Killing the learner alone does not cut the transfer: the kernel still delivers what the dead
    # process had handed to its socket. Its link going down for longer than a request timeout does.
    learner.kill()
    learner.wait()
    hosts.cut("r0")
    time.sleep(4.5)
    hosts.restore("r0")
    deadline = time.monotonic() + 30
    while not (failures := [line for line in rollout_log.read_text().splitlines()[seen:] if "staying on version" in line]):
        assert time.monotonic() < deadline, "the engine never gave up the cut transfer"
        time.sleep(0.2)
    assert "no bucket" in failures[0], failures[0]  # cut midway: the manifest and some buckets had arrived
    kept = int(failures[0].split("staying on version ")[1].split()[0])
    cut = int(failures[0].split(" of version ")[1].split()[0])
    assert kept != cut and cut not in swaps(rollout_log)  # the engine runs what it had, never the cut version
    hosts.full_speed("q")
    learner = hosts.run("q", "learner", "learner", "--no-queue", "--resume", "--out", str(out), *overrides(*extra))
    log = (logs / "learner.log").read_text
    deadline = time.monotonic() + 60
    while "resumed from" not in log():
        assert learner.poll() is None and time.monotonic() < deadline, log()[-2000:]
        time.sleep(0.2)
    resumed_at = int(log().split("resumed from")[1].split("at policy version ")[1].split()[0])
    wait_for_step(out, resumed_at + 10, learner)
    # The engine took the returned learner's versions (it may have trained a few on queued groups
    # before the first fetch), and went on with them: it was never left paused.
    after = swaps(rollout_log)[len(swapped_before):]
    assert after and after[-1] > resumed_at
    stop(learner, queue, [rollout])
    assert_each_group_trained_once(out, steps_done(out))
