"""CurveZMQ on the queue and weights sockets, with real sockets: keys from `asyncrl keys` let the
right peers in; a peer without Curve or with an unknown key is refused and logged; only the
learner's key consumes from the queue and only rollout keys produce; only the learner's key can
serve weights to engines. See docs/security.md."""

from __future__ import annotations

import logging
import stat
import threading

import pytest
import zmq.auth

from asyncrl.config import ConfigError, ModelConfig, load_config
from asyncrl.modeling import build_model
from asyncrl.queue.client import QueueConsumer, QueueProducer, QueueRequestError, QueueTimeout
from asyncrl.queue.server import QueueServer, QueueSettings
from asyncrl.security import Curve, create_keys
from asyncrl.weights.broadcaster import WeightBroadcaster
from asyncrl.weights.receiver import WeightReceiver
from conftest import ROOT, loopback, run_cli
from test_codec import make_group


@pytest.fixture
def keys(tmp_path):
    create_keys(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def curve_queue(keys):
    server = QueueServer(loopback(), QueueSettings(max_staleness=1, groups_per_step=2), curve=Curve(keys, "queue"))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set, 10), daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(timeout=2)
    server.close()


def test_keys_command_writes_a_key_pair_per_role_with_private_secrets(tmp_path):
    result = run_cli("keys", str(tmp_path / "k"))
    assert result.returncode == 0, result.stderr
    for role in ("queue", "learner", "rollout"):
        secret = tmp_path / "k" / f"{role}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "k" / "authorized").iterdir()) == ["learner.key", "rollout.key"]
    again = run_cli("keys", str(tmp_path / "k"))
    assert again.returncode == 1 and "--force" in again.stderr


def test_curve_without_a_keys_directory_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="asyncrl keys"):
        load_config(str(ROOT / "configs/quickstart.yaml"), ["security.curve=true"])


def test_a_rollout_with_its_key_is_served(keys, curve_queue):
    producer = QueueProducer(curve_queue.address, "rollout-0", timeout_s=5, curve=Curve(keys, "rollout"))
    try:
        assert producer.hello("producer")["ok"]
    finally:
        producer.close()


def test_a_peer_without_curve_is_refused_and_logged(keys, curve_queue, caplog):
    caplog.set_level(logging.WARNING, "asyncrl.security")
    producer = QueueProducer(curve_queue.address, "intruder", timeout_s=0.5, retries=1)
    try:
        with pytest.raises(QueueTimeout):
            producer.hello("producer")
    finally:
        producer.close()
    assert "refused a peer on asyncrl-queue" in caplog.text


def test_a_peer_with_an_unknown_key_is_refused_and_logged(keys, curve_queue, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "asyncrl.security")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    zmq.auth.create_certificates(str(stranger), "rollout")
    for name in ("queue.key", "learner.key"):  # it knows the servers' public keys, but not an authorized secret
        (stranger / name).write_bytes((keys / name).read_bytes())
    producer = QueueProducer(curve_queue.address, "stranger", timeout_s=0.5, retries=1, curve=Curve(stranger, "rollout"))
    try:
        with pytest.raises(QueueTimeout):
            producer.hello("producer")
    finally:
        producer.close()
    assert "refused a peer on asyncrl-queue: its key" in caplog.text


def test_only_the_learners_key_can_serve_weights_to_an_engine(keys, tmp_path):
    impostor_keys = tmp_path / "impostor"
    create_keys(impostor_keys)
    (impostor_keys / "authorized" / "rollout.key").write_bytes((keys / "rollout.key").read_bytes())
    model = build_model(ModelConfig())
    for server_keys, served in ((keys, True), (impostor_keys, False)):
        broadcaster = WeightBroadcaster(loopback(), curve=Curve(server_keys, "learner"))
        receiver = WeightReceiver(broadcaster.address, "rollout-0", timeout_s=1.0, curve=Curve(keys, "rollout"))
        try:
            broadcaster.publish(model, 0)
            result = receiver.poll(-1)
        finally:
            receiver.close()
            broadcaster.close()
        assert (result is not None and result[0] == 0) == served


def test_a_rollout_key_trying_to_consume_is_refused_and_logged(keys, curve_queue, caplog):
    caplog.set_level(logging.WARNING, "asyncrl.queue")
    intruder = QueueConsumer(curve_queue.address, "learner-0", timeout_s=5, curve=Curve(keys, "rollout"))
    try:
        for attempt in (lambda: intruder.try_get(0, 2), lambda: intruder.ack(1), lambda: intruder.hello("consumer", 0)):
            with pytest.raises(QueueRequestError) as refused:
                attempt()
            assert refused.value.code == "forbidden"
        assert intruder.stats()["rejected"] == {"forbidden": 3}  # reading the counters is open to every key
    finally:
        intruder.close()
    assert "rejected request: forbidden: the key authorized as 'rollout' may not send 'get'" in caplog.text


def test_the_learners_key_consumes_and_may_not_produce(keys, curve_queue):
    learner = QueueConsumer(curve_queue.address, "learner-0", timeout_s=5, curve=Curve(keys, "learner"))
    as_producer = QueueProducer(curve_queue.address, "learner-0", timeout_s=5, curve=Curve(keys, "learner"))
    rollout = QueueProducer(curve_queue.address, "rollout-0", timeout_s=5, curve=Curve(keys, "rollout"))
    try:
        assert learner.hello("consumer", 0)["ok"] and rollout.ticket(0, 2) == (2, False)
        rollout.put(make_group(version=0))
        rollout.put(make_group(version=0))
        lease, batch = learner.get_batch(0, 2, timeout_s=5)
        assert len(batch) == 2 and learner.ack(lease) == 2
        with pytest.raises(QueueRequestError, match="may not send 'put'"):
            as_producer.put(make_group(version=0), ticketed=False)
    finally:
        for client in (learner, as_producer, rollout):
            client.close()
