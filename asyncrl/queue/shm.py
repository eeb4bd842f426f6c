"""The same-host data path for large groups: producer arenas on a shared-memory file system.

Over sockets a group's bytes cross the loopback twice (producer → queue → learner). When a producer
and a learner run on the queue's host, a large group's four arrays travel instead through an
*arena*: a file the producer creates in the queue's directory (`/dev/shm/asyncrl-queue-<pid>-<instance>`)
and maps once. The producer writes each group's arrays into a free region of its arena and sends
only the group header and the region (`offset`, `sizes`); the queue maps the arena, validates the
arrays in place and holds the region instead of the bytes; a learner that can see the directory
gets the region in its get reply and reads the arrays from its own mapping: the learner in place,
until its step has copied them into tensors and acknowledged the lease (`shm_views`), other
consumers as a copy. Each byte is written once by the producer and read once by the learner (and
once by the queue's checks).

Regions are reused, never freed to the operating system (fresh pages are costly, in a VM very
much so): the queue tells the producer which regions it will not read again in the replies to its
puts and status requests (`freed`), once their groups settled. A producer whose arena is full sends
inline frames, so the arena's size bounds memory and never stalls anything.

Same host is proven, not assumed: the queue's hello offers its directory and a random token
written in it, and a client uses the arena path only if it reads that token there (same machine,
same mount namespace, allowed by the directory's 0700 mode). Must never import torch.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import shutil
import stat
from typing import Optional

import numpy as np

from asyncrl.queue.codec import GROUP_FRAMES, ProtocolError

log = logging.getLogger("asyncrl.queue")

_DIR_PREFIX = "asyncrl-queue-"
_ARENA_NAME = re.compile(r"arena-[A-Za-z0-9_-]{1,100}\.bin")
_ALIGN = 64


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def clean_stale(base: str) -> int:
    """Remove directories left by queues that died without cleaning up; returns how many. Only those
    made in this PID namespace: where /dev/shm is shared between containers, a pid that is dead here
    may be alive there."""
    removed, namespace = 0, _pid_namespace()
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        pid = name[len(_DIR_PREFIX):].split("-", 1)[0]
        try:
            with open(os.path.join(base, name, "namespace")) as f:
                same = f.read() == namespace
        except OSError:
            same = False
        if same and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed += 1
    return removed


def _map(path: str) -> tuple[mmap.mmap, int, int]:
    """A read-only mapping of a whole file, its size and its open descriptor (to see it shrink)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            raise ProtocolError("bad_shm", f"{os.path.basename(path)} is not a non-empty regular file")
        return mmap.mmap(fd, info.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ), info.st_size, fd
    except BaseException:
        os.close(fd)
        raise


def _check_inside(fd: int, size: int, offset: int, sizes: list[int], name: str) -> None:
    """The region lies in the mapping and in the file as it is now: reading past the end of a file
    that shrank since it was mapped would kill the process (SIGBUS) instead of refusing the request."""
    end = offset + sum(sizes)
    if end > min(size, os.fstat(fd).st_size):
        raise ProtocolError("bad_shm", f"region [{offset}, {end}) is outside arena {name!r} of {size} bytes")


def region_sizes(ref, size_limit: int) -> tuple[int, list[int]]:
    """Check one group's region reference from a put or get: (offset, the four array sizes)."""
    if not isinstance(ref, dict):
        raise ProtocolError("bad_shm", f"a region must be a map with 'offset' and 'sizes', got {type(ref).__name__}")
    offset, sizes = ref.get("offset"), ref.get("sizes")
    if (
        type(offset) is not int or offset < 0 or not isinstance(sizes, list) or len(sizes) != GROUP_FRAMES
        or not all(type(s) is int and s >= 0 for s in sizes)
    ):
        raise ProtocolError("bad_shm", f"a region needs a non-negative int 'offset' and {GROUP_FRAMES} non-negative int 'sizes', got {ref!r:.120}")
    if sum(sizes) > size_limit:
        raise ProtocolError("oversized", f"a region of {sum(sizes)} bytes exceeds queue.max_message_bytes={size_limit}")
    return offset, sizes


def split(view: memoryview, offset: int, sizes: list[int]) -> list[memoryview]:
    out, at = [], offset
    for n in sizes:
        out.append(view[at : at + n])
        at += n
    return out


class Arena:
    """A producer's arena as the queue sees it: a read-only mapping and the regions held in it."""

    def __init__(self, name: str, owner: str, view: memoryview, size: int, fd: int):
        self.name = name
        self.owner = owner
        self.view = view
        self.size = size
        self.fd = fd
        self.held: set[int] = set()
        """Offsets of the regions of groups the queue holds (the mapping stays while any is held)."""
        self.freed: list[int] = []
        """Offsets of regions the queue no longer reads, not yet told to the producer."""
        self.retired = False
        """Its producer restarted: the file is unlinked and the mapping dropped once nothing is held
        (a learner may still have to map it for a held group until then)."""


class ShmArea:
    """The queue's directory of producer arenas; see the module docstring."""

    def __init__(self, base: str, instance: str, max_region: int):
        clean_stale(base)
        self.path = os.path.join(base, f"{_DIR_PREFIX}{os.getpid()}-{instance}")
        os.mkdir(self.path, 0o700)
        self.token = secrets.token_hex(16)
        for name, text in (("token", self.token), ("namespace", _pid_namespace())):
            with open(os.open(os.path.join(self.path, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "w") as f:
                f.write(text)
        self.max_region = max_region
        self.arenas: dict[str, Arena] = {}

    def offer(self) -> dict:
        return {"dir": self.path, "token": self.token}

    def arena(self, name, owner: str) -> Arena:
        """The arena named in a put, mapped on first use; it must be a file of this directory."""
        if not isinstance(name, str) or not _ARENA_NAME.fullmatch(name):
            raise ProtocolError("bad_shm", f"field 'arena' must name a file 'arena-<letters, digits, _ or ->.bin', got {name!r:.80}")
        found = self.arenas.get(name)
        if found is not None:
            if found.retired:
                raise ProtocolError("bad_shm", f"arena {name!r} belonged to an earlier producer {found.owner!r}; "
                                    "a producer makes a new arena after each hello")
            return found
        try:
            mapping, size, fd = _map(os.path.join(self.path, name))
        except FileNotFoundError:
            raise ProtocolError("bad_shm", f"no arena {name!r} in {self.path}: create it there (see the queue's hello) "
                                "or send the arrays inline") from None
        except OSError as exc:
            raise ProtocolError("bad_shm", f"arena {name!r} cannot be mapped: {exc}") from None
        arena = self.arenas[name] = Arena(name, owner, memoryview(mapping), size, fd)
        return arena

    def region(self, arena: Arena, ref) -> tuple[int, list[memoryview]]:
        offset, sizes = region_sizes(ref, self.max_region)
        _check_inside(arena.fd, arena.size, offset, sizes, arena.name)
        return offset, split(arena.view, offset, sizes)

    def hold(self, arena: Arena, offset: int) -> None:
        arena.held.add(offset)

    def release(self, name: str, offset: int) -> None:
        """A held group settled: its region may be written again once the producer hears of it."""
        arena = self.arenas.get(name)
        if arena is None:
            return
        arena.held.discard(offset)
        if arena.retired:
            self._close_if_unused(arena)
        else:
            arena.freed.append(offset)

    def unused(self, name: str, offset: int) -> None:
        """A region named in a put that the queue did not keep (a duplicate, a wait)."""
        arena = self.arenas.get(name)
        if arena is not None and not arena.retired:
            arena.freed.append(offset)

    def take_freed(self, name, regions=None) -> list[int]:
        """Offsets the producer may write again, told once. `regions`: offsets the producer believes
        the queue holds (sent in status requests); those the queue does not hold are told again, so
        a `freed` list lost with its reply (a resent request) does not shrink the arena for good."""
        if regions is not None and (not isinstance(regions, list) or len(regions) > 1 << 16
                                    or not all(type(o) is int for o in regions)):
            raise ProtocolError("bad_shm", "field 'regions' must be a list of at most 65,536 integer offsets")
        arena = self.arenas.get(name) if isinstance(name, str) else None
        if arena is None or arena.retired:
            return []
        freed, arena.freed = arena.freed, []
        if regions is not None:
            told = set(freed)
            freed.extend(o for o in regions if o not in arena.held and o not in told)
        return freed

    def retire_owner(self, owner: str) -> None:
        """A producer of this name (re)started: its predecessor's arenas are not written again."""
        for arena in [a for a in self.arenas.values() if a.owner == owner and not a.retired]:
            arena.retired = True
            arena.freed.clear()
            self._close_if_unused(arena)

    def _close_if_unused(self, arena: Arena) -> None:
        if not arena.held and self.arenas.get(arena.name) is arena:
            del self.arenas[arena.name]
            os.close(arena.fd)
            try:
                os.unlink(os.path.join(self.path, arena.name))
            except OSError:
                pass
            # Views still referenced (an entry's frames on their way out) keep the pages until they go.

    def close(self) -> None:
        for arena in self.arenas.values():
            os.close(arena.fd)
        self.arenas.clear()
        shutil.rmtree(self.path, ignore_errors=True)


def reachable(offer) -> Optional[str]:
    """The queue's directory if this process can see it (the token in it matches), else None."""
    if not isinstance(offer, dict) or not isinstance(offer.get("dir"), str) or not isinstance(offer.get("token"), str):
        return None
    try:
        with open(os.path.join(offer["dir"], "token")) as f:
            return offer["dir"] if secrets.compare_digest(f.read(), offer["token"]) else None
    except OSError:
        return None


class ProducerArena:
    """A producer's arena: a file in the queue's directory, mapped read-write, cut into regions.

    First fit over a sorted free list: groups settle roughly in order, so the low regions are
    reused and only as much of the file is ever touched as the groups in flight need."""

    def __init__(self, directory: str, producer: str, size: int):
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", producer)[:40] or "producer"
        self.name = f"arena-{safe}-{secrets.token_hex(6)}.bin"
        self.path = os.path.join(directory, self.name)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.size = size
        self.view = memoryview(self._map)
        self._free: list[list[int]] = [[0, size]]  # [offset, length], sorted, coalesced
        self._used: dict[int, int] = {}
        self.full = 0
        """Groups sent inline because no region was free."""

    def alloc(self, nbytes: int) -> Optional[int]:
        need = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        for block in self._free:
            if block[1] >= need:
                offset = block[0]
                block[0] += need
                block[1] -= need
                if block[1] == 0:
                    self._free.remove(block)
                self._used[offset] = need
                return offset
        self.full += 1
        return None

    def free(self, offset: int) -> None:
        length = self._used.pop(offset, None)
        if length is None:
            return  # told twice (a resent status reply): already free
        free = self._free
        i = 0
        while i < len(free) and free[i][0] < offset:
            i += 1
        free.insert(i, [offset, length])
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i][1] += free.pop(i + 1)[1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == free[i][0]:
            free[i - 1][1] += free.pop(i)[1]

    @property
    def in_use(self) -> int:
        return sum(self._used.values())

    def write(self, parts: list) -> Optional[dict]:
        """Lay one group's four frames (codec.group_parts: a dtype and arrays each) into a free region:
        the region's reference, or None if the arena is full."""
        sizes = [dtype.itemsize * sum(len(a) for a in arrays) for dtype, arrays in parts]
        offset = self.alloc(sum(sizes))
        if offset is None:
            return None
        at = offset
        for (dtype, arrays), n in zip(parts, sizes):
            # One concatenate per frame, straight into the region: no intermediate buffer.
            np.concatenate(arrays, out=np.frombuffer(self.view[at : at + n], dtype=dtype), casting="unsafe")
            at += n
        return {"offset": offset, "sizes": sizes}

    def close(self, unlink: bool = True) -> None:
        self.view.release()
        self._map.close()
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class ArenaReader:
    """A learner's mappings of the arenas named in its get replies (at most `keep`, least recent dropped)."""

    def __init__(self, directory: str, keep: int = 64):
        self.directory = directory
        self.keep = keep
        self._maps: dict[str, tuple[memoryview, int, int]] = {}

    def frames(self, ref, size_limit: int = 1 << 62, copy: bool = True) -> list:
        """One group's four arrays as frames for the decoder: a copy, or with `copy=False` read-only
        views of the arena, valid only until the group's lease is acknowledged (the producer then
        writes the region again)."""
        name = ref.get("arena") if isinstance(ref, dict) else None
        if not isinstance(name, str) or not _ARENA_NAME.fullmatch(name):
            raise ProtocolError("bad_shm", f"a region in a get reply must name an arena, got {ref!r:.120}")
        offset, sizes = region_sizes(ref, size_limit)
        found = self._maps.pop(name, None)
        if found is None:
            mapping, size, fd = _map(os.path.join(self.directory, name))
            found = (memoryview(mapping), size, fd)
            if len(self._maps) >= self.keep:
                os.close(self._maps.pop(next(iter(self._maps)))[2])
        self._maps[name] = found
        view, size, fd = found
        _check_inside(fd, size, offset, sizes, name)
        if not copy:
            return split(view, offset, sizes)
        return split(memoryview(bytearray(view[offset : offset + sum(sizes)])), 0, sizes)

    def close(self) -> None:
        for _, _, fd in self._maps.values():
            os.close(fd)
        self._maps.clear()
