"""Weight publication: buckets, the zmq and shared-memory transports, acknowledgements, and what a
broken transfer does (nothing: the engine keeps its version and asks again). Real sockets."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import zmq

from asyncrl.config import ModelConfig
from asyncrl.modeling import build_model
from asyncrl.queue.codec import pack, unpack_header
from asyncrl.rollout.engine import TorchEngine
from asyncrl.weights.broadcaster import WeightBroadcaster, named_tensors
from asyncrl.weights.codec import WeightsError, decode_state, encode_state, iter_buckets
from asyncrl.weights.receiver import Prefetcher, WeightReceiver
from asyncrl.weights.transport import snapshot
from tests.conftest import loopback


@pytest.fixture
def model():
    return build_model(ModelConfig(init_seed=3))


@pytest.fixture
def broadcaster():
    started = []

    def start(**kwargs) -> WeightBroadcaster:
        started.append(WeightBroadcaster(loopback(), **kwargs))
        return started[-1]

    yield start
    for b in started:
        b.close()


def assert_same_state(got: dict, model: torch.nn.Module) -> None:
    want = dict(named_tensors(model))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


# --- buckets -----------------------------------------------------------------------------------


def test_buckets_hold_at_most_bucket_bytes_and_a_larger_tensor_alone():
    tensors = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("big", torch.zeros(100)), ("c", torch.zeros(5))]
    buckets = list(iter_buckets(tensors, bucket_bytes=96))
    assert [[t[0] for t in b.tensors] for b in buckets] == [["a", "b"], ["big"], ["c"]]
    assert [len(b.data) for b in buckets] == [80, 400, 20]


def test_iter_buckets_copies_each_tensor_before_asking_for_the_next():
    """The ZeRO-3 hook: a generator may reuse one buffer for every gathered parameter."""
    scratch = torch.zeros(4)

    def gathered():
        for i in range(3):
            scratch.fill_(i)
            yield f"p{i}", scratch

    buckets = list(iter_buckets(gathered(), bucket_bytes=1024))
    state = decode_state({"version": 0, "buckets": [b.meta() for b in buckets]}, [b.data for b in buckets])
    assert [float(state[f"p{i}"][0]) for i in range(3)] == [0.0, 1.0, 2.0]


def test_a_damaged_bucket_fails_its_checksum(model):
    manifest, buffers = encode_state(dict(named_tensors(model)), 1, bucket_bytes=4096)
    damaged = bytearray(buffers[1])
    damaged[7] ^= 1
    with pytest.raises(WeightsError, match="bucket 1: checksum mismatch"):
        decode_state(manifest, [buffers[0], damaged, *buffers[2:]])


def test_a_shared_memory_snapshot_keeps_one_file_and_maps_it(model, tmp_path):
    published = snapshot(named_tensors(model), 2, 4096, str(tmp_path))
    assert os.path.getsize(published.path) == published.manifest["nbytes"]
    assert_same_state(decode_state(published.manifest, published.buffers), model)
    published.discard()
    assert not os.path.exists(published.path)


# --- transports --------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_an_engine_receives_the_newest_version_whole(broadcaster, model, transport, tmp_path):
    b = broadcaster(bucket_bytes=4096, shm_dir=str(tmp_path))
    b.publish(model, 0)
    b.publish(model, 5)
    receiver = WeightReceiver(b.address, "e0", timeout_s=5, transport=transport)
    version, state = receiver.poll(have=-1)
    assert version == 5
    assert_same_state(state, model)
    assert receiver.poll(have=5) is None
    receiver.close()


def test_shm_falls_back_to_zmq_when_the_learner_keeps_no_file(broadcaster, model):
    b = broadcaster(bucket_bytes=4096)
    b.publish(model, 1)
    receiver = WeightReceiver(b.address, "e0", timeout_s=5, transport="shm")
    version, state = receiver.poll(have=-1)
    assert version == 1
    assert_same_state(state, model)
    receiver.close()


def test_engines_on_different_transports_share_one_broadcaster(broadcaster, model, tmp_path):
    b = broadcaster(bucket_bytes=4096, shm_dir=str(tmp_path))
    b.publish(model, 3)
    receivers = [WeightReceiver(b.address, f"e{i}", 5, transport=t) for i, t in enumerate(["zmq", "shm", "zmq"])]
    assert [r.poll(-1)[0] for r in receivers] == [3, 3, 3]
    for r in receivers:
        r.close()


def test_the_learner_knows_the_version_each_engine_acknowledged(broadcaster, model):
    b = broadcaster()
    b.publish(model, 4)
    receivers = [WeightReceiver(b.address, f"e{i}", timeout_s=5) for i in range(2)]
    assert receivers[0].ack(4) and receivers[1].ack(3)
    assert b.engine_versions == {"e0": 4, "e1": 3}
    for r in receivers:
        r.close()


def test_every_answer_tells_the_engine_the_learners_newest_version(broadcaster, model):
    b = broadcaster()
    b.publish(model, 7)
    receiver = WeightReceiver(b.address, "e0", timeout_s=5)
    assert receiver.poll(have=7) is None
    assert receiver.learner_version == 7
    receiver.close()


def test_old_shared_memory_files_are_removed_as_versions_are_published(broadcaster, model, tmp_path):
    b = broadcaster(shm_dir=str(tmp_path))
    for version in range(4):
        b.publish(model, version)
    assert len(os.listdir(tmp_path)) == 2
    b.close()
    assert os.listdir(tmp_path) == []


# --- broken transfers --------------------------------------------------------------------------


class ScriptedBroadcaster:
    """A test double of the learner's socket that breaks chosen transfers: it answers each fetch
    with the next action of a script ('corrupt', 'truncate', 'ok'), sending a real published version."""

    def __init__(self, model, script, **snapshot_kwargs):
        self.published = snapshot(named_tensors(model), 9, 4096, **snapshot_kwargs)
        self.script = list(script)
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(loopback())
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stop.is_set():
            if not self.socket.poll(50):
                continue
            identity, body = self.socket.recv_multipart()
            assert unpack_header(body)["op"] == "fetch"
            self.answer(identity, self.script.pop(0) if self.script else "ok")

    def answer(self, identity: bytes, action: str) -> None:
        p = self.published
        self.socket.send_multipart([identity, pack({"ok": True, "transport": "zmq", **p.manifest})])
        for index, buf in enumerate(p.buffers):
            if action == "truncate" and index == len(p.buffers) // 2:
                break  # the learner went away mid-version
            data = bytes(buf)
            if action == "corrupt" and index == 1:
                data = data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]
            self.socket.send_multipart([identity, pack({"version": 9, "bucket": index}), data])

    def close(self):
        self.stop.set()
        self.thread.join(timeout=2)
        self.socket.close(0)


@pytest.mark.parametrize("action", ["corrupt", "truncate"])
def test_a_broken_transfer_leaves_the_engine_on_its_old_version_and_it_asks_again(model, action):
    engine = TorchEngine(build_model(ModelConfig(init_seed=0)), eos_token_id=1, pad_token_id=0)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    server = ScriptedBroadcaster(model, [action])
    receiver = WeightReceiver(server.address, "e0", timeout_s=0.5)
    try:
        assert receiver.poll(have=engine.version) is None
        assert receiver.failures == 1
        assert engine.version == 0 and all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())
        version, state = receiver.poll(have=engine.version)
        engine.load_weights(state, version)
        assert engine.version == 9
        assert_same_state({k: v for k, v in engine.model.state_dict().items() if k in state}, model)
    finally:
        receiver.close()
        server.close()


def test_a_prefetcher_stages_a_version_and_acknowledges_the_one_running(broadcaster, model):
    b = broadcaster(bucket_bytes=4096)
    b.publish(model, 2)
    prefetcher = Prefetcher(WeightReceiver(b.address, "e0", timeout_s=5), interval_s=0.01)
    try:
        assert prefetcher.wait(5)
        version, state = prefetcher.take()
        assert version == 2 and not prefetcher.ready()
        prefetcher.running(2)
        deadline = threading.Event()
        for _ in range(200):
            if b.engine_versions.get("e0") == 2:
                break
            deadline.wait(0.01)
        assert b.engine_versions["e0"] == 2
    finally:
        prefetcher.close()
