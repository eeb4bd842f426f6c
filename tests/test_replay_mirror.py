"""The Redis replay mirror against a real queue and a real redis-server: what it writes, what it
keeps, and what happens to the queue when Redis goes away."""

import json
import threading
import time

import pytest

from asyncrl.config import load_config
from asyncrl.queue.client import QueueConsumer, QueueProducer, QueueRequestError
from asyncrl.queue.codec import encode_group
from asyncrl.replay.mirror import ReplayMirror
from asyncrl.replay.store import RUNS_KEY, ReplayStore, RunKeys
from conftest import free_port, loopback
from replay_fixtures import char_group, entry_of, redis_server, redis_server_with_password  # noqa: F401  (fixtures)
from test_codec import make_group


@pytest.fixture
def mirrored_queue(queue_server, redis_server):
    """(server, producer, consumer, mirror): a queue whose decisions are mirrored to redis_server."""
    made = []

    def start(**settings):
        server = queue_server(**{"groups_per_step": 1, **settings})
        mirror = ReplayMirror(redis_server.url, "r1", learner_version=lambda: server.learner_version)
        server.observers.append(mirror)
        producer = QueueProducer(server.address, "p0", timeout_s=5)
        consumer = QueueConsumer(server.address, "c0", vocab_size=32, timeout_s=5)
        made.append((mirror, producer, consumer))
        return server, producer, consumer, mirror

    yield start
    for mirror, producer, consumer in made:
        mirror.close()
        producer.close()
        consumer.close()


def test_accepted_group_round_trips_through_redis(mirrored_queue, redis_server):
    server, producer, consumer, mirror = mirrored_queue()
    group = make_group(version=0)
    producer.put(group, ticketed=False)
    assert mirror.flush(5)
    back, summary, prox = ReplayStore.open(redis_server.url).load_group("r1", group.group_id)
    assert encode_group(back) == encode_group(group)
    assert (summary["status"], summary["version"], summary["samples"], summary["tokens"]) == ("accepted", 0, 3, 7)
    assert prox is None


def test_readable_fields_keep_their_exact_text(redis_server):
    """The write script gets records as msgpack (Lua numbers are doubles): a 64-bit seed, a
    non-ASCII task and a float reward must still read back exactly as Python wrote them."""
    group = make_group(version=1)
    group.seed, group.task, group.reference = 2**63 - 25, "réponse-à-tout", "ünï"
    for s, reward in zip(group.samples, (0.1, 1 / 3, 2.5)):
        s.reward = reward
    mirror = ReplayMirror(redis_server.url, "r1", array_bytes_per_s=None)
    mirror.on_accept(entry_of(group))
    assert mirror.flush(5)
    mirror.close()
    fields = {k.decode(): v.decode() for k, v in redis_server.client().hgetall(RunKeys("r1").group(group.group_id)).items()
              if not k.startswith(b"frame.")}
    assert fields["seed"] == str(2**63 - 25) and fields["task"] == "réponse-à-tout" and fields["ref"] == "ünï"
    assert fields["reward"] == repr((0.1 + 1 / 3 + 2.5) / 3) and json.loads(fields["rewards"]) == [0.1, 1 / 3, 2.5]
    compact = json.JSONEncoder(separators=(",", ":")).encode  # the list fields are compact JSON, as written before
    assert fields["rewards"] == compact([0.1, 1 / 3, 2.5])
    assert fields["lens"] == compact([len(s.tokens) for s in group.samples])
    assert fields["finish"] == compact([s.finish_reason for s in group.samples])
    assert (fields["version"], fields["samples"], fields["tokens"], fields["seq"]) == ("1", "3", "7", "1")
    (_, event), = redis_server.client().xrange(RunKeys("r1").events)
    assert {k.decode(): v.decode() for k, v in event.items()} == {
        "kind": "accept", "group": group.group_id, "version": "1", "staleness": "0", "reward": fields["reward"]}
    (_, completed), = ReplayStore.open(redis_server.url).events("r1")  # as `tail` reads it: with the group's fields
    assert (completed["task"], completed["samples"], completed["engine"]) == ("réponse-à-tout", "3", fields["engine"])


def test_list_fields_are_the_json_of_what_the_header_holds():
    """group_args joins number lists itself; the text must be what json.dumps writes (ints stay
    ints, floats keep repr's digits), and a finish list outside the known reasons still gets JSON."""
    from asyncrl.queue.codec import pack
    from asyncrl.replay.script import group_args

    header = {"id": "g1", "task": "t", "engine": "e", "seed": 3, "ref": "", "timings": {"sent": 1.5, "ü": 2},
              "lens": [3, 11000], "rewards": [1, -0.1, 1e-07, 2.5e20], "finish": ["stop", 'odd"one']}
    record = ("accept", "g1", "", [pack(header)], 4, 12.5, 2, 3)
    fields = group_args(record, [])[6]
    got = dict(zip(fields[0::2], fields[1::2]))
    compact = json.JSONEncoder(separators=(",", ":")).encode
    for name in ("lens", "rewards", "finish", "timings"):
        assert got[name] == compact(header[name]), name
    assert json.loads(got["finish"]) == ["stop", 'odd"one']


def test_dropped_group_is_recorded_with_its_reason(mirrored_queue, redis_server):
    server, producer, consumer, mirror = mirrored_queue(max_staleness=0)
    old, fresh = make_group(version=0), make_group(version=2)
    consumer.set_version(2)
    producer.put(old, ticketed=False)
    producer.put(fresh, ticketed=False)
    consumer.get_batch(version=2, groups=1, timeout_s=5)
    assert mirror.flush(5)
    store = ReplayStore.open(redis_server.url)
    _, summary, _ = store.load_group("r1", old.group_id)
    assert (summary["status"], summary["reason"], summary["staleness"]) == ("dropped", "stale", 2)
    assert store.counts("r1")[0] == {"stale": 1}
    assert [e["kind"] for _, e in store.events("r1")] == ["accept", "accept", "drop"]


def test_rejected_request_is_counted_by_code(mirrored_queue, redis_server):
    server, producer, consumer, mirror = mirrored_queue()
    with pytest.raises(QueueRequestError):
        producer.put(make_group(version=5), ticketed=False)
    assert mirror.flush(5)
    store = ReplayStore.open(redis_server.url)
    assert store.counts("r1")[1] == {"future_version": 1}
    (_, event), = store.events("r1")
    assert event["kind"] == "reject" and "newer than the learner" in event["detail"]


def test_observer_returns_at_once_and_counts_losses_when_redis_is_unreachable():
    mirror = ReplayMirror(f"redis://127.0.0.1:{free_port()}/0", "r1", buffer=4)
    entry = entry_of(make_group(lens=(1 << 17, 1 << 17)))  # about 3 MiB
    started = time.perf_counter()
    for _ in range(50):
        mirror.on_accept(entry)
    assert time.perf_counter() - started < 0.5
    stats = mirror.close(timeout_s=10)
    assert stats["written"] == 0 and stats["lost"] == 50 and stats["lost_buffer_full"] >= 46


def test_redis_killed_mid_run_leaves_the_queue_unaffected_and_counts_lost_records(mirrored_queue, redis_server):
    server, producer, consumer, mirror = mirrored_queue()
    trained = 0
    for i in range(10):
        if i == 5:
            assert mirror.flush(5)
            redis_server.kill()
        producer.put(make_group(version=0), ticketed=False)
        lease, batch = consumer.get_batch(version=0, groups=1, timeout_s=5)
        trained += consumer.ack(lease)
    assert trained == 10 and consumer.stats()["accepted"] == 10
    stats = mirror.close(timeout_s=10)
    assert (stats["written"], stats["lost"]) == (5, 5)


def test_mirror_reconnects_to_a_restarted_redis_and_records_its_losses(redis_server):
    mirror = ReplayMirror(redis_server.url, "r1")
    mirror.on_accept(entry_of(make_group()))
    assert mirror.flush(5)
    redis_server.kill()
    for _ in range(3):
        mirror.on_accept(entry_of(make_group()))
    assert mirror.flush(10) and mirror.stats()["lost"] == 3
    redis_server.start()
    later = [make_group() for _ in range(4)]
    for group in later:
        mirror.on_accept(entry_of(group))
    assert mirror.flush(10)
    store = ReplayStore.open(redis_server.url)
    assert store.group_ids("r1") == [g.group_id for g in later]
    assert store.run_info("r1")["lost"] == 3


def test_maxlen_keeps_the_newest_groups_and_bounds_the_stream(redis_server):
    mirror = ReplayMirror(redis_server.url, "r1", maxlen=10)
    groups = [make_group() for _ in range(40)]
    for group in groups:
        mirror.on_accept(entry_of(group))
    mirror.close()
    store = ReplayStore.open(redis_server.url)
    assert store.group_ids("r1") == [g.group_id for g in groups[-10:]]
    assert 10 <= store.r.xlen(RunKeys("r1").events) <= 10 + 8  # MAXLEN ~ trims whole stream nodes (8 here)
    assert len(list(store.r.scan_iter(match=RunKeys("r1").group_prefix + "*"))) == 10


def test_max_bytes_deletes_the_oldest_groups(redis_server):
    nbytes = sum(len(f) for f in encode_group(make_group()))
    mirror = ReplayMirror(redis_server.url, "r1", max_bytes=3 * nbytes + 1)
    groups = [make_group() for _ in range(7)]
    for group in groups:
        mirror.on_accept(entry_of(group))
    mirror.close()
    store = ReplayStore.open(redis_server.url)
    assert store.group_ids("r1") == [g.group_id for g in groups[-3:]]
    assert store.run_info("r1")["bytes"] == 3 * nbytes


def test_a_new_run_deletes_the_least_recently_written_beyond_max_runs(redis_server):
    for name in ("old", "mid", "new"):
        mirror = ReplayMirror(redis_server.url, name, max_runs=2)
        mirror.on_accept(entry_of(make_group()))
        mirror.close()
        time.sleep(0.01)
    store = ReplayStore.open(redis_server.url)
    assert store.runs() == ["new", "mid"]
    assert not list(store.r.scan_iter(match=RunKeys("old").pattern()))


def test_password_in_the_url_authenticates(redis_server_with_password):
    mirror = ReplayMirror(redis_server_with_password.url, "r1")
    group = make_group()
    mirror.on_accept(entry_of(group))
    assert mirror.close()["written"] == 1
    assert redis_server_with_password.client().zcard(RunKeys("r1").by_seq) == 1


def test_the_config_recorded_in_redis_holds_no_password(redis_server_with_password):
    url = redis_server_with_password.url
    cfg = load_config(None, [f"replay.redis_url={url}", "run_name=secret"])
    mirror = ReplayMirror.from_config(cfg)
    group = make_group()
    mirror.on_accept(entry_of(group))
    assert mirror.close()["written"] == 1
    stored = redis_server_with_password.client().hgetall(RunKeys("secret").meta)
    assert redis_server_with_password.password.encode() not in b"".join(stored.values())
    assert json.loads(stored[b"config"])["replay"]["redis_url"].startswith("redis://:***@127.0.0.1")


def test_queue_serve_mirrors_when_replay_redis_url_is_set(redis_server):
    from asyncrl.cli import _serve_queue

    cfg = load_config(None, [f"queue.address={loopback()}", f"replay.redis_url={redis_server.url}", "run_name=wired"])
    stop = threading.Event()
    thread = threading.Thread(target=_serve_queue, args=(cfg, stop.is_set), daemon=True)
    thread.start()
    producer = QueueProducer(cfg.queue.address, "p0", timeout_s=5)
    group = char_group()
    producer.put(group, ticketed=False)
    producer.close()
    stop.set()
    thread.join(5)
    store = ReplayStore.open(redis_server.url)
    assert store.group_ids("wired") == [group.group_id]
    assert store.run_config("wired")["run_name"] == "wired"
    assert redis_server.client().zscore(RUNS_KEY, "wired") is not None
