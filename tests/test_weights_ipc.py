"""The ``ipc`` transport: an engine on the learner's host opens the learner's buckets through torch's
cross-process tensor handles (a shared-memory file on CPU, CUDA IPC on a GPU), copies them, and
lets go. Real sockets; the engine runs in its own process wherever crossing processes is the point.
The CPU tests run everywhere; the gpu-marked ones repeat the delivery over CUDA IPC."""

from __future__ import annotations

import functools
import inspect
import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
import zmq
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from asyncrl.config import ModelConfig, WeightsConfig
from asyncrl.modeling import build_model
from asyncrl.queue.codec import pack, unpack_header
from asyncrl.rollout.engine import TorchEngine
from asyncrl.weights.broadcaster import WeightBroadcaster, named_tensors
from asyncrl.weights.codec import WeightsError, tensors_from_buckets
from asyncrl.weights.ipc import SUM_CHUNK, SUM_ROW, IpcVersion, bucket_sums, host_identity, open_buckets
from asyncrl.weights.ipc_drain import Draining, counter_value
from asyncrl.weights.ipc_handles import CUDA_PARAMETERS, EVENT_HANDLE_BYTES, REF_COUNTER_SLOTS, encode, parse, visible_gpus
from asyncrl.weights.receiver import WeightReceiver
from asyncrl.weights.transport import snapshot
from test_weights import ScriptedBroadcaster, broadcaster, model  # noqa: F401  (fixtures)
from tests.conftest import loopback

SHM = Path("/dev/shm")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device")



def raw_state(state: dict) -> bytes:
    """Every tensor's bytes in name order: two states are bit-for-bit equal iff these are."""
    return b"".join(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                    for name in sorted(state))


HERE = object()
"""`ask`'s default host: this process's, as a WeightReceiver sends it."""


def ask(address: str, transport: str = "ipc", host=HERE) -> dict:
    """One fetch over a bare DEALER, as an engine sends it, without opening anything: the learner's
    reply header, and with a zmq reply the bucket messages that follow it under "streamed"."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    request = {"op": "fetch", "have": -1, "engine": "probe", "transport": transport, "gpus": list(visible_gpus())}
    if host is not None:
        request["host"] = host_identity() if host is HERE else host
    try:
        sock.send(pack(request))
        assert sock.poll(5000), "the learner did not answer"
        reply = unpack_header(sock.recv_multipart()[0], max_bytes=64 << 20)
        if reply.get("transport") == "zmq":
            reply["streamed"] = []
            for _ in reply["buckets"]:
                assert sock.poll(5000), "a bucket message is missing"
                reply["streamed"].append(unpack_header(sock.recv_multipart()[0]))
        return reply
    finally:
        sock.close(0)


def shm_files(reply: dict) -> list[Path]:
    return [SHM / h["filename"].decode().lstrip("/") for h in reply["handles"] if h is not None]


def wait_for(condition, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


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


def test_the_learner_keeps_the_newest_two_ipc_versions_and_the_older_ones_drain(broadcaster, model):
    b = broadcaster(bucket_bytes=4096, ipc=True)  # the default grace: a minute
    replies = []
    for version in range(4):
        b.publish(model, version)
        replies.append(ask(b.address))
    assert [r["version"] for r in replies] == [0, 1, 2, 3]
    # Versions 0 and 1 are no longer served, but an engine that got their handles a moment ago
    # may be opening them: their files stay for the grace period.
    assert all(f.exists() for r in replies for f in shm_files(r))
    assert ask(b.address)["version"] == 3
    b.close()
    assert not any(f.exists() for r in replies for f in shm_files(r))


def test_a_drained_ipc_version_is_freed_once_its_grace_has_passed(broadcaster, model):
    b = broadcaster(bucket_bytes=4096, ipc=True, ipc_grace_s=0.5)
    replies = []
    for version in range(4):
        b.publish(model, version)
        replies.append(ask(b.address))
    assert wait_for(lambda: not any(f.exists() for r in replies[:2] for f in shm_files(r)))
    assert all(f.exists() for r in replies[2:] for f in shm_files(r))
    with pytest.raises(WeightsError, match="bucket 0: the reply is .* past its open_by"):
        open_buckets(replies[0])  # an engine holding version 0's handles this late must not open them
    receiver = WeightReceiver(b.address, "e0", timeout_s=5, transport="ipc")
    version, state = receiver.poll(-1)
    assert version == 3 and raw_state(state) == raw_state(dict(named_tensors(model)))
    receiver.close()


def test_an_ipc_fetch_from_another_host_or_namespace_is_answered_over_zmq(broadcaster, model):
    b = broadcaster(bucket_bytes=4096, ipc=True)
    b.publish(model, 1)
    here = host_identity()
    assert ask(b.address)["transport"] == "ipc"
    for host in ({**here, "boot_id": "another-host"}, {**here, "ipc_ns": 1}, None):
        reply = ask(b.address, host=host)
        assert reply["transport"] == "zmq" and reply["version"] == 1
        assert reply["streamed"] == [{"version": 1, "bucket": i} for i in range(len(reply["buckets"]))]


class UnshareableBroadcaster(WeightBroadcaster):
    """A test double of a learner whose torch reduces tensors into a tuple this code does not know."""

    def _share(self, version, now):
        raise TypeError("cannot unpack non-iterable NoneType object")


def test_a_learner_that_cannot_share_its_buckets_answers_over_zmq_and_keeps_serving(model):
    b = UnshareableBroadcaster(loopback(), bucket_bytes=4096, ipc=True)
    receiver = WeightReceiver(b.address, "e0", timeout_s=5, transport="ipc")
    try:
        b.publish(model, 1)
        manifest, buffers = receiver.fetch(-1)
        assert (manifest["transport"], manifest["version"]) == ("zmq", 1)
        assert raw_state(tensors_from_buckets(manifest, buffers)) == raw_state(dict(named_tensors(model)))
        assert b.ipc_off.startswith("TypeError")
        b.publish(model, 2)
        assert receiver.fetch(1)[0]["version"] == 2 and receiver.ack(2)
        assert receiver.failures == 0 and b.engine_versions == {"e0": 2}
    finally:
        receiver.close()
        b.close()


class ScriptedIpcLearner(ScriptedBroadcaster):
    """A test double of the learner's socket: it answers each fetch with the next action of a script,
    sending the handles of a real ipc version ('ok') or handles an engine cannot use: 'gone' (a real
    version whose shared memory was freed before the reply), 'wrong_type', 'too_few', 'outside',
    'not_a_map', 'corrupt' (the handle's bytes damaged), 'swapped' (two buckets' handles exchanged),
    'wrong_sums' (a bucket's sums are another's), 'late' (open_by has passed)."""

    def __init__(self, model, script):
        super().__init__(model, script, ipc=True)

    def handles(self, action: str) -> list:
        if action == "gone":
            freed = snapshot(named_tensors(build_model(ModelConfig(init_seed=4))), 9, 4096, ipc=True).ipc
            handles = freed.share(time.monotonic())
            freed.buffers = []  # the only reference: the files go now
            return handles
        handles = self.published.ipc.share(time.monotonic())
        first, key = handles[0], "filename" if handles[0]["kind"] == "cpu" else "storage_handle"
        if action == "wrong_type":
            handles[0] = {**first, key: 12}
        elif action == "too_few":
            handles.pop()
        elif action == "outside":
            handles[0] = {**first, "tensor_offset": first["storage_size_bytes"]}
        elif action == "not_a_map":
            handles[0] = "garbage"
        elif action == "swapped":
            handles[0], handles[1] = handles[1], handles[0]
        elif action == "wrong_sums":
            handles[0] = {**first, "sums": handles[1]["sums"]}
        elif action == "corrupt":
            handles[0] = {**first, key: bytes(reversed(first[key]))}
        return handles

    def answer(self, identity: bytes, action: str) -> None:
        open_by = time.monotonic() + (-1.0 if action == "late" else 30.0)
        reply = {"ok": True, "transport": "ipc", "handles": self.handles(action), "open_by": open_by,
                 **self.published.manifest}
        self.socket.send_multipart([identity, pack(reply)])

    def close(self):
        super().close()
        self.published = None


ACTIONS = ["gone", "wrong_type", "too_few", "outside", "not_a_map", "corrupt", "swapped", "wrong_sums", "late"]


@pytest.mark.parametrize("action", ACTIONS)
def test_an_unusable_handle_makes_the_fetch_return_nothing_and_the_next_fetch_gets_the_version(model, action):
    learner = ScriptedIpcLearner(model, [action])
    receiver = WeightReceiver(learner.address, "e0", timeout_s=5, transport="ipc")
    try:
        assert receiver.poll(have=0) is None  # nothing to apply: the engine stays on its version
        assert receiver.failures == 1
        version, state = receiver.poll(have=0)
        engine = TorchEngine(build_model(ModelConfig(init_seed=0)), eos_token_id=1, pad_token_id=0)
        engine.load_weights(state, version)
        assert engine.version == 9 and receiver.failures == 1
        loaded = {k: v for k, v in engine.model.state_dict().items() if k in state}
        assert raw_state(loaded) == raw_state(dict(named_tensors(model)))
    finally:
        receiver.close()
        learner.close()


def test_a_copy_whose_sums_differ_from_the_learners_is_rejected(model):
    """The CUDA path's only content check, run here on CPU buckets before their xxh3."""
    version = snapshot(named_tensors(model), 1, 4096, ipc=True)
    reply = {**version.manifest, "handles": version.ipc.share(time.monotonic()), "open_by": time.monotonic() + 30}
    sums = reply["handles"][2]["sums"]
    reply["handles"][2] = {**reply["handles"][2], "sums": [sums[0], sums[1] + 1]}
    with pytest.raises(WeightsError, match=r"bucket 2: sums \[.*\] after the copy, the learner sent"):
        open_buckets(reply)
    assert [t.numel() for t in open_buckets({**reply, "handles": version.ipc.share(time.monotonic())})] == \
        [b["nbytes"] for b in reply["buckets"]]


def test_a_freed_version_really_has_no_file_left(model):
    """What 'gone' above relies on: dropping an ipc version's buffers unlinks its files."""
    published = snapshot(named_tensors(model), 1, 4096, ipc=True)
    files = [SHM / h["filename"].decode().lstrip("/") for h in published.ipc.share(time.monotonic()) if h]
    assert files and all(f.exists() for f in files)
    published.discard()
    assert not any(f.exists() for f in files)


# --- the wire form of a handle, and the sums ------------------------------------------------------


def test_rebuild_cuda_tensor_still_takes_the_parameters_cuda_handles_are_named_after():
    assert tuple(inspect.signature(rebuild_cuda_tensor).parameters) == CUDA_PARAMETERS


def cuda_reduction(nbytes: int = 4096) -> tuple:
    """What torch's reduce_tensor returns for a flat uint8 CUDA bucket of `nbytes` on the learner's
    GPU 2 (a test double: no CUDA here), with a 66-byte memory handle as torch's allocator makes."""
    return rebuild_cuda_tensor, (
        torch.Tensor, torch.Size([nbytes]), (1,), 0, torch.storage.TypedStorage, torch.uint8, 2,
        b"\x01" * 66, nbytes, 2 << 20, False, b"/torch_123_456_0", 17, b"\x02" * EVENT_HANDLE_BYTES, True)


def engine_sees_the_learners_gpu_as_0(uuid) -> int:
    """A double of `ipc_handles.local_gpu` for an engine whose only GPU is the learner's GPU 2."""
    if uuid != "GPU-learner":
        raise ValueError(f"the learner's GPU {uuid} is not visible to this engine")
    return 0


def learner_gpu(index: int) -> str:
    """A double of `ipc_handles.gpu_uuid` on the learner."""
    return "GPU-learner" if index == 2 else f"GPU-other-{index}"


def test_a_cuda_handle_crosses_msgpack_and_parses_back_into_torchs_own_arguments():
    rebuild, args = cuda_reduction()
    wire = {**encode(rebuild, args, uuid_of=learner_gpu), "sums": [5, 7]}
    parsed = parse(unpack_header(pack(wire)), 4096, device_of=engine_sees_the_learners_gpu_as_0)
    assert parsed.rebuild is rebuild_cuda_tensor and parsed.sums == [5, 7]
    # The same call torch would make, except the device: the engine's own index of that GPU.
    assert parsed.args == args[:6] + (0,) + args[7:]


@pytest.mark.parametrize("field, value, error", [
    ("event_handle", b"\x02" * (EVENT_HANDLE_BYTES - 1), "'event_handle' must be 64 bytes"),
    ("event_handle", b"\x02" * (EVENT_HANDLE_BYTES + 1), "'event_handle' must be 64 bytes"),
    ("ref_counter_offset", REF_COUNTER_SLOTS, "'ref_counter_offset' must be an integer in"),
    ("storage_size_bytes", 1 << 60, "'storage_size_bytes' must be an integer in"),
    ("storage_offset_bytes", -1, "'storage_offset_bytes' must be an integer in"),
    ("tensor_size", [4095], "not the manifest's flat bucket of 4096 bytes"),
    ("tensor_offset", 1, "not the manifest's flat bucket of 4096 bytes inside a storage of 4096"),
    ("sums", [1], "'sums' must hold 2 integers"),
    ("device_uuid", "GPU-other-1", "GPU GPU-other-1 is not visible"),
])
def test_a_cuda_handle_with_a_field_torch_would_misread_is_refused_before_opening(field, value, error):
    rebuild, args = cuda_reduction()
    wire = {**encode(rebuild, args, uuid_of=learner_gpu), "sums": [5, 7], field: value}
    with pytest.raises((TypeError, ValueError), match=error):
        parse(wire, 4096, device_of=engine_sees_the_learners_gpu_as_0)


def test_a_cuda_memory_handle_of_any_length_is_accepted():
    """Its length is the allocator's business (66 bytes today, more for expandable segments)."""
    for length in (64, 66, 130):
        rebuild, args = cuda_reduction()
        args = args[:7] + (b"\x01" * length,) + args[8:]
        wire = {**encode(rebuild, args, uuid_of=learner_gpu), "sums": [0, 0]}
        assert parse(wire, 4096, device_of=engine_sees_the_learners_gpu_as_0).args[7] == b"\x01" * length


def test_bucket_sums_are_the_byte_sum_and_a_row_weighted_sum_across_chunks():
    bucket = torch.randint(0, 256, (SUM_CHUNK + 3 * SUM_ROW + 5,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = bucket.numpy().astype("int64")
    rows = [int(data[i : i + SUM_ROW].sum()) for i in range(0, len(data), SUM_ROW)]
    assert bucket_sums(bucket) == [int(data.sum()), sum((i % 65521 + 1) * r for i, r in enumerate(rows))]


def test_bucket_sums_tell_rows_in_another_order_apart():
    bucket = torch.randint(0, 256, (4 * SUM_ROW,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    swapped = torch.cat([bucket[SUM_ROW : 2 * SUM_ROW], bucket[:SUM_ROW], bucket[2 * SUM_ROW :]])
    assert bucket_sums(swapped)[0] == bucket_sums(bucket)[0]
    assert bucket_sums(swapped)[1] != bucket_sums(bucket)[1]


# --- draining: the counters of replies no engine took ----------------------------------------------


class CounterFileDouble:
    """A reference-counter file laid out as torch lays out its CUDA ones (torch's own shared-memory
    allocator, REF_COUNTER_SLOTS int64 counters), with a double of torch's release, which needs a
    CUDA build: it decrements the counter in the file, as torch's does."""

    def __init__(self):
        self.storage = torch.UntypedStorage._new_using_filename_cpu(8 * REF_COUNTER_SLOTS)
        self.name = self.storage._share_filename_cpu_()[1]
        self.counters = torch.empty(0, dtype=torch.uint8).set_(self.storage).view(torch.int64)
        self.counters.zero_()

    def release(self, counter: bytes, slot: int) -> None:
        assert counter == self.name
        self.counters[slot] -= 1


def test_draining_releases_the_counters_no_engine_gave_back_after_the_grace_and_no_other():
    file = CounterFileDouble()
    file.counters[5] = 1  # a reply that never reached an engine
    file.counters[6] = 0  # an engine opened its handle and let go (or gave it back unopened)
    version = IpcVersion([], [], gpus=[], sent=[(file.name, 5), (file.name, 6)], last_sent=100.0)
    draining = Draining(grace_s=10.0, release=file.release)
    draining.add(version, now=101.0)
    draining.sweep(now=105.0)  # an engine may still be opening it (open_by = 105)
    assert (file.counters[5].item(), len(draining)) == (1, 1)
    draining.sweep(now=110.0)
    assert (file.counters[5].item(), file.counters[6].item(), draining.released, len(draining)) == (0, 0, 1, 0)


def test_draining_leaves_alone_a_counter_it_cannot_read_as_torch_lays_it_out(tmp_path):
    (tmp_path / "torch_1_2_0").write_bytes(bytes(8 * REF_COUNTER_SLOTS))  # no 64-byte header
    released = []
    draining = Draining(grace_s=1.0, read=functools.partial(counter_value, shm=str(tmp_path)),
                        release=lambda *counter: released.append(counter))
    draining.add(IpcVersion([], [], gpus=[], sent=[(b"/torch_1_2_0", 0)], last_sent=0.0), now=0.0)
    draining.sweep(now=2.0)
    assert released == [] and len(draining) == 0


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
    baseline = torch.cuda.memory_allocated(0)
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
    # The engine gave back every counter, those of the damaged reply too (without the learner's
    # device: `release` needs none), so dropping the version frees all of it.
    torch.cuda.ipc_collect()
    assert torch.cuda.memory_allocated(0) == baseline


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_reply_no_engine_opens_is_released_once_its_version_has_drained():
    model = build_model(ModelConfig(init_seed=7)).to("cuda:0")
    b = WeightBroadcaster(loopback(), bucket_bytes=4096, ipc=True, ipc_grace_s=1.0)
    try:
        baseline = torch.cuda.memory_allocated(0)
        b.publish(model, 1)
        per_version = torch.cuda.memory_allocated(0) - baseline
        reply = ask(b.address)
        assert reply["transport"] == "ipc"  # handles taken, never opened: their counters stay at 1
        b.publish(model, 2)
        b.publish(model, 3)  # version 1 leaves; torch keeps it in its limbo while its counters are set
        assert wait_for(lambda: torch.cuda.memory_allocated(0) - baseline == 2 * per_version)
        assert b.ipc_released == len([h for h in reply["handles"] if h is not None])
    finally:
        b.close()
