"""The torch.distributed transport: the learner (rank 0) pushes each version through a process
group to engine processes, which verify it and acknowledge over zmq. gloo on CPU runs here; the
same code with nccl needs two GPUs (the learner's and an engine's; NCCL refuses two ranks on one)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import zlib

import pytest
import torch

from asyncrl.weights.broadcaster import WeightBroadcaster, named_tensors
from asyncrl.weights.receiver import WeightReceiver
from asyncrl.weights.transport import GroupPublisher, GroupReceiver, open_group
from tests.conftest import free_port, loopback


def digest(state) -> dict[str, int]:
    return {name: zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()) for name, t in state}


def engine_process(init: str, rank: int, world: int, backend: str, address: str, out: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    group = open_group(init, rank, world, backend, timeout_s=60)
    receiver = WeightReceiver(address, f"e{rank}", timeout_s=10, transport=backend, group=GroupReceiver(group, backend))
    deadline = time.monotonic() + 60
    got = None
    while got is None and time.monotonic() < deadline:
        got = receiver.poll(have=-1)
        time.sleep(0.02)
    if got is not None:
        version, state = got
        receiver.ack(version)
        with open(out, "w") as f:
            json.dump({"version": version, "digest": digest(state.items())}, f)
    os._exit(0)  # the group's receiving thread is blocked in a collective; nothing to clean up


def run_group(backend: str, tmp_path, engines: int = 2) -> None:
    # imported here so that the spawned engine processes, which import this module, stay light
    from asyncrl.config import ModelConfig
    from asyncrl.modeling import build_model

    model = build_model(ModelConfig(init_seed=5))
    init, world = f"tcp://127.0.0.1:{free_port()}", engines + 1
    broadcaster = WeightBroadcaster(loopback(), bucket_bytes=4096)
    ctx = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"e{r}.json") for r in range(1, world)]
    procs = [ctx.Process(target=engine_process, args=(init, r, world, backend, broadcaster.address, outs[r - 1]))
             for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        broadcaster.group = GroupPublisher(open_group(init, 0, world, backend, timeout_s=60), backend)
        broadcaster.publish(model, 6)
        for p in procs:
            p.join(timeout=90)
            assert p.exitcode == 0
        want = digest(named_tensors(model))
        for out in outs:
            with open(out) as f:
                result = json.load(f)
            assert result == {"version": 6, "digest": want}
        assert broadcaster.engine_versions == {f"e{r}": 6 for r in range(1, world)}
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        broadcaster.close()


def test_a_gloo_group_delivers_a_verified_version_to_every_engine(tmp_path):
    run_group("gloo", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL weight broadcast needs two CUDA devices (learner and engine)")
def test_an_nccl_group_delivers_a_version_to_an_engine_on_another_gpu(tmp_path):
    run_group("nccl", tmp_path, engines=1)
