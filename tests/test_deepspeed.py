"""DeepSpeed ZeRO across two ranks over gloo on CPU (and NCCL on GPUs): the same weights as plain torch.

Each test launches real ranks with torchrun; this file is also the rank program (see __main__).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port, loopback

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install 'asyncrl[deepspeed]'")

pytestmark = pytest.mark.slow  # the first run on a machine JIT-builds DeepSpeed's CPU comm op (about a minute)

STEPS = 2
BUDGET = "learner.micro_batch_tokens=20"  # two or three rows per micro-batch: accumulation across ranks


def _torchrun(nproc: int, args: list[str], tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        # DeepSpeed JIT-builds its shared-memory comm op on CPU once per extensions directory
        # (about a minute); a directory that outlives the test builds it once per machine.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".pytest_cache" / "torch_extensions")),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "tests"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _torch_reference(overrides: list[str]) -> dict[str, torch.Tensor]:
    from test_learner import groups_for_training, make_learner

    learner = make_learner(*overrides)
    try:
        for seed in range(STEPS):
            learner.step(groups_for_training(seed=seed))
        return {k: v.clone() for k, v in learner.model.state_dict().items()}
    finally:
        learner.close()


def _zero_matches_torch(stage: int, tmp_path: Path, device: str = "cpu") -> None:
    out = tmp_path / "weights.pt"
    result = _torchrun(2, [__file__, str(stage), device, str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    zero = torch.load(out, weights_only=True)
    reference = _torch_reference([BUDGET, f"learner.device={device}"])
    assert zero.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(zero[name].to(tensor.device), tensor, rtol=1e-4, atol=1e-5, msg=name)
    published = torch.load(str(out) + ".published", weights_only=True)
    # The tied output head is the embedding and travels once.
    assert set(published) == set(reference) - {"lm_head.weight"}
    for name, tensor in published.items():
        torch.testing.assert_close(tensor.to(reference[name].device), reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_zero2_on_two_cpu_ranks_trains_the_same_weights_as_torch(tmp_path):
    _zero_matches_torch(2, tmp_path)


def test_zero3_on_two_cpu_ranks_trains_the_same_weights_as_torch(tmp_path):
    _zero_matches_torch(3, tmp_path)


def test_zero3_learner_on_two_ranks_trains_batches_from_the_queue(tmp_path, queue_server):
    from asyncrl.metrics import read_metrics
    from asyncrl.queue.client import QueueProducer
    from test_learner import TINY, groups_for_training

    server = queue_server(max_staleness=100, groups_per_step=3, vocab_size=32)
    producer = QueueProducer(server.address, "p0", timeout_s=5)
    for group in groups_for_training(count=6, seed=4):
        producer.put(group, ticketed=False)
    args = [
        "-m", "asyncrl.cli", "learner", "--no-queue", "--out", str(tmp_path), *TINY, "learner.backend=deepspeed",
        "learner.zero_stage=3", "learner.groups_per_step=3", "sampling.n=4", "max_staleness=100", "learner.steps=2",
        f"queue.address={server.address}", f"weights.address={loopback()}", BUDGET,
    ]
    result = _torchrun(2, args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["policy_version"] for r in records] == [1, 2]
    assert server.snapshot()["acknowledged"] == 6


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_zero3_on_two_gpus_trains_the_same_weights_as_torch(tmp_path):
    _zero_matches_torch(3, tmp_path, device="cuda")


def _rank_main(stage: int, device: str, out: str) -> None:
    """One rank: train STEPS steps with ZeRO `stage`, rank 0 saves the gathered weights."""
    from test_learner import groups_for_training, make_learner

    learner = make_learner("learner.backend=deepspeed", f"learner.zero_stage={stage}", f"learner.device={device}", BUDGET)
    for seed in range(STEPS):
        learner.step(groups_for_training(seed=seed))  # the same groups on every rank, as broadcast_groups gives them
    # What the broadcaster is fed: every rank walks it (ZeRO-3 gathers one parameter at a time).
    published = {name: tensor.detach().cpu().clone() for name, tensor in learner.backend.publish_tensors()}
    state = learner.backend.full_state_dict()
    if learner.ranks.is_main:
        torch.save({k: v.cpu() for k, v in state.items()}, out)
        torch.save(published, out + ".published")
    learner.close()
    torch.distributed.destroy_process_group()
    os._exit(0)  # ZeRO-3's hooks may abort a normal interpreter exit


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
