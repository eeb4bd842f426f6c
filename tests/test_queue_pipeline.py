"""One request in flight while the client works: a producer writes its next batch into the arena
while a put travels (prepare / put_begin / put_end), a consumer reads a batch while the get for
the next step travels (get_begin / get_receive / decode). Real servers on loopback ports, large
groups through the arena; nothing is lost, duplicated or changed by the overlap."""

from __future__ import annotations

import os

import pytest

from test_queue_shm import assert_same_groups, clients, large_group, queue  # noqa: F401  (fixtures)


def test_a_batch_written_to_the_arena_while_the_previous_put_travels(queue, clients):
    served = queue(groups_per_step=2, max_staleness=1)
    producer, consumer = clients.producer(served), clients.consumer(served)
    first, second = [large_group(s) for s in (0, 1)], [large_group(s) for s in (2, 3)]
    producer.put_begin(producer.prepare(first), version=0, want=2, ticketed=False)
    ahead = producer.prepare(second)  # written into the arena while the put is in flight
    with pytest.raises(RuntimeError, match="still waiting for its reply"):
        producer.request("stats")  # one request at a time: the put's reply is not taken yet
    # (K + v + 1) * B = 4 usable groups at version 0; two are now in the queue: two tickets.
    assert producer.put_end() == (["accepted", "accepted"], 2, False)
    producer.put_begin(ahead, version=0, want=1)  # spends the two tickets
    assert producer.put_end() == (["accepted", "accepted"], 0, False)
    assert sorted(producer.unsettled) == sorted(g.group_id for g in first + second)

    lease, batch, _ = consumer.try_get(0, 4)
    assert_same_groups(batch, first + second)
    assert consumer.ack(lease) == 4
    stats = served.stats()
    assert (stats["accepted"], stats["shm_in"], stats["acknowledged"], stats["balanced"]) == (4, 4, 4, True)


def test_a_put_told_to_wait_is_finished_by_put_end(queue, clients):
    served = queue(capacity_groups=2)
    producer, consumer = clients.producer(served), clients.consumer(served)
    held, more = [large_group(s) for s in (0, 1)], [large_group(s) for s in (2, 3)]
    assert producer.put_many(held, ticketed=False) == ["accepted"] * 2
    producer.put_begin(producer.prepare(more), version=0, want=0, ticketed=False)  # the queue is full
    lease, batch, _ = consumer.try_get(0, 2)  # another client makes room while the put waits
    assert consumer.ack(lease) == 2
    assert producer.put_end(wait_s=0.005)[0] == ["accepted", "accepted"]
    lease, batch2, _ = consumer.try_get(0, 2)
    assert_same_groups(batch + batch2, held + more)
    consumer.ack(lease)
    assert served.stats()["balanced"]


def test_the_next_steps_get_travels_while_a_batch_is_read(queue, clients):
    served = queue(groups_per_step=2, max_staleness=2)
    producer, consumer = clients.producer(served), clients.consumer(served)
    groups = [large_group(s) for s in range(6)]
    producer.put_many(groups, ticketed=False)
    got, done = [], None
    consumer.get_begin(0, 2)
    for step in range(3):
        received = consumer.get_receive()
        assert received.groups == 2
        if step < 2:
            consumer.get_begin(step + 1, 2, ack=done)  # acknowledges the step before this one
            with pytest.raises(RuntimeError, match="still waiting for its reply"):
                consumer.request("stats")
        elif done is not None:
            assert consumer.ack(done) == 2  # no get follows to carry it
        lease, batch, _ = consumer.decode(received)
        got += batch
        done = lease
    assert consumer.ack(done) == 2
    assert_same_groups(got, groups)
    stats = served.stats()
    assert (stats["delivered"], stats["acknowledged"], stats["leased"], stats["balanced"]) == (6, 6, 0, True)
    assert stats["shm_out"] == 6


def test_a_batch_whose_arena_is_gone_is_asked_for_again_while_the_next_get_travels(queue, clients):
    served = queue(groups_per_step=2, max_staleness=2)
    producer, consumer = clients.producer(served), clients.consumer(served)
    groups = [large_group(s) for s in range(4)]
    producer.put_many(groups, ticketed=False)
    consumer.get_begin(0, 2)
    first = consumer.get_receive()
    consumer.get_begin(1, 2)
    os.unlink(producer.arena.path)  # the queue mapped it at the puts; the consumer cannot open it now
    # Reading the first batch fails: the get in flight is answered and kept, the first is asked for
    # again (same token, same lease) with its arrays in the message.
    lease1, batch1, _ = consumer.decode(first)
    lease2, batch2, _ = consumer.decode(consumer.get_receive())  # named regions too: asked again inline
    assert lease1 != lease2
    assert_same_groups(batch1 + batch2, groups)
    assert consumer.ack(lease1) == 2 and consumer.ack(lease2) == 2
    stats = served.stats()
    assert (stats["delivered"], stats["acknowledged"], stats["leased"], stats["balanced"]) == (4, 4, 0, True)
