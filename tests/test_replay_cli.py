"""`asyncrl replay` subcommands against a real redis-server filled by a real mirror."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from asyncrl.queue.client import QueueConsumer
from asyncrl.replay.cli import replay
from asyncrl.replay.store import PROX_FIELD, RunKeys
from conftest import ROOT, free_port
from replay_fixtures import Run, char_group, redis_server, redis_server_with_password  # noqa: F401  (fixtures)


@pytest.fixture
def run(redis_server):
    made = Run(redis_server.url)
    yield made
    made.mirror.close()


def test_runs_lists_each_run_with_size_and_counts(run):
    (info,) = json.loads(run.cli("runs", "--json").output)
    assert (info["run"], info["groups"], info["accepted"], info["dropped"], info["rejected"]) == ("r1", 8, 8, 1, 1)
    assert info["bytes"] > 0 and info["last_ts"] >= info["first_ts"] > 0
    assert "r1" in run.cli("runs").output


def test_ls_filters_by_version_range(run):
    assert run.ids("--min-version", "1", "--max-version", "2") == [g.group_id for g in run.groups[2:6]]


def test_ls_filters_by_reward_and_engine(run):
    assert run.ids("--min-reward", "0.5") == [g.group_id for g in run.groups if g.engine_id == "e0"]
    assert run.ids("--engine", "e1") == [g.group_id for g in run.groups if g.engine_id == "e1"]
    assert run.ids("--task", "reverse") == []


def test_ls_filters_by_staleness_at_arrival_or_at_drop(run):
    assert run.ids("--min-staleness", "1") == [run.stale.group_id] + [g.group_id for g in run.groups[6:]]


def test_ls_lists_dropped_groups_by_reason(run):
    assert run.ids("--reason", "stale") == [run.stale.group_id]
    assert "dropped (stale)" in run.cli("ls").output


def test_show_decodes_the_text_with_the_runs_tokenizer(run):
    out = run.cli("show", run.groups[1].group_id[:10]).output
    assert "prompt: '123='" in out and "response: '123'" in out and "response: '9'" in out
    assert "-0.5000" in out and "importance weights: unknown" in out


def test_show_prints_importance_weights_when_a_learner_stored_prox_logprobs(run, redis_server):
    import numpy as np

    group = run.groups[1]
    count = sum(len(s.tokens) for s in group.samples)
    prox = np.full(count, np.log(0.5), "<f4").tobytes()  # behav -0.5 -> weight exp(log 0.5 + 0.5)
    redis_server.client().hset(RunKeys("r1").group(group.group_id), PROX_FIELD, prox)
    out = run.cli("show", group.group_id).output
    assert f"{np.exp(np.log(0.5) + 0.5):.4f}" in out and "unknown" not in out


def test_stats_json_has_the_staleness_histogram_reward_by_version_and_counts(run):
    stats = json.loads(run.cli("stats", "--json").output)
    assert stats["staleness_at_arrival"] == {"0": 5, "1": 2}  # the stale drop is not an accepted group
    assert stats["reward_by_version"]["1"] == {"groups": 2, "mean": 0.5, "min": 0.0, "max": 1.0}
    assert stats["response_length"]["count"] == 16 and stats["response_length"]["max"] == 4
    assert stats["drops"] == {"stale": 1} and stats["rejects"] == {"bad_schema": 1}


def test_stats_prints_tables(run):
    out = run.cli("stats").output
    for title in ("staleness at arrival", "reward by behaviour version", "response length", "drops", "rejects"):
        assert title in out


def test_tail_prints_the_latest_events(run):
    lines = run.cli("tail", "-n", "2").output.splitlines()
    assert "drop" in lines[0] and run.stale.group_id in lines[0] and "(stale)" in lines[0]
    assert "reject" in lines[1] and "bad_schema" in lines[1]


def test_tail_follow_prints_events_as_a_live_run_writes_them(run):
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncrl.cli", "replay", "--url", run.url, "tail", "-f", "-n", "1", "--count", "2", "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert json.loads(proc.stdout.readline())["kind"] == "reject"  # the past event: it is following now
    late = [char_group(version=3), char_group(version=3)]
    for group in late:
        run.add(group)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert [json.loads(line)["group"] for line in out.splitlines()] == [g.group_id for g in late]


def test_export_jsonl_writes_one_row_per_sample(run, tmp_path):
    out = tmp_path / "r1.jsonl"
    assert run.cli("export", "--engine", "e0", "-o", str(out)).exit_code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and {r["engine"] for r in rows} == {"e0"}
    first = rows[0]
    assert first["group_id"] == run.groups[0].group_id and first["response_text"] == "123"
    assert first["versions"] == [0, 0, 0, 0] and first["behav_logprobs"] == [-0.5] * 4


def test_export_parquet_holds_the_same_rows(run, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "r1.parquet"
    assert run.cli("export", "-o", str(out)).exit_code == 0
    table = pq.read_table(out)
    assert table.num_rows == 16
    assert table.column("tokens").to_pylist()[1] == [12, 2]  # '9' then eos


def test_feed_rebases_versions_into_a_learners_queue(run, queue_server):
    server = queue_server(groups_per_step=2)
    result = run.cli("feed", "--address", server.address, "--min-version", "3")
    assert "fed 2 groups" in result.output
    consumer = QueueConsumer(server.address, "c0", vocab_size=32, timeout_s=5)
    lease, batch = consumer.get_batch(version=0, groups=2, timeout_s=5)
    assert sorted(g.group_id for g in batch) == sorted(g.group_id for g in run.groups[6:])
    assert all(int(s.versions.max()) == 0 for g in batch for s in g.samples)
    consumer.close()


def test_feed_keep_skips_groups_newer_than_the_learner(run, queue_server):
    server = queue_server()
    result = run.cli("feed", "--address", server.address, "--versions", "keep")
    assert "fed 2 groups" in result.output and "6 skipped as newer than the learner" in result.output


def test_rm_deletes_every_key_of_the_run(run, redis_server):
    run.mirror.close()
    assert "deleted run r1" in run.cli("rm", "r1", "--yes").output
    assert redis_server.client().keys("*") == []


def test_unreachable_redis_is_an_error_naming_the_url():
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(replay, ["--url", url, "runs"])
    assert result.exit_code == 1 and f"cannot reach Redis at {url}" in result.output


def test_missing_password_is_an_error_saying_where_it_goes(redis_server_with_password):
    url = f"redis://127.0.0.1:{redis_server_with_password.port}/0"
    result = CliRunner().invoke(replay, ["--url", url, "runs"])
    assert result.exit_code == 1 and "redis://[user]:PASSWORD@host" in result.output
