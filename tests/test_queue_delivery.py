"""Delivery guarantees with real producer processes: every group trained once or dropped with a reason,
memory bounded under a stalled learner, tickets of vanished engines returned, ranks sharing a step."""

import multiprocessing as mp
import time

import numpy as np

from asyncrl.queue.client import QueueConsumer, QueueProducer
from asyncrl.queue.codec import encode_group
from test_codec import make_group

_SPAWN = mp.get_context("spawn")  # no forked copies of the server thread's ZeroMQ context


def produce_with_tickets(address: str, name: str, total: int, results) -> None:
    """A rollout engine's loop: tickets at the learner's version, batched puts, and a resend of each batch."""
    producer = QueueProducer(address, name, timeout_s=10)
    sent = []
    while len(sent) < total:
        granted, closed = producer.ticket(producer.learner_version, min(4, total - len(sent)))
        if closed:
            break
        if granted == 0:
            time.sleep(0.002)
            continue
        groups = [make_group(version=producer.learner_version) for _ in range(granted)]
        assert producer.put_many(groups) == ["accepted"] * granted
        # As if the reply had been lost: the resend must not be accepted twice.
        assert producer.put_many(groups) == ["duplicate"] * granted
        sent.extend(g.group_id for g in groups)
    producer.close()
    results.put((name, sent))


def produce_blocking(address: str, name: str, total: int, results) -> None:
    producer = QueueProducer(address, name, timeout_s=10)
    ids = []
    for _ in range(total):
        group = make_group(version=0, lens=(100, 100, 100))
        producer.put(group, ticketed=False)
        ids.append(group.group_id)
    producer.close()
    results.put((name, ids))


def _start(target, address, count, per_producer):
    results = _SPAWN.Queue()
    procs = [_SPAWN.Process(target=target, args=(address, f"p{i}", per_producer, results)) for i in range(count)]
    for p in procs:
        p.start()
    return procs, results


def _join(procs, results):
    sent = dict(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    return sent


def test_many_producer_processes_every_group_trained_exactly_once(queue_server):
    server = queue_server(max_staleness=1, groups_per_step=4)
    procs, results = _start(produce_with_tickets, server.address, count=3, per_producer=12)
    consumer = QueueConsumer(server.address, "learner", vocab_size=32, timeout_s=10)
    trained, version, dropped = [], 0, 0
    while len(trained) + dropped < 36:
        want = min(4, 36 - len(trained) - dropped)
        lease, batch = consumer.get_batch(version, groups=want, timeout_s=20)
        assert len(batch) == want and max(version - g.behaviour_version for g in batch) <= 1
        trained.extend(g.group_id for g in batch)
        consumer.ack(lease)
        version += 1
        consumer.set_version(version)
        # Tickets bound staleness when groups arrive in ticket order; a producer process that lags
        # (a loaded machine) can deliver a group after a newer engine's, which the check at
        # consumption then drops as stale, with its reason: trained once or dropped, never both.
        dropped = sum(consumer.stats()["dropped"].values())
    sent = _join(procs, results)
    sent_ids = sorted(i for ids in sent.values() for i in ids)
    assert len(set(trained)) == len(trained) and set(trained) <= set(sent_ids) and len(sent_ids) == 36
    stats = consumer.stats()
    assert (stats["accepted"], stats["acknowledged"], stats["duplicates"]) == (36, 36 - dropped, 36)
    assert set(stats["dropped"]) <= {"stale"} and stats["depth"] == 0 and stats["leased"] == 0
    assert stats["balanced"] and stats["tickets_running"] == 0


def test_stalled_learner_keeps_memory_bounded_and_producers_wait(queue_server):
    group_bytes = sum(len(f) for f in encode_group(make_group(lens=(100, 100, 100))))
    capacity = 5 * group_bytes
    server = queue_server(groups_per_step=1, capacity_bytes=capacity)
    procs, results = _start(produce_blocking, server.address, count=3, per_producer=8)
    consumer = QueueConsumer(server.address, "learner", vocab_size=32, timeout_s=10)
    deadline = time.monotonic() + 20
    while (stats := consumer.stats())["waits"] < 6 and time.monotonic() < deadline:
        assert stats["bytes_held"] <= capacity
        time.sleep(0.05)
    assert stats["depth"] == 5 and stats["bytes_held"] <= capacity and stats["waits"] >= 6
    trained = []
    while len(trained) < 24:  # the learner wakes up: every waiting producer gets through
        lease, batch = consumer.get_batch(0, groups=1, timeout_s=20)
        trained.append(batch[0].group_id)
        consumer.ack(lease)
        assert consumer.stats()["bytes_held"] <= capacity
    sent = _join(procs, results)
    assert sorted(trained) == sorted(i for ids in sent.values() for i in ids)
    assert consumer.stats()["balanced"]


def test_tickets_of_a_silent_engine_are_returned_after_the_ticket_lease(queue_server):
    # K = 0, B = 2: two tickets exist at version 0.
    server = queue_server(max_staleness=0, groups_per_step=2, ticket_lease_s=0.3)
    vanished = QueueProducer(server.address, "vanished", timeout_s=5)
    live = QueueProducer(server.address, "live", timeout_s=5)
    assert vanished.ticket(0, 2) == (2, False)
    vanished.close()
    assert live.ticket(0, 2) == (0, False)
    time.sleep(0.4)
    assert live.ticket(0, 2) == (2, False)
    stats = live.stats()
    assert stats["tickets_expired"] == 2 and stats["tickets_held"] == {"live": 2}


def test_a_late_put_after_ticket_expiry_does_not_free_another_engines_ticket(queue_server):
    server = queue_server(max_staleness=0, groups_per_step=2, ticket_lease_s=0.3)
    slow = QueueProducer(server.address, "slow", timeout_s=5)
    other = QueueProducer(server.address, "other", timeout_s=5)
    slow.ticket(0, 1)
    time.sleep(0.4)
    assert other.ticket(0, 1) == (1, False)
    assert slow.put(make_group(version=0)) == "accepted"
    stats = other.stats()
    assert stats["tickets_held"] == {"other": 1} and stats["tickets_running"] == 1


def test_released_tickets_are_counted_per_engine(queue_server):
    server = queue_server(max_staleness=0, groups_per_step=2)
    a, b = QueueProducer(server.address, "a", timeout_s=5), QueueProducer(server.address, "b", timeout_s=5)
    a.ticket(0, 1)
    assert b.release(5) == 0  # b holds none: it cannot hand back a's
    assert a.release(5) == 1
    assert b.ticket(0, 2) == (2, False)


def test_learner_ranks_each_get_a_whole_group_share_of_the_same_step(queue_server):
    server = queue_server(groups_per_step=4)
    producer = QueueProducer(server.address, "p", timeout_s=5)
    ranks = [QueueConsumer(server.address, f"rank{r}", vocab_size=32, rank=r, world=2, timeout_s=5) for r in range(2)]
    groups = [make_group(version=0) for _ in range(6)]
    producer.put_many(groups, ticketed=False)
    shares = [ranks[r].get_batch(0, groups=4, timeout_s=5) for r in range(2)]
    ids = [[g.group_id for g in batch] for _, batch in shares]
    assert [len(i) for i in ids] == [2, 2] and not set(ids[0]) & set(ids[1])
    assert all(len(g.samples) == 3 for _, batch in shares for g in batch)  # GRPO groups stay whole
    for rank, (lease, _) in zip(ranks, shares):
        assert rank.ack(lease) == 2
    stats = ranks[0].stats()
    assert (stats["acknowledged"], stats["depth"], stats["balanced"]) == (4, 2, True)


def test_a_rank_asking_again_gets_the_same_share(queue_server):
    server = queue_server(groups_per_step=2)
    QueueProducer(server.address, "p", timeout_s=5).put_many([make_group(version=0) for _ in range(4)], ticketed=False)
    rank0 = QueueConsumer(server.address, "rank0", vocab_size=32, rank=0, world=2, timeout_s=5)
    _, first = rank0.get_batch(0, groups=2, timeout_s=5)
    lease, again = rank0.get_batch(0, groups=2, timeout_s=5)  # a resend, or a restarted rank
    assert [g.group_id for g in again] == [g.group_id for g in first]
    rank0.ack(lease)
    assert rank0.stats()["redelivered"] == 1


def test_share_no_rank_holds_returns_to_the_queue_when_the_learner_moves_on(queue_server):
    server = queue_server(groups_per_step=2, max_staleness=4)
    QueueProducer(server.address, "p", timeout_s=5).put_many([make_group(version=0) for _ in range(2)], ticketed=False)
    rank0 = QueueConsumer(server.address, "rank0", vocab_size=32, rank=0, world=2, timeout_s=5)
    lease, _ = rank0.get_batch(0, groups=2, timeout_s=5)
    rank0.ack(lease)  # rank 1 never came for its share of step 0
    plain = QueueConsumer(server.address, "plain", vocab_size=32, timeout_s=5)
    plain.set_version(1)
    lease, batch = plain.get_batch(1, groups=1, timeout_s=5)
    plain.ack(lease)
    stats = plain.stats()
    assert (stats["acknowledged"], stats["redelivered"], stats["depth"], stats["balanced"]) == (2, 1, 0, True)


def test_settled_ids_are_remembered_only_within_the_bounded_window(queue_server):
    server = queue_server(groups_per_step=1, seen_capacity=2)
    producer, consumer = QueueProducer(server.address, "p", timeout_s=5), QueueConsumer(server.address, "c", timeout_s=5)
    groups = [make_group(version=0) for _ in range(3)]
    for group in groups:
        producer.put(group, ticketed=False)
        consumer.ack(consumer.get_batch(0, groups=1, timeout_s=5)[0])
    assert producer.put(groups[2], ticketed=False) == "duplicate"  # trained already: not trained twice
    assert consumer.stats()["ids_remembered"] == 2
    assert producer.put(groups[0], ticketed=False) == "accepted"  # outside the window (documented)


def test_batched_put_accepts_what_fits_and_tells_the_rest_to_wait(queue_server):
    server = queue_server(groups_per_step=1, capacity_groups=3)
    producer = QueueProducer(server.address, "p", timeout_s=5)
    frames = [f for _ in range(5) for f in encode_group(make_group(version=0))]
    reply, _ = producer.request("put", {"ticketed": False, "groups": 5}, frames)
    assert reply["statuses"] == ["accepted"] * 3 + ["wait"] * 2 and reply["accepted"] == 3


def test_batched_put_with_one_bad_group_is_refused_whole(queue_server):
    server = queue_server(groups_per_step=1, vocab_size=32)
    producer = QueueProducer(server.address, "p", timeout_s=5)
    bad = make_group(version=0)
    bad.samples[0].behav_logprobs[0] = np.inf
    frames = encode_group(make_group(version=0)) + encode_group(bad)
    sock_reply = _raw_request(producer, {"op": "put", "ticketed": False, "groups": 2}, frames)
    assert sock_reply["ok"] is False and sock_reply["code"] == "bad_value"
    assert sock_reply["error"].startswith("group 1 of 2:")
    assert producer.stats()["accepted"] == 0


def _raw_request(client, header, frames):
    from asyncrl.queue.client import QueueRequestError

    try:
        reply, _ = client.request(header.pop("op"), header, frames)
    except QueueRequestError as exc:
        return {"ok": False, "code": exc.code, "error": str(exc).split(": ", 1)[1]}
    return reply


def test_shutdown_drops_what_is_held_with_a_reason(queue_server):
    server = queue_server(groups_per_step=1)
    QueueProducer(server.address, "p", timeout_s=5).put_many([make_group(version=0) for _ in range(2)], ticketed=False)
    dropped = []
    server.observers.append(type("Recorder", (), {"on_drop": lambda self, entry, reason: dropped.append(reason), "tick": lambda self, now: None})())
    time.sleep(0.05)
    assert server.drain() == 2
    assert dropped == ["shutdown", "shutdown"]
    snap = server.snapshot()
    assert snap["dropped"] == {"shutdown": 2} and snap["balanced"] and snap["bytes_held"] == 0
