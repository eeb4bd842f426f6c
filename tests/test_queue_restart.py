"""A queue restart loses nothing (issue 9, docs/faults.md): producers keep what is unsettled and put
again what a new queue instance does not know; the learner's hello names what it trained, so a
resend of a trained group is settled, never delivered twice. Real servers on a real loopback port."""

from __future__ import annotations

import threading
import time

import zmq

from asyncrl.queue.client import QueueConsumer, QueueProducer
from asyncrl.queue.server import QueueServer, QueueSettings
from conftest import loopback
from test_codec import make_group


class Served:
    """A QueueServer on `address`, answered by a thread until stopped."""

    def __init__(self, address: str, **settings):
        settings = QueueSettings(**{"max_staleness": 4, "groups_per_step": 2, "vocab_size": 32, **settings})
        for _ in range(100):  # ZeroMQ frees a closed socket's port in its I/O thread, a moment later
            try:
                self.server = QueueServer(address, settings)
                break
            except zmq.ZMQError:
                time.sleep(0.02)
        else:
            raise RuntimeError(f"{address} stayed in use")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.server.serve, args=(self._stop.is_set, 10), daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return self.server.address

    def stats(self) -> dict:
        return self.server.snapshot()

    def kill(self) -> None:
        """Gone like a killed process: no drain, and its directory stays behind."""
        self._stop.set()
        self._thread.join(timeout=2)
        self.server.socket.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.server.close()


def test_a_restarted_queue_gets_every_unsettled_group_again_and_delivers_none_twice():
    address = loopback()
    first = Served(address)
    producer = QueueProducer(address, "p0", timeout_s=2, retries=5)
    producer.reconcile_s = 3600.0  # it has not heard of any settlement when the queue dies
    consumer = QueueConsumer(address, "learner-0", vocab_size=32, timeout_s=2, retries=5)
    trained: list[str] = []
    consumer.trained_ids = lambda: list(trained)
    consumer.hello("consumer", 0)
    groups = [make_group(version=0) for _ in range(6)]
    assert producer.put_many(groups, ticketed=False) == ["accepted"] * 6
    lease, batch, _ = consumer.try_get(0, 2)
    trained += [g.group_id for g in batch]
    assert consumer.ack(lease) == 2
    old_instance = first.server.instance
    first.kill()  # held 4 ready groups; 2 were trained, but the producer was never told

    second = Served(address)
    try:
        assert producer.reconcile(force=True) == 6  # the new queue knows none of them: all sent again
        assert producer.instance == second.server.instance != old_instance
        # The consumer's next get names the old instance: refused, so it says hello (with the trained
        # ids) and asks again. The two trained groups settle as such; only the other four come out.
        lease, batch, _ = consumer.try_get(0, 2)
        assert lease is not None and consumer.instance == second.server.instance
        lease2, batch2, _ = consumer.try_get(0, 2)
        delivered = {g.group_id for g in batch + batch2}
        assert len(delivered) == 4 and delivered | set(trained) == {g.group_id for g in groups}
        assert consumer.try_get(0, 2)[1] == []  # nothing more: no group twice
        consumer.ack(lease), consumer.ack(lease2)
        assert producer.reconcile(force=True) == 0
        assert producer.unsettled == {} and producer.outcomes == {"trained": 6} and producer.resent == 6
        stats = second.server.snapshot()
        assert (stats["accepted"], stats["acknowledged"], stats["already_trained"], stats["balanced"]) == (6, 4, 2, True)
        assert stats["rejected"] == {"instance_changed": 1}
    finally:
        second.kill()
        producer.close()
        consumer.close()


def test_a_producer_forgets_groups_once_they_settle_and_keeps_the_rest():
    address = loopback()
    served = Served(address)
    producer = QueueProducer(address, "p0", timeout_s=2)
    consumer = QueueConsumer(address, "learner-0", vocab_size=32, timeout_s=2)
    try:
        fresh, old = make_group(version=6), make_group(version=1)
        consumer.set_version(6)
        producer.put_many([fresh, old, make_group(version=6)], ticketed=False)
        lease, batch, _ = consumer.try_get(6, 2)  # the stale one (6 - 1 > K = 4) is dropped on the way
        consumer.ack(lease)
        producer.reconcile(force=True)
        assert producer.outcomes == {"trained": 2, "dropped:stale": 1} and producer.unsettled == {}
        late = make_group(version=6)
        producer.put(late, ticketed=False)
        producer.reconcile(force=True)
        assert list(producer.unsettled) == [late.group_id]  # held by the queue, not settled yet
    finally:
        served.kill()
        producer.close()
        consumer.close()


def test_groups_resent_before_the_learner_spoke_to_the_new_queue_wait_for_it():
    """A new queue knows the learner's version only once the learner speaks; groups of later versions
    stay with the producer until then; those the learner's hello named as trained are not even sent again."""
    address = loopback()
    first = Served(address)
    producer = QueueProducer(address, "p0", timeout_s=2, retries=5)
    producer.reconcile_s = 3600.0
    consumer = QueueConsumer(address, "learner-0", vocab_size=32, timeout_s=2, retries=5)
    consumer.hello("consumer", 3)
    groups = [make_group(version=3) for _ in range(4)]
    producer.put_many(groups, ticketed=False)
    lease, batch, _ = consumer.try_get(3, 2)
    consumer.ack(lease)
    consumer.trained_ids = lambda: [g.group_id for g in batch]
    first.kill()
    second = Served(address)
    try:
        assert producer.reconcile(force=True) == 0 and len(producer.unsettled) == 4  # version 3 is "from the future"
        assert consumer.try_get(3, 2)[1] == []  # refused (instance_changed), hello, then nothing ready yet
        # The restart flag makes it look again without waiting reconcile_s: the two trained groups are
        # 'trained' now (the hello said so), the other two unknown, sent again.
        assert producer.reconcile() == 2
        lease, batch2, _ = consumer.try_get(3, 2)
        assert {g.group_id for g in batch2}.isdisjoint(g.group_id for g in batch)
        consumer.ack(lease)
        producer.reconcile(force=True)
        assert producer.unsettled == {} and producer.outcomes == {"trained": 4}
        stats = second.server.snapshot()
        assert (stats["accepted"], stats["duplicates"], stats["acknowledged"], stats["balanced"]) == (2, 0, 2, True)
    finally:
        second.kill()
        producer.close()
        consumer.close()


def test_a_queue_without_the_status_op_makes_the_producer_keep_nothing(queue_server):
    """An older queue answers 'status' with bad_op: the producer stops keeping groups rather than fail or grow."""
    server = queue_server(vocab_size=32)
    del server._handlers["status"]  # as a queue from before the op
    producer = QueueProducer(server.address, "p0", timeout_s=2)
    try:
        producer.put(make_group(version=0), ticketed=False)
        assert producer.reconcile(force=True) == 0 and producer.unsettled == {}
        producer.put(make_group(version=0), ticketed=False)
        assert producer.unsettled == {}
    finally:
        producer.close()
