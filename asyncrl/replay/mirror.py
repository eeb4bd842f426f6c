"""The replay mirror: a queue observer that copies every accepted, dropped and rejected group to Redis.

`MirrorObserver` is the queue's side: `on_accept`/`on_drop`/`on_reject` run on the queue's thread
and only build a record (no Redis I/O, no decoding; arrays copied only when they live in a
producer's arena and fit the array budget) and hand it to `offer`. Array bytes are mirrored up to
`array_bytes_per_s`; a group beyond that budget is mirrored without its arrays (its summary,
rewards and lengths are kept, its hash says `arrays: skipped`), so that a queue moving a GB/s
cannot make the mirror cost it more than Redis can take.

`ReplayMirror` is the writer: a bounded buffer and a thread that writes batches (lingering up to
`linger_s` to fill one) with one Lua call each, which also enforces retention (groups and bytes
per run), so nothing grows without bound. When the buffer is full (Redis slow or gone) a record is
lost and counted; when a batch fails after redis-py's own retries, its records are lost and
counted. The counts are in `stats()`, in the log, and in the run's meta hash once Redis answers
again. The learner runs it in a process of its own (process.py), made with background=False:
no thread and no buffer there, the process hands it each batch it receives (`write`); as an
observer in the calling process it serves tools and tests. Must never block the queue or raise
into it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Callable, Optional

import msgpack
import numpy as np
import redis

from asyncrl.replay.script import WRITE_BATCH, group_args, reject_args
from asyncrl.replay.store import RUNS_KEY, ReplayStore, RunKeys, connect, connection_hint, redact

log = logging.getLogger("asyncrl.replay")


def settings_from_config(cfg) -> dict:
    """ReplayMirror's keyword arguments (url and run included) from a whole `asyncrl.config.Config`."""
    rc = cfg.replay
    recorded = cfg.model_dump(mode="json")
    recorded["replay"]["redis_url"] = redact(rc.redis_url)  # anyone who can read the run can read this
    meta = {
        "config": json.dumps(recorded),
        "task": cfg.task.name,
        # Informational only (`show` rebuilds the real one from the config): digit tasks use the
        # built-in character vocabulary, task 'dataset' the model's own tokenizer.
        "tokenizer": cfg.model.path if cfg.task.name == "dataset" else "char",
        "queue": cfg.queue.address,
    }
    budget = None if rc.array_mib_per_s is None else rc.array_mib_per_s * (1 << 20)
    return dict(url=rc.redis_url, run=cfg.run_name, meta=meta, maxlen=rc.maxlen, max_bytes=rc.max_bytes,
                max_runs=rc.max_runs, buffer=rc.buffer, buffer_bytes=rc.buffer_bytes, array_bytes_per_s=budget)


class MirrorObserver:
    """The QueueObserver half of a mirror: turns the queue's decisions into records and hands each
    to `offer` (a buffer in this process, or a writer process). Runs on the queue's thread, so it
    reads no arrays, and copies them only within the array budget."""

    budget: "ArrayBudget"
    _learner_version: Callable[[], int]

    def on_accept(self, entry) -> None:
        self.offer(*group_record("accept", entry, "", self._learner_version(), self.budget))

    def on_drop(self, entry, reason: str) -> None:
        self.offer(*group_record("drop", entry, reason, self._learner_version(), self.budget))

    def on_reject(self, code: str, detail: str) -> None:
        self.offer(("reject", "", code, detail[:1000], self._learner_version(), time.time(), 0, 0), 0)

    def offer(self, record: tuple, nbytes: int) -> None:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        """The queue's periodic call; records are handed on as they come, so nothing to do."""


class ArrayBudget:
    """Array bytes mirrored per second at most (a token bucket holding one second's worth); a group
    beyond it is mirrored without its arrays. None: no limit."""

    def __init__(self, bytes_per_s: Optional[float]):
        self.rate = bytes_per_s
        self._tokens = bytes_per_s or 0.0
        self._last = time.monotonic()
        self.skipped = 0

    def take(self, nbytes: int) -> bool:
        if self.rate is None:
            return True
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens <= 0:  # in debt: a group larger than a second's budget still passes now and then
            self.skipped += 1
            return False
        self._tokens -= nbytes
        return True


def group_record(kind: str, entry, reason: str, learner_version: int, budget: ArrayBudget) -> tuple[tuple, int]:
    """(record, bytes it holds) for an accepted or dropped queue Entry. Arrays living in a producer's
    arena are copied (the region is reused once the group settles); over budget, only the header."""
    newest = entry.newest_version
    if newest is None:  # an Entry built outside the queue's checks
        newest = int(np.frombuffer(entry.arrays[3], dtype="<i4").max())
    frames = entry.stable_frames() if budget.take(sum(len(a) for a in entry.arrays)) else entry.frames[:1]
    record = (kind, entry.group_id, reason, frames, learner_version, time.time(), entry.behaviour_version, newest)
    return record, sum(len(f) for f in frames)


class ReplayMirror(MirrorObserver):
    """QueueObserver writing to Redis from a thread of this process; see the module docstring."""

    def __init__(
        self,
        url: str,
        run: str,
        *,
        meta: Optional[dict] = None,
        maxlen: int = 10000,
        max_bytes: int = 1 << 30,
        max_runs: int = 16,
        buffer: int = 1024,
        buffer_bytes: int = 256 << 20,
        learner_version: Callable[[], int] = lambda: 0,
        array_bytes_per_s: Optional[float] = None,
        batch_records: int = 64,
        batch_bytes: int = 16 << 20,
        linger_s: float = 0.02,
        warn_every_s: float = 30.0,
        background: bool = True,
    ):
        """`background`: write from a thread of this process, fed by `offer` (a QueueObserver here);
        False: no thread and no buffer, the caller hands batches to `write` (the writer process)."""
        self.url = url
        self.run = run
        self.keys = RunKeys(run)
        self.meta = dict(meta or {})
        self.maxlen = maxlen
        self.max_bytes = max_bytes
        self.max_runs = max_runs
        self.buffer = buffer
        self.buffer_bytes = buffer_bytes
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.linger_s = linger_s
        self.warn_every_s = warn_every_s
        self._learner_version = learner_version
        self.budget = ArrayBudget(array_bytes_per_s)
        self._r = connect(url)  # connects lazily: no I/O on the caller's thread
        self._script = self._r.register_script(WRITE_BATCH)
        self._cond = threading.Condition()
        self._buf: deque = deque()
        self._buf_bytes = 0
        self._in_flight = 0
        self._closing = False
        self._abandoned = False
        self._registered = False
        self._failing = False
        self._last_warn = 0.0
        self.written = 0
        self.lost_buffer_full = 0
        self.lost_redis = 0
        self.lost_upstream = 0
        """Lost before they reached this writer (told by the queue's side of a writer process)."""
        self.last_error = ""
        self._thread: Optional[threading.Thread] = None
        if background:
            self._thread = threading.Thread(target=self._loop, name=f"replay-mirror[{run}]", daemon=True)
            self._thread.start()

    @classmethod
    def from_config(cls, cfg, learner_version: Callable[[], int] = lambda: 0) -> "ReplayMirror":
        """The mirror `cfg.replay` describes, recording `cfg` so that `show` can rebuild the tokenizer."""
        return cls(**settings_from_config(cfg), learner_version=learner_version)

    # -- QueueObserver: called on the queue's thread; append and return ------------------------

    def offer(self, record: tuple, nbytes: int) -> None:
        with self._cond:
            if (
                self._closing
                or len(self._buf) >= self.buffer
                or (self._buf and self._buf_bytes + nbytes > self.buffer_bytes)
            ):
                self.lost_buffer_full += 1
                return
            self._buf.append((record, nbytes))
            self._buf_bytes += nbytes
            # The writer waits for the first record, then lingers for a batch: waking it for every
            # record would cost the queue's thread a context switch per group.
            if len(self._buf) == 1 or len(self._buf) >= self.batch_records or self._buf_bytes >= self.batch_bytes:
                self._cond.notify()

    def write(self, batch: list[tuple]) -> bool:
        """Write `batch` (records as `offer` takes them) now, on the caller's thread; counts them
        written, or lost when Redis fails. For a mirror made with background=False."""
        ok = self._write(batch)
        with self._cond:
            if ok:
                self.written += len(batch)
            else:
                self.lost_redis += len(batch)
        return ok

    # -- reporting and shutdown ----------------------------------------------------------------

    @property
    def lost(self) -> int:
        return self.lost_buffer_full + self.lost_redis + self.lost_upstream

    def stats(self) -> dict:
        with self._cond:
            return {
                "written": self.written,
                "lost": self.lost,
                "lost_buffer_full": self.lost_buffer_full,
                "lost_redis": self.lost_redis,
                "arrays_skipped": self.budget.skipped,
                "buffered": len(self._buf) + self._in_flight,
                "buffered_bytes": self._buf_bytes,
                "connected": not self._failing,
                "last_error": self.last_error,
            }

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every buffered record is written or lost; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._buf or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> dict:
        """Write what is buffered within `timeout_s`, count the rest as lost, stop; returns stats()."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is None:
            self._persist_lost()
        else:
            self._thread.join(timeout_s)
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                # Redis hangs: give up on what is left; the daemon thread's batch in flight is lost too.
                self._abandoned = True
                self.lost_redis += len(self._buf) + self._in_flight
                self._buf.clear()
                self._buf_bytes = 0
                self._in_flight = 0
                self._cond.notify_all()
        stats = self.stats()
        if stats["lost"]:
            log.warning("replay mirror of run %r lost %d records (%s)", self.run, stats["lost"], stats)
        self._r.close()
        return stats

    # -- writer thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._closing:
                    self._cond.wait()
                if not self._buf:
                    break
                self._linger()
                batch, size = [], 0
                while self._buf and len(batch) < self.batch_records and (not batch or size < self.batch_bytes):
                    record, nbytes = self._buf.popleft()
                    batch.append(record)
                    size += nbytes
                self._buf_bytes -= size
                self._in_flight = len(batch)
            ok = self._write(batch)
            with self._cond:
                if not self._abandoned:
                    if ok:
                        self.written += len(batch)
                    else:
                        self.lost_redis += len(batch)
                    self._in_flight = 0
                self._cond.notify_all()
                if self._abandoned:
                    return
        self._persist_lost()

    def _linger(self) -> None:
        """Wait up to linger_s for a full batch (holding the condition's lock): a write costs a
        pipeline round trip and a script check whatever it carries, so one per record would cost
        the queue's process far more CPU than the records themselves."""
        deadline = time.monotonic() + self.linger_s
        while not self._closing and len(self._buf) < self.batch_records and self._buf_bytes < self.batch_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _write(self, batch: list) -> bool:
        try:
            if not self._registered:
                self._register()
            keys = self.keys
            records, frames = [], []
            for record in batch:
                if record[0] == "reject":
                    records.append(reject_args(record))
                else:
                    records.append(group_args(record, frames))
            self._script(keys=[keys.meta, keys.by_seq, keys.events, keys.drops, keys.rejects, RUNS_KEY],
                         args=[time.time(), self.lost, self.maxlen, self.max_bytes, keys.group_prefix, self.run,
                               msgpack.packb(records, use_bin_type=False), *frames])
        except (redis.RedisError, OSError) as exc:
            self._registered = False  # a restarted Redis may have lost the run's meta hash
            self._failing = True
            self.last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - self._last_warn > self.warn_every_s:
                self._last_warn = time.monotonic()
                log.warning("replay mirror: Redis at %s failed (%s; %s); %d records lost so far, the queue goes on",
                            redact(self.url), self.last_error, connection_hint(self.url, self.last_error),
                            self.lost + len(batch))
            return False
        if self._failing:
            self._failing = False
            log.info("replay mirror: Redis at %s answers again; %d records were lost", redact(self.url), self.lost)
        return True

    def _register(self) -> None:
        now = time.time()
        pipe = self._r.pipeline(transaction=True)
        pipe.hsetnx(self.keys.meta, "first_ts", now)
        pipe.hset(self.keys.meta, mapping={**self.meta, "run": self.run, "maxlen": self.maxlen,
                                           "max_bytes": self.max_bytes, "last_ts": now})
        pipe.zadd(RUNS_KEY, {self.run: now})
        pipe.execute()
        store = ReplayStore(self._r, self.url)
        for old in [n for n in store.runs()[self.max_runs :] if n != self.run]:
            log.info("replay mirror: deleting run %r, beyond replay.max_runs=%d", old, self.max_runs)
            store.delete_run(old)
        self._registered = True

    def _persist_lost(self) -> None:
        """Best-effort final write of the lost count, so `asyncrl replay runs` shows it."""
        if not self.lost:
            return
        try:
            self._r.hset(self.keys.meta, "lost", self.lost)
        except (redis.RedisError, OSError):
            pass  # Redis is gone; the count is in stats() and the log
