"""Free loopback ports for the sockets of a run that `asyncrl sweep`, the tests and the scripts start.

A port the kernel hands out for bind(0) comes from the ephemeral range, the same range every
outgoing connection's source port comes from; between picking it and the child process binding it,
one of the run's own connections can take it ("Address already in use"). Ports are therefore drawn
below that range and checked free by binding. Must never start or stop anything.
"""

from __future__ import annotations

import random
import socket

_LOWEST = 20000


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere the check by binding below still holds


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that is free now and outside the ephemeral range where possible."""
    high = _ephemeral_start() - 1
    for _ in range(200):
        port = random.randint(_LOWEST, high) if high > _LOWEST else 0
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host} between {_LOWEST} and {high} after 200 tries")
