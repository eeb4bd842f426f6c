"""CurveZMQ keys and authentication for the queue and weights sockets (architecture contract 8).

Three roles hold a key pair each, made by `asyncrl keys DIR` (zmq.auth.create_certificates):

- ``queue``: the transfer queue's server key. Producers and consumers pin its public key, so they
  talk only to the real queue.
- ``learner``: the learner's key. It is the weights socket's server key, and every engine pins
  it: only a holder of the learner's secret key can serve (publish) weights. The learner also
  uses it as its client key towards the queue.
- ``rollout``: the client key of rollout servers, towards the queue and the weights socket.

``DIR/authorized/`` holds the public keys a server lets in (learner and rollout by default; add
one file per extra host key). The file's name is the peer's user id: on the queue, keys named
``learner*.key`` may consume (get, ack, version, close, a consumer's hello) and every other key
may only produce (ticket, put, release); see `may`. A server's ZAP handler (pyzmq's ThreadAuthenticator, one per
ZeroMQ context) checks every connecting key against that directory; a refused key is logged at
WARNING with the server it tried and counted in `refused`. A peer without Curve at all fails the
handshake before ZAP is asked; `watch_handshakes` logs those from the socket's monitor.

Must never read or write anything but key files, and never log a secret key.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("asyncrl.security")

ROLES = ("queue", "learner", "rollout")
AUTHORIZED = "authorized"
DOMAINS = {"queue": "asyncrl-queue", "weights": "asyncrl-weights"}
"""ZAP domain of each server socket: one authenticator tells the two apart."""

CONSUMER_OPS = frozenset({"get", "ack", "version", "close"})
"""Queue operations only a learner key may send; a consumer's hello too (it hands back leases)."""
PRODUCER_OPS = frozenset({"ticket", "put", "release"})
"""Queue operations only a rollout (non-learner) key may send."""
LEARNER_PREFIX = "learner"


def may(user_id: str, op: str, role: object = None) -> bool:
    """Whether the peer whose key is authorized as `user_id` (the key file's name) may send `op`
    (with hello's `role`) to the queue. Stats and a producer's hello are open to every authorized key."""
    consumer = op in CONSUMER_OPS or (op == "hello" and role == "consumer")
    if consumer or op in PRODUCER_OPS:
        return user_id.startswith(LEARNER_PREFIX) == consumer
    return True


refused: dict[str, int] = {}
"""Refused connection attempts per server domain, since this process started."""


class SecurityError(ValueError):
    """Missing or unreadable key files; the message names the file and what to run."""


def create_keys(keys_dir: Path, force: bool = False) -> dict[str, Path]:
    """Key pairs for every role plus authorized/ with the learner's and rollout's public keys."""
    keys_dir = Path(keys_dir)
    existing = [r for r in ROLES if (keys_dir / f"{r}.key_secret").exists()]
    if existing and not force:
        raise SecurityError(f"{keys_dir} already holds keys for {existing}; pass --force to replace them (peers then need the new ones)")
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys_dir.chmod(0o700)
    made = {}
    for role in ROLES:
        public, secret = zmq.auth.create_certificates(str(keys_dir), role)
        Path(secret).chmod(0o600)
        made[role] = Path(public)
    authorized = keys_dir / AUTHORIZED
    shutil.rmtree(authorized, ignore_errors=True)
    authorized.mkdir()
    for role in ("learner", "rollout"):
        shutil.copy(made[role], authorized / f"{role}.key")
    return made


def _load(keys_dir: Path, role: str, secret: bool) -> tuple[bytes, Optional[bytes]]:
    path = Path(keys_dir) / (f"{role}.key_secret" if secret else f"{role}.key")
    if not path.exists():
        raise SecurityError(f"key file {path} is missing; make the keys with `asyncrl keys {keys_dir}` and copy {path.name} to this host")
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"key file {path} is unreadable ({exc}); make it again with `asyncrl keys`") from None


@dataclass(frozen=True)
class Curve:
    """Which keys this process uses: `identity` is its own role (its client key)."""

    keys_dir: Path
    identity: str

    def client(self, sock: zmq.Socket, server: str) -> None:
        """Make `sock` a Curve client of the `server` ('queue' or 'weights'), before it connects."""
        public, secret = _load(self.keys_dir, self.identity, secret=True)
        server_public, _ = _load(self.keys_dir, "learner" if server == "weights" else "queue", secret=False)
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public

    def server(self, sock: zmq.Socket, server: str) -> None:
        """Make `sock` a Curve server for `server` ('queue' or 'weights'), before it binds.

        The weights socket serves with the learner's key: engines pin it, so only the learner publishes."""
        public, secret = _load(self.keys_dir, "learner" if server == "weights" else "queue", secret=True)
        authenticate(sock.context, Path(self.keys_dir) / AUTHORIZED)
        sock.zap_domain = DOMAINS[server].encode()
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = public, secret
        watch_handshakes(sock, DOMAINS[server])


def dealer(ctx: zmq.Context, address: str, curve: Optional[Curve], server: str) -> zmq.Socket:
    """A fresh DEALER connected to `address`, with Curve client keys for `server` when configured.

    Clients build a new one after a request times out (the Lazy Pirate pattern), dropping whatever
    the old one still queued.
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.client(sock, server)
    sock.connect(address)
    return sock


def curve_for(security_cfg, identity: str) -> Optional[Curve]:
    """The Curve settings for a process of role `identity`, or None when security.curve is off."""
    if not security_cfg.curve:
        return None
    return Curve(Path(security_cfg.keys_dir), identity)


class _AuthorizedKeys:
    """ZAP credentials provider: allows keys in the authorized directory, logs and counts the rest."""

    def __init__(self, location: Path):
        self.location = location
        self.names: dict[bytes, str] = {}
        """z85 public key -> user id (the key file's name without .key)."""
        for path in sorted(location.glob("*.key")) if location.is_dir() else ():
            public, _ = zmq.auth.load_certificate(str(path))
            self.names[public] = path.stem
        self.keys = set(self.names)
        if not self.keys:
            log.warning("no public keys in %s: every peer will be refused", location)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        refused[domain] = refused.get(domain, 0) + 1
        log.warning("refused a peer on %s: its key %s is not in %s", domain, key.decode(errors="replace"), self.location)
        return False


class _NamingAuthenticator(ThreadAuthenticator):
    """Gives each accepted peer its key file's name as ZAP user id, which servers read per message
    (the frame property "User-Id") to authorise operations."""

    names: dict[bytes, str]

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(z85.encode(client_public_key), "")


_authenticators: dict[int, ThreadAuthenticator] = {}
_auth_lock = threading.Lock()


def authenticate(ctx: zmq.Context, location: Path) -> ThreadAuthenticator:
    """Start (once per context) the ZAP handler that checks client keys against `location`."""
    with _auth_lock:
        auth = _authenticators.get(id(ctx))
        if auth is None:
            auth = _NamingAuthenticator(ctx, log=logging.getLogger("asyncrl.security.zap"))
            auth.names = {}
            auth.start()
            _authenticators[id(ctx)] = auth
        provider = _AuthorizedKeys(location)
        auth.names.update(provider.names)
        for domain in DOMAINS.values():
            auth.configure_curve_callback(domain, provider)
        return auth


_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def watch_handshakes(sock: zmq.Socket, domain: str) -> None:
    """Log (on a thread) every failed handshake on `sock`: peers without Curve, or with a bad key."""
    monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)

    def run() -> None:
        try:
            while True:
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    break
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    continue  # the ZAP handler has logged and counted this one, with its key
                refused[domain] = refused.get(domain, 0) + 1
                log.warning("refused a peer on %s at %s: handshake failed (no Curve, or the wrong server key)",
                            domain, event["endpoint"].decode(errors="replace"))
        except zmq.ZMQError:
            pass  # the context is closing
        finally:
            monitor.close(0)

    threading.Thread(target=run, name=f"handshakes-{domain}", daemon=True).start()
