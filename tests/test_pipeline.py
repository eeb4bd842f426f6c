"""The whole pipeline as a user runs it: `asyncrl run` with real processes and sockets."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, port_overrides, run_cli


def read_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def mean_reward(records):
    return sum(r["reward_mean"] for r in records) / len(records)


def test_shortened_quickstart_learns(tmp_path):
    out = tmp_path / "q"
    result = run_cli("run", "configs/quickstart.yaml", "--out", str(out), "learner.steps=500", *port_overrides(), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(out)
    assert [r["step"] for r in records] == list(range(1, 501))
    tenth = len(records) // 10
    first, last = mean_reward(records[:tenth]), mean_reward(records[-tenth:])
    assert last - first >= 0.2, f"reward went from {first:.3f} to {last:.3f}"
    for key in ("step", "policy_version", "reward_mean", "staleness_mean", "staleness_max", "samples_per_s", "tokens_per_s", "wall_s", "loss"):
        assert key in records[-1]


@pytest.mark.parametrize("max_staleness, servers", [(0, 1), (1, 1), (4, 2)])
def test_staleness_never_exceeds_the_bound(tmp_path, max_staleness, servers):
    out = tmp_path / f"k{max_staleness}"
    result = run_cli(
        "run", "configs/quickstart.yaml", "--out", str(out), "learner.steps=60", f"max_staleness={max_staleness}",
        f"rollout.num_servers={servers}", "learner.groups_per_step=4", "rollout.groups_per_batch=4", *port_overrides(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(out)
    assert len(records) == 60
    assert max(r["staleness_max"] for r in records) <= max_staleness
    if max_staleness > 0:
        # The bound is used, not just respected: rollouts ran ahead of the learner.
        assert max(r["staleness_max"] for r in records) >= 1


def test_a_child_that_dies_stops_the_run_and_is_named(tmp_path):
    out = tmp_path / "bad"
    # A task name that does not exist makes every rollout server fail at start.
    result = run_cli("run", "configs/quickstart.yaml", "--out", str(out), "task.name=nope", *port_overrides(), timeout=120)
    assert result.returncode == 1
    assert "child rollout-0 exited with code 1 unexpectedly" in result.stderr
    assert "'nope' is not a task" in result.stderr


def test_ctrl_c_stops_every_child(tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "asyncrl.cli", "run", "configs/quickstart.yaml", "--out", str(out), "learner.steps=100000", *port_overrides()]
    # As from a terminal: a test runner started in the background (`cmd &` without job control) has
    # SIGINT ignored, and a child would inherit that and never see the Ctrl-C.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline, "run never started training"
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 3
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted" in stderr
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_separate_learner_and_rollout_processes_train_together(tmp_path):
    """`asyncrl learner` serves the queue itself; any number of `asyncrl rollout` join it by address."""
    ports = port_overrides()
    common = ["--config", "configs/quickstart.yaml", *ports, "learner.steps=30", "learner.groups_per_step=4"]
    base = [sys.executable, "-m", "asyncrl.cli"]
    learner = subprocess.Popen([*base, "learner", "--out", str(tmp_path), *common], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    rollouts = [
        subprocess.Popen([*base, "rollout", "--index", str(i), *common], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        _, learner_err = learner.communicate(timeout=120)
        assert learner.returncode == 0, learner_err[-2000:]
        for proc in rollouts:
            # The learner closes the queue when done; rollout servers then stop by themselves.
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err[-2000:]
    finally:
        for proc in [learner, *rollouts]:
            if proc.poll() is None:
                proc.kill()
    records = read_records(tmp_path)
    assert len(records) == 30
    assert max(r["staleness_max"] for r in records) <= 1


def test_groups_travel_through_rollout_arenas_and_each_is_trained_once(tmp_path):
    """queue.shm_min_bytes=0 sends every group through its rollout server's arena in the queue's
    shared-memory directory (docs/queue.md): two real rollout processes write, the learner reads."""
    out = tmp_path / "arenas"
    shm_base = tmp_path / "shm"
    shm_base.mkdir()
    result = run_cli(
        "run", "configs/quickstart.yaml", "--out", str(out), "learner.steps=40", "rollout.num_servers=2",
        "queue.shm_min_bytes=0", f"queue.shm_dir={shm_base}", *port_overrides(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(out)
    assert len(records) == 40
    last = records[-1]
    trained = [gid for line in (out / "trained_groups.jsonl").read_text().splitlines() for gid in json.loads(line)["group_ids"]]
    assert len(trained) == len(set(trained)) == 40 * 8
    assert last["queue/shm_in"] >= len(trained) and last["queue/shm_out"] >= len(trained)
    assert last["queue/balanced"] == 1.0
    assert list(shm_base.iterdir()) == []  # the queue removed its directory at exit
