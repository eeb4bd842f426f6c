"""The learner letting go of ipc versions it no longer keeps, without freeing memory an engine may
still open, and without leaking memory for replies that no engine ever opened.

A discarded version enters `Draining` and leaves it `grace_s` after its last send. Every ipc reply
tells the engine to open nothing after ``open_by`` = send + grace_s / 2 (`ipc.open_buckets` checks
it before each bucket), so once a version leaves, no engine is opening it and any engine that did
has finished copying (one bucket's copy, against grace_s / 2 of margin).

- CPU buckets are shared-memory files. They are kept until the version leaves: unlinking a file
  between an engine's open and its own close makes torch terminate that engine (its unlink fails
  with ENOENT in a destructor).
- CUDA buckets are let go of at once: torch keeps a bucket whose reference counters are not all
  back to zero in its limbo, so an engine can still open and copy it. What waits is the list of
  counters handed out (`IpcVersion.sent`). When the version leaves, a counter still at 1 belongs
  to a reply no engine took (the receiver's timeout dropped it, the engine was cancelled or died,
  it never opened it) and is released here; torch then frees the bucket (`torch.cuda.ipc_collect`).

torch has no API to read a counter's value. `counter_value` reads torch's counter file in
/dev/shm, laid out by torch's RefcountedMapAllocator (a 64-byte header, then int64 counters).
Releasing a counter an engine already gave back would make it -1, which torch reads as a huge
unsigned count: that bucket would never leave limbo. So a counter that cannot be read as 0 or 1
(a torch that changed the layout) is left alone and logged: the old leak, never a wrong free.

Must never import learner or rollout code.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Optional

import torch

from asyncrl.weights.ipc import IpcVersion
from asyncrl.weights.ipc_handles import REF_COUNTER_SLOTS

log = logging.getLogger("asyncrl.weights")

MAP_HEADER_BYTES = 64
"""The header torch's RefcountedMapAllocator puts before the data of a shared-memory file (map_alloc_alignment)."""

GRACE_S = 60.0
"""Default `Draining.grace_s`: engines get 30 s from a send to open it; one bucket's copy takes milliseconds."""


def counter_value(counter: bytes, slot: int, shm: str = "/dev/shm") -> Optional[int]:
    """Counter `slot` of torch's reference-counter file `counter`; None when the file is gone (torch
    removes it once every counter in it is released, so none is left to release); ValueError when
    the file is not laid out as this code expects."""
    path = os.path.join(shm, os.fsdecode(counter).lstrip("/"))
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != MAP_HEADER_BYTES + 8 * REF_COUNTER_SLOTS or not 0 <= slot < REF_COUNTER_SLOTS:
                raise ValueError(f"{path} holds {size} bytes (slot {slot}); torch's reference-counter files held "
                                 f"{MAP_HEADER_BYTES} + 8 x {REF_COUNTER_SLOTS}")
            f.seek(MAP_HEADER_BYTES + 8 * slot)
            return int.from_bytes(f.read(8), "little", signed=True)
    except FileNotFoundError:
        return None


def release_counter(counter: bytes, slot: int) -> None:
    torch.UntypedStorage._release_ipc_counter_cuda(counter, slot)


class Draining:
    """Discarded ipc versions, each kept until `grace_s` after its last send (see the module docstring)."""

    def __init__(self, grace_s: float = GRACE_S, read: Callable[[bytes, int], Optional[int]] = counter_value,
                 release: Callable[[bytes, int], None] = release_counter):
        self.grace_s = grace_s
        self.released = 0
        """Counters released here: replies no engine took."""
        self._read, self._release = read, release
        self._lock = threading.Lock()
        self._versions: list[tuple[float, IpcVersion]] = []
        self._warned = False

    @property
    def open_window_s(self) -> float:
        """How long after a send an engine may open its handles (the reply's ``open_by``)."""
        return self.grace_s / 2

    def add(self, version: IpcVersion, now: float) -> None:
        """Take over a version the learner no longer serves; its CUDA buffers go to torch's limbo now."""
        if version.gpus:
            version.buffers = []
        with self._lock:
            self._versions.append((now, version))

    def sweep(self, now: float) -> None:
        """Settle and drop every version whose grace has passed."""
        with self._lock:
            due = [version for added, version in self._versions if self._due(added, version, now)]
            self._versions = [(added, version) for added, version in self._versions if not self._due(added, version, now)]
        for version in due:
            self._settle(version)
        if any(v.gpus for v in due):
            torch.cuda.ipc_collect()  # frees the buckets whose counters are all back to zero now

    def _due(self, added: float, version: IpcVersion, now: float) -> bool:
        return now >= max(added, version.last_sent + self.grace_s)

    def close(self, now: float) -> None:
        """Settle what is due and drop everything (the learner is shutting down its broadcaster)."""
        self.sweep(now)
        with self._lock:
            self._versions.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)

    def _settle(self, version: IpcVersion) -> None:
        for counter, slot in version.sent:
            try:
                value = self._read(counter, slot)
            except (OSError, ValueError) as exc:
                self._warn(f"cannot read torch's reference counter ({exc})")
                continue
            if value == 1:
                try:
                    self._release(counter, slot)
                except RuntimeError as exc:  # the serving thread must outlive it; the counter stays as it was
                    self._warn(f"cannot release torch's reference counter ({exc})")
                    continue
                self.released += 1
            elif value not in (0, None):
                self._warn(f"torch's reference counter {counter!r}[{slot}] reads {value}, expected 0 or 1")
        version.buffers = []  # CPU: the files go once no engine has them open

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s; leaving such counters alone: a CUDA version whose reply never reached an engine "
                        "stays in the learner's memory until it exits", why)
