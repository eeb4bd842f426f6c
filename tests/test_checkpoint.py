"""Learner checkpoints: round trip, and resume against a real queue without training a group twice."""

import json
import signal
import subprocess
import sys
import time

import torch

from asyncrl.learner.checkpoint import CheckpointMeta, checkpoint_dir, latest_checkpoint, save_checkpoint
from asyncrl.queue.client import QueueProducer
from conftest import ROOT, loopback
from test_learner import TINY, groups_for_training, make_learner


def test_checkpoint_round_trips_weights_optimizer_and_version(tmp_path):
    learner = make_learner("learner.checkpoint_every=1", out_dir=tmp_path)
    try:
        learner.step(groups_for_training(seed=1))
        learner.step(groups_for_training(seed=2))
        path = learner.checkpoint()
        weights = {k: v.clone() for k, v in learner.model.state_dict().items()}
        moments = {k: v["exp_avg"].clone() for k, v in enumerate(learner.backend.optimizer.state.values())}
    finally:
        learner.close()
    assert path == latest_checkpoint(checkpoint_dir(tmp_path)) and path.name == "step-00000002"
    resumed = make_learner("learner.checkpoint_every=1", out_dir=tmp_path, resume=True)
    try:
        assert resumed.version == 2
        for name, tensor in resumed.model.state_dict().items():
            torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)
        for k, state in enumerate(resumed.backend.optimizer.state.values()):
            torch.testing.assert_close(state["exp_avg"], moments[k], rtol=0, atol=0)
    finally:
        resumed.close()


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    learner = make_learner("learner.checkpoint_every=1", "learner.keep_checkpoints=2", out_dir=tmp_path)
    try:
        for seed in range(3):
            learner.step(groups_for_training(seed=seed))
            learner.checkpoint()
    finally:
        learner.close()
    names = sorted(p.name for p in checkpoint_dir(tmp_path).iterdir())
    assert names == ["step-00000002", "step-00000003"]


def test_groups_of_a_checkpoint_are_not_trained_again_when_their_ack_was_lost(tmp_path, queue_server):
    server = queue_server(max_staleness=100, groups_per_step=3, lease_s=0.3, vocab_size=32)
    producer = QueueProducer(server.address, "p0", timeout_s=5)
    first_batch = groups_for_training(seed=1)
    for group in first_batch:
        producer.put(group, ticketed=False)
    overrides = ["learner.checkpoint_every=1", "max_staleness=100", f"queue.address={server.address}", "learner.steps=2"]
    learner = make_learner(*overrides, out_dir=tmp_path)
    try:
        learner.consumer.hello("consumer")
        trained = learner._next_batch(lambda: False)
        learner.step(trained)
        # The learner dies after writing the checkpoint and before acknowledging its lease.
        lease, ids = learner.pending[0]
        save_checkpoint(checkpoint_dir(tmp_path), learner.backend, CheckpointMeta(1, [lease], ids), learner.ranks)
    finally:
        learner.close()
    time.sleep(0.5)  # the lease expires: the queue offers the trained groups again, first
    for group in groups_for_training(seed=2):
        producer.put(group, ticketed=False)
    resumed = make_learner(*overrides, out_dir=tmp_path, resume=True)
    try:
        assert resumed.run() == 2
    finally:
        resumed.close()
    ledger = [json.loads(line) for line in (tmp_path / "trained_groups.jsonl").read_text().splitlines()]
    assert [entry["version"] for entry in ledger] == [2]
    assert set(ledger[0]["group_ids"]).isdisjoint(g.group_id for g in first_batch)
    stats = server.snapshot()
    # The resumed learner's hello named the checkpoint's groups as trained: settled, not delivered again.
    assert (stats["redelivered"], stats["acknowledged"], stats["already_trained"]) == (3, 3, 3)


def _lineage(ledger_path) -> dict[int, list[str]]:
    """Groups in the weights the run ended with: a resumed run overwrites the versions it redid."""
    lineage = {}
    for line in ledger_path.read_text().splitlines():
        entry = json.loads(line)
        lineage[entry["version"]] = entry["group_ids"]
    return lineage


def test_killed_learner_resumes_at_its_checkpoint_and_trains_no_group_twice(tmp_path, queue_server):
    server = queue_server(max_staleness=100, groups_per_step=2, lease_s=1.0, vocab_size=32)
    producer = QueueProducer(server.address, "p0", timeout_s=5)
    # 8 steps of 2 groups, plus room for the groups of steps lost with the killed learner.
    for group in groups_for_training(count=30, n=4, seed=3):
        producer.put(group, ticketed=False)
    args = [
        sys.executable, "-m", "asyncrl.cli", "learner", "--no-queue", "--out", str(tmp_path), *TINY,
        "learner.groups_per_step=2", "sampling.n=4", "max_staleness=100", "learner.steps=8",
        "learner.checkpoint_every=2", f"queue.address={server.address}", f"weights.address={loopback()}",
    ]
    ledger = tmp_path / "trained_groups.jsonl"
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not ledger.exists() or len(ledger.read_text().splitlines()) < 3):
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = len(ledger.read_text().splitlines())
    checkpointed = int(latest_checkpoint(checkpoint_dir(tmp_path)).name.split("-")[1])
    second = subprocess.run([*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert second.returncode == 0, second.stderr[-2000:]
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert killed_at >= 3 and checkpointed >= 2
    assert entries[killed_at]["version"] == checkpointed + 1  # the resumed learner continues at the checkpoint
    lineage = _lineage(ledger)
    assert sorted(lineage) == list(range(1, 9))
    ids = [gid for group_ids in lineage.values() for gid in group_ids]
    assert len(ids) == len(set(ids)) == 16
