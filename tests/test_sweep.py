"""`asyncrl sweep`: the grid, real runs as subprocesses, resuming, tables and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from asyncrl.experiments.summary import aggregate, run_numbers, write_summary
from asyncrl.experiments.sweep import RunSpec, Sweep
from conftest import ROOT, run_cli

TINY = ["learner.steps=4", "learner.groups_per_step=2", "rollout.groups_per_batch=2", "sampling.n=4"]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Two staleness values, one seed, four steps: the smallest sweep that has a baseline and an async run."""
    out = tmp_path_factory.mktemp("sweep")
    result = run_cli("sweep", QUICKSTART, "--staleness", "1", "--correction", "tis", "--seeds", "1", "--out", str(out), *TINY, timeout=150)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


def test_sweep_always_includes_the_synchronous_baseline():
    grid = Sweep(QUICKSTART, Path("unused"), [4, 1], ["tis", "none"], 2)
    assert grid.staleness == [0, 1, 4]
    assert len(grid.runs) == 3 * 2 * 2
    assert RunSpec(0, "tis", 0) in grid.runs


def test_corrections_map_to_their_loss_settings():
    grid = Sweep(QUICKSTART, Path("unused"), [1], ["none", "decoupled", "tis"], 1)
    loss = {c: grid.resolve(RunSpec(1, c, 0)).loss for c in ("none", "decoupled", "tis")}
    assert loss["none"].objective == "behaviour"
    assert (loss["decoupled"].objective, loss["decoupled"].correction) == ("decoupled", "none")
    assert (loss["tis"].objective, loss["tis"].correction) == ("decoupled", "tis")


def test_an_unknown_correction_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="--correction ips is not a correction; choose from none,decoupled,tis"):
        Sweep(QUICKSTART, Path("unused"), [1], ["ips"], 1)


def test_a_bad_override_is_refused_before_any_run_starts(tmp_path):
    result = run_cli("sweep", QUICKSTART, "--staleness", "1", "--seeds", "1", "--out", str(tmp_path), "learner.stepz=3")
    assert result.returncode == 1
    assert "learner.stepz: unknown key" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_tiny_sweep_runs_every_point_with_its_own_directory(tiny_sweep):
    out, _ = tiny_sweep
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == ["k0-tis-s0", "k1-tis-s0"]
    for name in names:
        records = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert (out / "runs" / name / "done.json").exists()
    k0 = [json.loads(line) for line in (out / "runs" / "k0-tis-s0" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["staleness_max"] for r in k0) == 0


def test_tiny_sweep_writes_the_tables(tiny_sweep):
    out, result = tiny_sweep
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["correction"], r["staleness"]) for r in rows] == [("tis", "0"), ("tis", "1")]
    assert float(rows[0]["speedup"]) == 1.0
    for row in rows:
        for key in ("final_reward_mean", "reward_auc_mean", "samples_per_s_mean", "tokens_per_s_mean", "wall_s_mean",
                    "staleness_mean_mean", "staleness_max_mean", "ess_mean_mean", "dropped_total_mean"):
            assert row[key] != "", key
    md = (out / "summary.md").read_text()
    assert "| tis | 1 | 1 |" in md and "speedup vs K=0" in md
    assert "| tis | 0 | 1 |" in result.stdout


def test_tiny_sweep_draws_the_three_plots(tiny_sweep):
    out, _ = tiny_sweep
    for name in ("reward_vs_samples.png", "reward_vs_wall.png", "throughput_vs_staleness.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_resume_skips_finished_runs_and_reruns_unfinished_ones(tiny_sweep):
    out, _ = tiny_sweep
    finished = out / "runs" / "k0-tis-s0" / "metrics.jsonl"
    before = finished.stat().st_mtime_ns
    # An interrupted run: no done marker. It alone runs again.
    (out / "runs" / "k1-tis-s0" / "done.json").unlink()
    result = run_cli("sweep", QUICKSTART, "--staleness", "1", "--correction", "tis", "--seeds", "1", "--out", str(out), *TINY, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "k0-tis-s0: finished before, skipped" in result.stderr
    assert "k1-tis-s0: running 4 steps" in result.stderr
    assert finished.stat().st_mtime_ns == before
    assert (out / "runs" / "k1-tis-s0" / "done.json").exists()


def _fake_run(root: Path, name: str, rewards: list[float], wall: float, dropped: dict) -> None:
    run = root / "runs" / name
    (run / "logs").mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for i, r in enumerate(rewards):
            f.write(json.dumps({"step": i + 1, "reward_mean": r, "samples": 10, "tokens": 40, "wall_s": wall * (i + 1) / len(rewards),
                                "staleness_mean": 0.5, "staleness_max": 1, "ess": 0.9}) + "\n")
    (run / "logs" / "queue.log").write_text(f'2025 asyncrl.queue INFO final stats {json.dumps({"dropped": dropped})}\n')


def test_summary_numbers_follow_their_definitions(tmp_path):
    """Runs written by hand: final reward over the last 10%, AUC over all steps, throughput from wall time, drops from the queue log."""
    rewards = [0.0] * 10 + [1.0] * 10
    _fake_run(tmp_path, "k0-tis-s0", rewards, wall=20.0, dropped={"shutdown": 3})
    _fake_run(tmp_path, "k0-tis-s1", rewards, wall=20.0, dropped={})
    _fake_run(tmp_path, "k2-tis-s0", rewards, wall=10.0, dropped={"stale": 2, "shutdown": 1})
    plan = {"runs": [{"name": n, "staleness": k, "correction": "tis", "seed": s} for n, k, s in
                     (("k0-tis-s0", 0, 0), ("k0-tis-s1", 0, 1), ("k2-tis-s0", 2, 0))]}
    (tmp_path / "sweep.json").write_text(json.dumps(plan))
    numbers = run_numbers(tmp_path / "runs" / "k2-tis-s0")
    assert numbers["final_reward"] == 1.0 and numbers["reward_auc"] == 0.5
    assert numbers["samples_per_s"] == 200 / 10.0 and numbers["tokens_per_s"] == 800 / 10.0
    assert (numbers["dropped_stale"], numbers["dropped_total"]) == (2, 3)
    rows = write_summary(tmp_path)
    assert [(r.staleness, r.seeds) for r in rows] == [(0, 2), (2, 1)]
    assert rows[0].spread["final_reward"] == 0.0 and rows[0].mean["dropped_total"] == 1.5
    assert rows[1].speedup == 2.0


def test_summary_of_a_directory_that_is_no_sweep_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a sweep directory"):
        write_summary(tmp_path)


def test_aggregate_of_no_runs_is_empty():
    assert aggregate([]) == []
