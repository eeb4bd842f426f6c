"""The replay mirror's writer process (what the learner runs) and the array budget, against a real
redis-server: records arrive, the books balance when the writer or Redis dies, and groups beyond
the budget are kept without their arrays."""

import os
import signal
import time

from click.testing import CliRunner

from asyncrl.queue.client import QueueConsumer, QueueProducer
from asyncrl.queue.codec import encode_group
from asyncrl.replay.cli import replay
from asyncrl.replay.mirror import ReplayMirror
from asyncrl.replay.process import MirrorProcess
from asyncrl.replay.queries import feed
from asyncrl.replay.store import ArraysNotKept, ReplayStore, RunKeys
from conftest import free_port
from replay_fixtures import entry_of, redis_server  # noqa: F401  (fixtures)
from test_codec import make_group


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_the_writer_process_writes_every_group_and_the_books_balance(redis_server):
    mirror = MirrorProcess(redis_server.url, "r1")
    try:
        assert mirror._proc.pid != os.getpid()
        groups = [make_group() for _ in range(20)]
        for group in groups:
            mirror.on_accept(entry_of(group))
        mirror.on_reject("bad_value", "behav_logprobs hold NaN")
        assert mirror.flush(10)
        store = ReplayStore.open(redis_server.url)
        assert store.group_ids("r1") == [g.group_id for g in groups]
        back, summary, _ = store.load_group("r1", groups[3].group_id)
        assert encode_group(back) == encode_group(groups[3]) and summary["arrays"] == "kept"
        assert store.run_info("r1")["rejected"] == 1
    finally:
        stats = mirror.close()
    assert (stats["written"], stats["lost"]) == (21, 0)
    assert mirror._proc.returncode == 0 and not os.path.exists(mirror._dir)


def test_a_killed_writer_is_replaced_and_what_it_took_is_counted_lost(redis_server):
    mirror = MirrorProcess(redis_server.url, "r1", restart_backoff_s=0.05)
    first = [make_group() for _ in range(5)]
    for group in first:
        mirror.on_accept(entry_of(group))
    assert mirror.flush(10)
    os.kill(mirror._proc.pid, signal.SIGKILL)
    old_pid = mirror._proc.pid
    assert wait_for(lambda: mirror._proc.poll() is not None)
    time.sleep(0.1)
    later = [make_group() for _ in range(5)]
    for group in later:
        mirror.on_accept(entry_of(group))
    mirror.tick(time.monotonic())  # the queue's loop calls it: it sends the batch and starts a new writer
    assert mirror._proc.pid != old_pid and mirror.restarts == 1
    assert mirror.flush(30)
    stats = mirror.close()
    assert stats["written"] + stats["lost"] == 10 and stats["written"] >= 9 and stats["writer_restarts"] == 1
    stored = ReplayStore.open(redis_server.url).group_ids("r1")
    assert set(stored) <= {g.group_id for g in first + later} and len(stored) == stats["written"]


def test_records_offered_to_a_stuck_writer_are_lost_at_the_socket_and_counted():
    mirror = MirrorProcess(f"redis://127.0.0.1:{free_port()}/0", "r1", buffer=8)
    os.kill(mirror._proc.pid, signal.SIGSTOP)  # alive but not reading: the socket fills
    # About 1.3 MB of records: past the one message each end holds (buffer=8) plus whatever the
    # kernel's socket buffer takes (~200 KB; 200 records of these small groups used to fit in it).
    offered = 5000
    try:
        started = time.perf_counter()
        for _ in range(offered):
            mirror.on_accept(entry_of(make_group()))
        assert time.perf_counter() - started < 2.0  # the queue's thread never waits
        assert mirror.lost_socket_full > 0
    finally:
        os.kill(mirror._proc.pid, signal.SIGCONT)
    stats = mirror.close(timeout_s=5)
    assert stats["written"] == 0 and stats["lost"] == offered


def test_a_writer_whose_learner_died_stops_by_itself(redis_server, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "learner.py"
    script.write_text(
        "import sys, time\n"
        "sys.path[:0] = [" + repr(os.path.dirname(__file__)) + "]\n"
        "from asyncrl.replay.process import MirrorProcess\n"
        "m = MirrorProcess(sys.argv[1], 'orphan')\n"
        "print(m._proc.pid, m._dir, flush=True)\n"
        "time.sleep(60)\n")
    learner = subprocess.Popen([sys.executable, str(script), redis_server.url], stdout=subprocess.PIPE, text=True)
    pid, directory = learner.stdout.readline().split()
    writer_pid = int(pid)
    assert os.path.isdir(directory)
    learner.kill()
    learner.wait()
    assert wait_for(lambda: not os.path.exists(f"/proc/{writer_pid}") or
                    open(f"/proc/{writer_pid}/stat").read().split()[2] == "Z", 10)
    assert wait_for(lambda: not os.path.exists(directory), 5)  # the writer removed the learner's sockets


def test_groups_beyond_the_array_budget_keep_their_summary_without_arrays(redis_server, queue_server, tmp_path):
    group_bytes = sum(len(f) for f in encode_group(make_group())[1:])
    mirror = ReplayMirror(redis_server.url, "r1", array_bytes_per_s=group_bytes * 2.5)
    groups = [make_group() for _ in range(10)]
    for group in groups:
        mirror.on_accept(entry_of(group))  # within far less than a second: the first 3 fit the bucket
    stats = mirror.close()
    assert stats["written"] == 10 and stats["arrays_skipped"] == 7
    store = ReplayStore.open(redis_server.url)
    assert store.group_ids("r1") == [g.group_id for g in groups]  # every group is listed
    back, summary, _ = store.load_group("r1", groups[0].group_id)
    assert encode_group(back) == encode_group(groups[0])
    try:
        store.load_group("r1", groups[-1].group_id)
        raise AssertionError("a group without arrays loaded")
    except ArraysNotKept as exc:
        assert exc.summary["arrays"] == "skipped" and exc.summary["samples"] == 3 and exc.summary["tokens"] == 7
    assert store.run_info("r1")["arrays_skipped"] == 7
    key = RunKeys("r1").group(groups[-1].group_id)
    fields = {k.decode() for k in store.r.hkeys(key)}
    assert not any(f.startswith("frame.") for f in fields)  # its summary says all its header would
    assert {"finish", "lens", "rewards", "seed", "ref", "timings", "task", "engine"} <= fields

    runner = CliRunner()
    shown = runner.invoke(replay, ["--url", redis_server.url, "show", groups[-1].group_id])
    assert shown.exit_code == 0 and "without its tokens and log-probs" in shown.output and "3 samples" in shown.output
    exported = runner.invoke(replay, ["--url", redis_server.url, "export", "--run", "r1", "-o", str(tmp_path / "o.jsonl")])
    assert exported.exit_code == 0 and "7 groups skipped" in exported.output and "wrote 9 samples" in exported.output
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 9

    server = queue_server(groups_per_step=1)
    producer = QueueProducer(server.address, "feed", timeout_s=5)
    result = feed(store, "r1", list(store.summaries("r1", store.group_ids("r1"))), producer)
    producer.close()
    assert (result.sent, result.skipped_no_arrays) == (3, 7) and server.snapshot()["accepted"] == 3


def test_redis_killed_mid_run_leaves_training_unaffected_and_the_writer_counts_the_losses(queue_server, redis_server):
    server = queue_server(groups_per_step=1)
    mirror = MirrorProcess(redis_server.url, "r1", learner_version=lambda: server.learner_version)
    server.observers.append(mirror)  # the queue's loop ticks it: batches go to the writer every 50 ms
    producer = QueueProducer(server.address, "p0", timeout_s=5)
    consumer = QueueConsumer(server.address, "c0", vocab_size=32, timeout_s=5)
    trained = 0
    for i in range(10):
        if i == 5:
            assert mirror.flush(10)
            redis_server.kill()
        producer.put(make_group(version=0), ticketed=False)
        lease, _ = consumer.get_batch(version=0, groups=1, timeout_s=5)
        trained += consumer.ack(lease)
    assert trained == 10 and consumer.stats()["accepted"] == 10
    assert mirror.flush(30)  # the writer gave up on Redis for those 5 (redis-py's retries first)
    stats = mirror.close(timeout_s=10)
    producer.close()
    consumer.close()
    assert (stats["written"], stats["lost"]) == (5, 5) and stats["lost_redis"] == 5
