"""The replay mirror's writer in a process of its own, so that it never holds the learner's GIL.

The queue runs inside the learner. A writer thread there (`ReplayMirror` in-process) packs
Redis commands in Python, and while it does, the queue's and the trainer's threads wait for the
GIL (up to the 5 ms switch interval each time). `MirrorProcess` is the QueueObserver the learner
uses instead: on the queue's thread it builds the same records (`group_record`, with the array
budget) and pushes each over a ZeroMQ ipc socket without blocking; `python -m
asyncrl.replay.process` runs a `ReplayMirror` that writes them.

- Bounded: the socket between the two (SNDHWM here, RCVHWM in the writer) holds about `buffer`
  records and `buffer_bytes` bytes, in messages of up to BATCH_RECORDS records or BATCH_BYTES;
  beyond, a record is lost and counted here. The writer writes each message as it takes it.
- Accounting: the writer reports its counters every 0.2 s and at close. At close, whatever was
  sent and never written is lost (a writer that died took some with it), so
  `written + lost` equals the records offered.
- A writer that dies is started again (after `restart_backoff_s`); the records still queued in
  the socket go to the new one. A writer whose learner died (SIGKILL) writes what it holds and exits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional

import msgpack
import zmq

from asyncrl.replay.mirror import ArrayBudget, MirrorObserver, ReplayMirror, settings_from_config

log = logging.getLogger("asyncrl.replay")

REPORT_EVERY_S = 0.2
BATCH_RECORDS = 64
BATCH_BYTES = 1 << 20
"""A message goes once it holds this many bytes (so a large group's ~1 MiB of arrays goes nearly alone):
the socket's bound counts messages, so small messages let it hold `buffer` header-only records."""


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class MirrorProcess(MirrorObserver):
    """QueueObserver forwarding records to a writer process; same counters as `ReplayMirror.stats()`."""

    def __init__(self, url: str, run: str, *, learner_version: Callable[[], int] = lambda: 0,
                 array_bytes_per_s: Optional[float] = None, buffer: int = 1024, restart_backoff_s: float = 1.0,
                 start_timeout_s: float = 30.0, **writer_settings):
        self.run = run
        self.buffer = buffer
        self.restart_backoff_s = restart_backoff_s
        self.budget = ArrayBudget(array_bytes_per_s)
        self._learner_version = learner_version
        self._dir = tempfile.mkdtemp(prefix="asyncrl-mirror-")  # 0700: only this user can connect
        ctx = zmq.Context.instance()
        self._out = ctx.socket(zmq.PUSH)
        # Messages of up to BATCH_RECORDS records or BATCH_BYTES: half of the bound on each side.
        buffer_bytes = writer_settings.get("buffer_bytes", 256 << 20)
        hwm = max(1, min(buffer // BATCH_RECORDS, buffer_bytes // BATCH_BYTES) // 2)
        self._out.setsockopt(zmq.SNDHWM, hwm)
        self._out.setsockopt(zmq.LINGER, 0)
        # Connecting (the writer binds) makes ZeroMQ queue records while no writer is there, so
        # the ones offered while a dead writer is replaced wait for the new one.
        self._out.connect(f"ipc://{self._dir}/records")
        self._in = ctx.socket(zmq.PULL)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(f"ipc://{self._dir}/reports")
        self._spec = {"url": url, "run": run, "buffer": buffer, "hwm": hwm, "parent": os.getpid(),
                      "records": f"ipc://{self._dir}/records", "reports": f"ipc://{self._dir}/reports",
                      "settings": writer_settings}
        self.sent = 0
        self.lost_socket_full = 0
        self.restarts = 0
        self._finished: dict = {"written": 0, "lost": 0}  # counters of writers that are gone
        self._report: dict = {}
        self._proc: Optional[subprocess.Popen] = None
        self._next_check = 0.0
        self._closed: Optional[dict] = None
        self._closing = False
        self._accepting = True
        self._lock = threading.Lock()
        """Guards the batch and the records socket: the queue's thread offers, others may flush."""
        self._control = threading.RLock()
        """Guards the reports socket and the writer's restart: the queue's tick and stats() may race."""
        self._heads: list = []
        self._frames: list = []
        self._pending_bytes = 0
        self._start()
        self._wait_started(start_timeout_s)

    @classmethod
    def from_config(cls, cfg, learner_version: Callable[[], int] = lambda: 0) -> "MirrorProcess":
        return cls(**settings_from_config(cfg), learner_version=learner_version)

    def _start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "asyncrl.replay.process"], stdin=subprocess.PIPE, env=env)
        self._proc.stdin.write(json.dumps(self._spec).encode())
        self._proc.stdin.close()
        self._report = {}

    def _wait_started(self, timeout_s: float) -> None:
        """Block until the writer's first report (it is then connected), so no early record waits on a start."""
        if not self._in.poll(int(timeout_s * 1000)):
            code = self._proc.poll()
            raise RuntimeError(f"the replay mirror's writer did not start within {timeout_s} s"
                               + (f" (it exited with {code}; its error is above)" if code is not None else ""))
        self._drain_reports()

    # -- on the queue's thread ----------------------------------------------------------------

    def offer(self, record: tuple, nbytes: int) -> None:
        kind, gid, reason, payload, learner_version, ts, version, max_version = record
        if kind == "reject":
            head, frames = [kind, gid, reason, learner_version, ts, 0, 0, payload, 0], ()
        elif len(payload) == 1:  # the group's header only: inline
            head, frames = [kind, gid, reason, learner_version, ts, version, max_version, bytes(payload[0]), 0], ()
        else:
            # Arena views were copied by group_record (stable_frames); other frames are immutable.
            head, frames = [kind, gid, reason, learner_version, ts, version, max_version, None, len(payload)], payload
        with self._lock:
            if not self._accepting:
                self.lost_socket_full += 1
                return
            self._heads.append(head)
            self._frames.extend(frames)
            self._pending_bytes += nbytes
            if len(self._heads) >= BATCH_RECORDS or self._pending_bytes >= BATCH_BYTES:
                self._send()

    def tick(self, now: float) -> None:
        """From the queue's loop (every 50 ms or so): send what is batched; restart a dead writer."""
        with self._lock:
            if self._heads:
                self._send()
        if now >= self._next_check:
            self._next_check = now + self.restart_backoff_s
            self._check_writer()

    def _send(self) -> None:
        """One message for the batched records (holding the lock): a send per record would cost the
        queue's thread more than building the records."""
        count = len(self._heads)
        try:
            self._out.send_multipart([_pack(self._heads), *self._frames], zmq.NOBLOCK, copy=False)
            self.sent += count
        except zmq.Again:
            self.lost_socket_full += count
        self._heads, self._frames, self._pending_bytes = [], [], 0

    def _check_writer(self) -> None:
        with self._control:
            if self._closing or self._proc is None or self._proc.poll() is None:
                return
            log.error("replay mirror: the writer process exited with %s; starting another (records still queued go to it)",
                      self._proc.returncode)
            self._drain_reports()
            self._retire_report()
            self.restarts += 1
            self._start()

    def _retire_report(self) -> None:
        for key in ("written", "lost"):
            self._finished[key] += self._report.get(key, 0)
        self._report = {}

    def _drain_reports(self) -> None:
        with self._control:
            while True:
                try:
                    self._report = msgpack.unpackb(self._in.recv(zmq.NOBLOCK), raw=False)
                except zmq.Again:
                    return

    # -- reporting and shutdown ----------------------------------------------------------------

    def stats(self) -> dict:
        if self._closed is not None:
            return dict(self._closed)
        self._check_writer()
        self._drain_reports()
        report = self._report
        written = self._finished["written"] + report.get("written", 0)
        lost = self.lost_socket_full + self._finished["lost"] + report.get("lost", 0)
        return {
            "written": written,
            "lost": lost,
            "lost_socket_full": self.lost_socket_full,
            "lost_buffer_full": report.get("lost_buffer_full", 0),
            "lost_redis": report.get("lost_redis", 0),
            "arrays_skipped": self.budget.skipped,
            "buffered": max(0, self.sent - written - (lost - self.lost_socket_full)),
            "connected": bool(report.get("connected", False)),
            "last_error": report.get("last_error", ""),
            "writer_restarts": self.restarts,
        }

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the writer has written or lost everything sent; False on timeout."""
        with self._lock:
            if self._heads:
                self._send()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._drain_reports()
            done = self._finished["written"] + self._finished["lost"] + self._report.get("written", 0) + self._report.get("lost", 0)
            if done >= self.sent:
                return True
            time.sleep(0.02)  # not a poll on the reports socket: the queue's thread may be reading it
        return False

    def close(self, timeout_s: float = 5.0) -> dict:
        """Let the writer write what it holds within `timeout_s`, stop it; returns the final stats()."""
        if self._closed is not None:
            return dict(self._closed)
        self._closing = True  # no writer is started again from here on
        with self._lock:
            if self._heads:
                self._send()
            self._accepting = False  # later records count as lost
        deadline = time.monotonic() + timeout_s
        if self._proc.poll() is None:
            try:
                self._out.send(_pack({"close": self.lost_socket_full}), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the socket is full: the writer is stuck; it is killed below
            try:
                self._proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        time.sleep(0.01)
        self._drain_reports()
        stats = self.stats()
        self._retire_report()
        # Sent and never written: lost, whether a writer died with it or it never left the socket.
        stats["lost"] = self.lost_socket_full + (self.sent - self._finished["written"])
        stats["written"] = self._finished["written"]
        stats["buffered"] = 0
        self._closed = stats
        self._out.close(0)
        self._in.close(0)
        shutil.rmtree(self._dir, ignore_errors=True)
        if stats["lost"]:
            log.warning("replay mirror of run %r lost %d records (%s)", self.run, stats["lost"], stats)
        return dict(stats)


# -- the writer process ------------------------------------------------------------------------


def _records(heads: list, frames: list) -> Iterator[tuple]:
    """The records of one message: each batched head with a reject's detail or a group's header
    frame inline, or the count of the group's frames that follow in the message."""
    at = 0
    for kind, gid, reason, learner_version, ts, version, max_version, last, count in heads:
        if kind == "reject":
            yield ("reject", "", reason, last, learner_version, ts, 0, 0)
            continue
        payload = [last] if count == 0 else frames[at : at + count]
        at += count
        yield (kind, gid, reason, payload, learner_version, ts, version, max_version)


def serve(spec: dict) -> None:
    """Write the records arriving at spec['records'] until told to close or the parent is gone."""
    ctx = zmq.Context.instance()
    records = ctx.socket(zmq.PULL)
    records.setsockopt(zmq.RCVHWM, spec["hwm"])
    records.bind(spec["records"])
    reports = ctx.socket(zmq.PUSH)
    reports.setsockopt(zmq.LINGER, 2000)
    reports.connect(spec["reports"])
    mirror = ReplayMirror(spec["url"], spec["run"], buffer=spec["buffer"], background=False, **spec["settings"])
    received, last_report, orphaned = 0, 0.0, False

    def report(**extra) -> None:
        reports.send(_pack({**mirror.stats(), "received": received, **extra}))

    report()
    while True:
        if records.poll(int(REPORT_EVERY_S * 1000)):
            frames = records.recv_multipart()
            heads = msgpack.unpackb(frames[0], raw=False)
            if isinstance(heads, dict):  # {"close": records lost before reaching this process}
                mirror.lost_upstream = heads["close"]  # persisted with the run's count
                break
            batch = list(_records(heads, frames[1:]))
            received += len(batch)
            mirror.write(batch)  # the parent batched them: written at once, no second buffer here
        if os.getppid() != spec["parent"]:
            log.warning("replay mirror: the learner is gone; writing what is buffered and stopping")
            orphaned = True
            break
        now = time.monotonic()
        if now - last_report >= REPORT_EVERY_S:
            last_report = now
            report()
    stats = mirror.close(timeout_s=3.0)
    reports.send(_pack({**stats, "received": received, "final": True}))
    reports.close()
    records.close(0)
    if orphaned:  # nobody else will remove the learner's socket directory
        shutil.rmtree(os.path.dirname(spec["records"].removeprefix("ipc://")), ignore_errors=True)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the learner closes us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s replay-writer %(message)s")
    # The mirror is best-effort: it takes only CPU time the learner leaves (a writer that falls
    # behind fills its bounded buffers, and what they cannot take is counted as lost).
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError) as exc:  # not Linux, or a sandbox that forbids it: the lowest nice instead
        log.info("replay mirror: SCHED_IDLE unavailable (%s); running at nice 19", exc)
        os.nice(19)
    serve(json.loads(sys.stdin.read()))


if __name__ == "__main__":
    main()
