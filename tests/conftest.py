"""Shared test helpers: free loopback ports, a queue server on a thread, and the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from asyncrl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def loopback() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def queue_server():
    """A real QueueServer on a loopback port, served by a thread; yields a factory taking settings."""
    from asyncrl.queue.server import QueueServer, QueueSettings

    started = []

    def start(**kwargs) -> "QueueServer":
        settings = QueueSettings(**{"max_staleness": 1, "groups_per_step": 2, **kwargs})
        server = QueueServer(loopback(), settings)
        stop = threading.Event()
        thread = threading.Thread(target=server.serve, args=(stop.is_set, 10), daemon=True)
        thread.start()
        started.append((server, stop, thread))
        return server

    yield start
    for server, stop, thread in started:
        stop.set()
        thread.join(timeout=2)
        server.close()


def run_cli(*args: str, timeout: float = 180, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "asyncrl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def port_overrides() -> list[str]:
    """Overrides that put a run's sockets on fresh loopback ports, so tests never collide."""
    return [f"queue.address={loopback()}", f"weights.address={loopback()}"]
