"""No pickle on any socket (architecture contract 5): not in the code, not on the wire."""

import pickle
import re

import torch

from asyncrl.config import ModelConfig
from asyncrl.modeling import build_model
from asyncrl.queue.client import QueueConsumer, QueueProducer
from conftest import ROOT, loopback
from test_codec import make_group

FORBIDDEN = re.compile(r"\bimport pickle\b|\bfrom pickle\b|cloudpickle|send_pyobj|recv_pyobj|\bpickle\.loads?\b|(?<![.\w])eval\(|(?<![.\w])exec\(")


def test_package_code_never_pickles_or_evaluates():
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in (ROOT / "asyncrl").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert offenders == []


class _PickleTrap:
    """Replaces pickle's entry points for the duration of a test; any use is recorded."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("dumps", "loads", "dump", "load"):
            monkeypatch.setattr(pickle, name, self._trap(name))

    def _trap(self, name):
        def trapped(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"pickle.{name} called")

        return trapped


def test_groups_and_weights_cross_sockets_without_pickle(monkeypatch, queue_server):
    from asyncrl.weights.broadcaster import WeightBroadcaster
    from asyncrl.weights.receiver import WeightReceiver

    trap = _PickleTrap(monkeypatch)
    server = queue_server(groups_per_step=1)
    producer = QueueProducer(server.address, "p", timeout_s=5)
    consumer = QueueConsumer(server.address, "c", vocab_size=32, timeout_s=5)
    producer.put(make_group(version=0), ticketed=False)
    lease, batch = consumer.get_batch(version=0, groups=1, timeout_s=5)
    consumer.ack(lease)
    model = build_model(ModelConfig())
    broadcaster = WeightBroadcaster(loopback())
    try:
        broadcaster.publish(model, 0)
        receiver = WeightReceiver(broadcaster.address, "e", timeout_s=5)
        version, state = receiver.poll(-1)
        receiver.close()
    finally:
        broadcaster.close()
    assert len(batch) == 1 and version == 0
    assert torch.equal(state["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])
    assert trap.calls == []


def test_a_pickled_request_is_refused(queue_server):
    import msgpack
    import zmq

    server = queue_server()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(server.address)
    sock.send_multipart([pickle.dumps({"proto": 1, "op": "stats", "req": 1})])
    assert sock.poll(5000)
    reply = msgpack.unpackb(sock.recv_multipart()[0])
    sock.close(0)
    assert reply["ok"] is False and reply["code"] == "bad_msgpack"
