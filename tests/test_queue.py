"""The transfer queue over real loopback sockets: delivery, acknowledgement, admission, staleness."""

import time

import msgpack
import pytest
import zmq

from asyncrl.queue.client import QueueConsumer, QueueProducer, QueueRequestError
from asyncrl.queue.codec import encode_group
from test_codec import make_group


def clients(server, vocab=32):
    return QueueProducer(server.address, "p0", timeout_s=5), QueueConsumer(server.address, "c0", vocab_size=vocab, timeout_s=5)


def test_put_get_ack_moves_a_group_through(queue_server):
    server = queue_server(groups_per_step=1)
    producer, consumer = clients(server)
    group = make_group(version=0)
    assert producer.put(group, ticketed=False) == "accepted"
    lease, batch = consumer.get_batch(version=0, groups=1, timeout_s=5)
    assert [g.group_id for g in batch] == [group.group_id]
    assert consumer.ack(lease) == 1
    stats = consumer.stats()
    assert (stats["accepted"], stats["delivered"], stats["acknowledged"], stats["depth"]) == (1, 1, 1, 0)
    assert stats["bytes_held"] == 0


def test_resent_group_is_accepted_once(queue_server):
    server = queue_server(groups_per_step=1)
    producer, consumer = clients(server)
    group = make_group(version=0)
    assert producer.put(group, ticketed=False) == "accepted"
    assert producer.put(group, ticketed=False) == "duplicate"
    stats = consumer.stats()
    assert stats["accepted"] == 1 and stats["duplicates"] == 1 and stats["depth"] == 1


def test_batch_waits_until_a_whole_step_is_ready(queue_server):
    server = queue_server(groups_per_step=2)
    producer, consumer = clients(server)
    producer.put(make_group(version=0), ticketed=False)
    assert consumer.try_get(version=0, groups=2)[1] == []
    producer.put(make_group(version=0), ticketed=False)
    assert len(consumer.try_get(version=0, groups=2)[1]) == 2


def test_unacknowledged_lease_is_redelivered_after_it_expires(queue_server):
    server = queue_server(groups_per_step=1, lease_s=0.2)
    producer, consumer = clients(server)
    group = make_group(version=0)
    producer.put(group, ticketed=False)
    consumer.get_batch(version=0, groups=1, timeout_s=5)
    time.sleep(0.4)
    lease, batch = consumer.get_batch(version=0, groups=1, timeout_s=5)
    assert batch[0].group_id == group.group_id
    assert consumer.stats()["redelivered"] == 1


def test_tickets_follow_the_capacity_formula(queue_server):
    # K = 1, B = 2: an engine at version 0 may start (1 + 0 + 1) * 2 = 4 groups.
    server = queue_server(max_staleness=1, groups_per_step=2)
    producer, consumer = clients(server)
    consumer.hello("consumer", 0)  # as a learner does first; a queue that first hears a later version counts its steps as used
    assert producer.ticket(version=0, want=3) == (3, False)
    assert producer.ticket(version=0, want=3) == (1, False)
    assert producer.ticket(version=0, want=3) == (0, False)
    consumer.set_version(1)
    assert producer.ticket(version=1, want=5) == (2, False)


def test_too_stale_group_is_dropped_at_consumption_and_counted(queue_server):
    server = queue_server(max_staleness=1, groups_per_step=1)
    producer, consumer = clients(server)
    consumer.set_version(3)
    old, fresh = make_group(version=1), make_group(version=3)
    producer.put(old, ticketed=False)
    producer.put(fresh, ticketed=False)
    lease, batch = consumer.get_batch(version=3, groups=1, timeout_s=5)
    assert batch[0].group_id == fresh.group_id
    consumer.ack(lease)
    stats = consumer.stats()
    assert stats["dropped"] == {"stale": 1}
    assert stats["staleness"] == {"0": 1}  # of trained groups, recorded at acknowledgement
    assert stats["balanced"]


def test_oldest_version_is_delivered_first(queue_server):
    server = queue_server(max_staleness=4, groups_per_step=1)
    producer, consumer = clients(server)
    consumer.set_version(2)
    newer, older = make_group(version=2), make_group(version=1)
    producer.put(newer, ticketed=False)
    producer.put(older, ticketed=False)
    assert consumer.get_batch(version=2, groups=1, timeout_s=5)[1][0].group_id == older.group_id


def test_full_queue_tells_producers_to_wait(queue_server):
    server = queue_server(groups_per_step=1, capacity_groups=1)
    producer, consumer = clients(server)
    producer.put(make_group(version=0), ticketed=False)
    reply, _ = producer.request("put", {"ticketed": False}, encode_group(make_group(version=0)))
    assert reply["status"] == "wait"
    assert consumer.stats()["depth"] == 1


def test_bad_group_gets_an_error_reply_and_the_server_keeps_serving(queue_server):
    server = queue_server(groups_per_step=1, vocab_size=32)
    producer, consumer = clients(server)
    good = make_group(version=0)
    producer.put(good, ticketed=False)
    bad = make_group(version=0)
    bad.samples[0].tokens[0] = 99
    with pytest.raises(QueueRequestError, match="outside the vocabulary") as err:
        producer.put(bad, ticketed=False)
    assert err.value.code == "bad_token"
    stats = consumer.stats()
    assert stats["rejected"] == {"bad_token": 1} and stats["depth"] == 1
    assert consumer.get_batch(version=0, groups=1, timeout_s=5)[1][0].group_id == good.group_id


def test_garbage_and_unknown_protocol_get_error_replies(queue_server):
    server = queue_server()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(server.address)
    sock.send_multipart([b"\x80\x04garbage"])
    assert sock.poll(5000)
    reply = msgpack.unpackb(sock.recv_multipart()[0])
    assert reply["ok"] is False and reply["code"] == "bad_msgpack"
    sock.send_multipart([msgpack.packb({"proto": 99, "op": "stats", "req": 5})])
    assert sock.poll(5000)
    reply = msgpack.unpackb(sock.recv_multipart()[0])
    assert reply == {"ok": False, "code": "bad_protocol", "error": reply["error"], "proto": 1, "req": 5}
    assert "protocol version 99 is not supported" in reply["error"]
    sock.close(0)


def test_queue_stats_command_prints_the_counters_and_the_balance(queue_server):
    from conftest import run_cli

    server = queue_server(groups_per_step=1)
    QueueProducer(server.address, "p0", timeout_s=5).put(make_group(version=0), ticketed=False)
    result = run_cli("queue", "stats", f"queue.address={server.address}", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "1 ready" in result.stdout and "balanced" in result.stdout
