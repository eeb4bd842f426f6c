"""The ``ipc`` transport: an engine on the learner's host opens the learner's buckets through torch's
cross-process tensor handles (a shared-memory file on CPU, CUDA IPC on a GPU), copies them, and
lets go. Real sockets; the engine runs in its own process wherever crossing processes is the point.
The CPU tests run everywhere; the gpu-marked ones repeat the delivery over CUDA IPC."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from asyncrl.config import ModelConfig, WeightsConfig
from asyncrl.modeling import build_model
from asyncrl.queue.codec import pack, unpack_header
from asyncrl.rollout.engine import TorchEngine
from asyncrl.weights.broadcaster import WeightBroadcaster, named_tensors
from asyncrl.weights.codec import WeightsError, tensors_from_buckets
from asyncrl.weights.ipc import open_buckets, share
from asyncrl.weights.receiver import WeightReceiver
from asyncrl.weights.transport import snapshot
from tests.conftest import loopback

SHM = Path("/dev/shm")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device")


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


def raw_state(state: dict) -> bytes:
    """Every tensor's bytes in name order: two states are bit-for-bit equal iff these are."""
    return b"".join(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                    for name in sorted(state))


def ask(address: str, transport: str = "ipc") -> dict:
    """One fetch over a bare DEALER, as an engine sends it: the learner's reply header."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(pack({"op": "fetch", "have": -1, "engine": "probe", "transport": transport}))
        assert sock.poll(5000), "the learner did not answer"
        return unpack_header(sock.recv_multipart()[0], max_bytes=64 << 20)
    finally:
        sock.close(0)


def shm_files(reply: dict) -> list[Path]:
    return [SHM / h["filename"].decode().lstrip("/") for h in reply["handles"] if h is not None]


def engine_process(address: str, out: str, ready=None, leave=None) -> None:
    """An engine in its own process: fetch one version over ipc, record it, acknowledge it; with
    `leave`, stay alive (holding nothing of the learner's) until told to go."""
    receiver = WeightReceiver(address, "e-ipc", timeout_s=30, transport="ipc")
    fetched, deadline = None, time.monotonic() + 60
    while fetched is None and time.monotonic() < deadline:
        fetched = receiver.fetch(-1)
    manifest, buffers = fetched
    state = tensors_from_buckets(manifest, buffers)
    receiver.ack(manifest["version"])
    Path(out + ".bin").write_bytes(raw_state(state))
    Path(out).write_text(json.dumps({"version": manifest["version"], "transport": manifest["transport"],
                                     "devices": sorted({str(t.device) for t in state.values()}),
                                     "names": sorted(state), "failures": receiver.failures}))
    receiver.close()
    if ready is not None:
        ready.set()
        leave.wait(60)


def spawn_engine(address: str, out: str, *events) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=engine_process, args=(address, out, *events))
    process.start()
    return process


# --- CPU: a shared-memory file per bucket ---------------------------------------------------------


def test_an_engine_in_another_process_gets_a_version_bit_for_bit_over_ipc(model, tmp_path):
    b = WeightBroadcaster.from_config(WeightsConfig(address=loopback(), bucket_bytes=4096, ipc=True))
    out = str(tmp_path / "engine.json")
    try:
        b.publish(model, 3)
        engine = spawn_engine(b.address, out)
        engine.join(timeout=120)
        assert engine.exitcode == 0
        got = json.loads(Path(out).read_text())
        want = dict(named_tensors(model))
        assert got == {"version": 3, "transport": "ipc", "devices": ["cpu"], "names": sorted(want), "failures": 0}
        assert Path(out + ".bin").read_bytes() == raw_state(want)
        assert b.engine_versions == {"e-ipc": 3}
    finally:
        b.close()


def test_ipc_falls_back_to_zmq_when_the_learner_keeps_no_ipc_buffers(broadcaster, model):
    b = broadcaster(bucket_bytes=4096)
    b.publish(model, 1)
    receiver = WeightReceiver(b.address, "e0", timeout_s=5, transport="ipc")
    manifest, buffers = receiver.fetch(-1)
    assert manifest["transport"] == "zmq" and manifest["version"] == 1
    assert raw_state(tensors_from_buckets(manifest, buffers)) == raw_state(dict(named_tensors(model)))
    receiver.close()


def test_the_learner_keeps_the_newest_two_ipc_versions_and_frees_older_ones(broadcaster, model):
    b = broadcaster(bucket_bytes=4096, ipc=True)
    replies = []
    for version in range(4):
        b.publish(model, version)
        replies.append(ask(b.address))
    assert [r["version"] for r in replies] == [0, 1, 2, 3]
    assert [all(f.exists() for f in shm_files(r)) for r in replies] == [False, False, True, True]
    assert not any(f.exists() for r in replies[:2] for f in shm_files(r))
    with pytest.raises(WeightsError, match="bucket 0: cannot open the learner's handle"):
        open_buckets(replies[0], replies[0]["handles"])  # an engine holding version 0's handles is too late
    receiver = WeightReceiver(b.address, "e0", timeout_s=5, transport="ipc")
    version, state = receiver.poll(-1)
    assert version == 3 and raw_state(state) == raw_state(dict(named_tensors(model)))
    receiver.close()
    b.close()
    assert not any(f.exists() for r in replies for f in shm_files(r))


class ScriptedIpcLearner:
    """A test double of the learner's socket: it answers each fetch with the next action of a script,
    sending the handles of a real ipc version ('ok') or handles an engine cannot use: 'gone' (a real
    version whose shared memory was freed before the reply), 'wrong_type', 'too_few', 'outside',
    'not_a_map', 'corrupt' (the handle's bytes damaged), 'swapped' (two buckets' handles exchanged:
    each opens, but holds the other's bytes)."""

    def __init__(self, model, script):
        self.published = snapshot(named_tensors(model), 9, 4096, ipc=True)
        self.script = list(script)
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(loopback())
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def handles(self, action: str) -> list:
        if action == "gone":
            freed = snapshot(named_tensors(build_model(ModelConfig(init_seed=4))), 9, 4096, ipc=True)
            handles = share(freed.ipc)
            freed.discard()
            return handles
        handles = share(self.published.ipc)
        first = handles[0]
        if action == "wrong_type":
            handles[0] = {**first, "filename" if first["kind"] == "cpu" else "handle": 12}
        elif action == "too_few":
            handles.pop()
        elif action == "outside":
            handles[0] = {**first, "offset": first["storage_bytes"]}
        elif action == "not_a_map":
            handles[0] = "garbage"
        elif action == "swapped":
            handles[0], handles[1] = handles[1], handles[0]
        elif action == "corrupt":
            key = "filename" if first["kind"] == "cpu" else "handle"
            handles[0] = {**first, key: bytes(reversed(first[key]))}
        return handles

    def serve(self):
        while not self.stop.is_set():
            if not self.socket.poll(50):
                continue
            identity, body = self.socket.recv_multipart()
            assert unpack_header(body)["op"] == "fetch"
            action = self.script.pop(0) if self.script else "ok"
            reply = {"ok": True, "transport": "ipc", "handles": self.handles(action), **self.published.manifest}
            self.socket.send_multipart([identity, pack(reply)])

    def close(self):
        self.stop.set()
        self.thread.join(timeout=2)
        self.socket.close(0)


@pytest.mark.parametrize("action", ["gone", "wrong_type", "too_few", "outside", "not_a_map", "corrupt", "swapped"])
def test_an_unusable_handle_leaves_the_engine_on_its_old_version_and_it_asks_again(model, action):
    engine = TorchEngine(build_model(ModelConfig(init_seed=0)), eos_token_id=1, pad_token_id=0)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    learner = ScriptedIpcLearner(model, [action])
    receiver = WeightReceiver(learner.address, "e0", timeout_s=5, transport="ipc")
    try:
        assert receiver.poll(have=engine.version) is None
        assert receiver.failures == 1
        assert engine.version == 0 and all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())
        version, state = receiver.poll(have=engine.version)
        engine.load_weights(state, version)
        assert engine.version == 9 and receiver.failures == 1
        assert raw_state({k: v for k, v in engine.model.state_dict().items() if k in state}) == raw_state(dict(named_tensors(model)))
    finally:
        receiver.close()
        learner.close()


def test_a_freed_version_really_has_no_file_left(model):
    """What 'gone' above relies on: discarding an ipc version unlinks its files."""
    published = snapshot(named_tensors(model), 1, 4096, ipc=True)
    files = [SHM / h["filename"].decode().lstrip("/") for h in share(published.ipc) if h]
    assert files and all(f.exists() for f in files)
    published.discard()
    assert not any(f.exists() for f in files)


# --- CUDA IPC --------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_an_engine_on_the_same_gpu_gets_a_version_bit_for_bit_and_lets_go_of_it(tmp_path):
    model = build_model(ModelConfig(init_seed=5)).to("cuda:0")
    b = WeightBroadcaster(loopback(), bucket_bytes=4096, ipc=True)
    out = str(tmp_path / "engine.json")
    ctx = multiprocessing.get_context("spawn")
    ready, leave = ctx.Event(), ctx.Event()
    engine = None
    try:
        baseline = torch.cuda.memory_allocated(0)
        b.publish(model, 1)
        per_version = torch.cuda.memory_allocated(0) - baseline
        assert per_version > 0
        engine = spawn_engine(b.address, out, ready, leave)
        assert ready.wait(120), "the engine got no version"
        want = dict(named_tensors(model))
        got = json.loads(Path(out).read_text())
        assert got == {"version": 1, "transport": "ipc", "devices": ["cuda:0"], "names": sorted(want), "failures": 0}
        assert Path(out + ".bin").read_bytes() == raw_state(want)
        # The engine, still running, holds no view of version 1: once two newer versions are
        # published, version 1 leaves torch's limbo and the learner keeps exactly two.
        b.publish(model, 2)
        b.publish(model, 3)
        torch.cuda.ipc_collect()
        assert torch.cuda.memory_allocated(0) - baseline == 2 * per_version
    finally:
        leave.set()
        if engine is not None:
            engine.join(timeout=30)
            if engine.is_alive():
                engine.kill()
        b.close()


def scripted_cuda_engine(address: str, out: str) -> None:
    receiver = WeightReceiver(address, "e-ipc", timeout_s=30, transport="ipc")
    first = receiver.fetch(-1)
    manifest, buffers = receiver.fetch(-1)
    Path(out + ".bin").write_bytes(raw_state(tensors_from_buckets(manifest, buffers)))
    Path(out).write_text(json.dumps({"first": first is None, "failures": receiver.failures, "version": manifest["version"]}))
    receiver.close()


@pytest.mark.gpu
@needs_cuda
def test_a_damaged_cuda_handle_leaves_the_engine_on_its_version_and_the_next_fetch_succeeds(tmp_path):
    model = build_model(ModelConfig(init_seed=6)).to("cuda:0")
    learner = ScriptedIpcLearner(model, ["corrupt"])
    out = str(tmp_path / "engine.json")
    engine = multiprocessing.get_context("spawn").Process(target=scripted_cuda_engine, args=(learner.address, out))
    try:
        engine.start()
        engine.join(timeout=120)
        assert engine.exitcode == 0
        assert json.loads(Path(out).read_text()) == {"first": True, "failures": 1, "version": 9}
        assert Path(out + ".bin").read_bytes() == raw_state(dict(named_tensors(model)))
    finally:
        if engine.is_alive():
            engine.kill()
        learner.close()
