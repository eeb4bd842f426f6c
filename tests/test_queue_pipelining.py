"""Several requests outstanding on one client: puts sent before the last one is answered, a batch
asked for before the previous one is handled, and a silent queue that gets all of them again."""

import threading

import msgpack
import numpy as np
import zmq

from asyncrl.queue.client import QueueConsumer, QueueProducer
from conftest import loopback
from test_codec import make_group


def test_two_puts_in_flight_are_each_answered_and_grant_tickets(queue_server):
    server = queue_server(max_staleness=4, groups_per_step=2)
    producer = QueueProducer(server.address, "p0", timeout_s=5)
    producer.hello("producer")
    granted, _ = producer.ticket(0, 4)
    assert granted == 4
    first, second = [make_group(version=0) for _ in range(2)], [make_group(version=0) for _ in range(2)]
    a = producer.send_put(first, version=0, want=2)
    b = producer.send_put(second, version=0, want=2)
    # Finished in the other order: the first reply waits, kept, while the second is taken.
    assert producer.finish_put(b)[:2] == (["accepted", "accepted"], 2)
    assert producer.finish_put(a) == (["accepted", "accepted"], 2, False)
    stats = producer.stats()
    # Each put spent its 2 tickets and was granted 2 more: capacity (K + v + 1) * B = 10 at version 0.
    assert (stats["accepted"], stats["tickets_running"], stats["tickets_held"]) == (4, 4, {"p0": 4})
    assert set(producer.unsettled) == {g.group_id for g in first + second}


def test_a_learner_asks_for_the_next_batch_before_it_handles_this_one(queue_server):
    server = queue_server(max_staleness=4, groups_per_step=2)
    producer = QueueProducer(server.address, "p0", timeout_s=5)
    groups = [make_group(version=0) for _ in range(6)]
    assert producer.put_many(groups, ticketed=False) == ["accepted"] * 6
    consumer = QueueConsumer(server.address, "c0", vocab_size=32, timeout_s=5)
    consumer.hello("consumer", 0)
    lease0, batch0, _ = consumer.take_batch(consumer.request_batch(0, 2, wait_ms=1000))
    ahead = consumer.request_batch(1, 2, wait_ms=1000)  # travels while batch 0 is "trained"
    assert [g.group_id for g in batch0] == [g.group_id for g in groups[:2]]
    lease1, batch1, _ = consumer.take_batch(ahead)
    assert [g.group_id for g in batch1] == [g.group_id for g in groups[2:4]]
    np.testing.assert_array_equal(batch1[0].samples[0].tokens, groups[2].samples[0].tokens)
    # Batch 0's lease is acknowledged in the get for batch 2, batch 1's on its own.
    lease2, batch2, _ = consumer.take_batch(consumer.request_batch(2, 2, wait_ms=1000, ack=lease0))
    assert len(batch2) == 2
    assert consumer.ack(lease1) == 2 and consumer.ack(lease2) == 2
    stats = consumer.stats()
    assert (stats["acknowledged"], stats["depth"], stats["redelivered"]) == (6, 0, 0)


class SilentOnce:
    """A double of the queue (the real one never drops a request): a ROUTER that reads and ignores
    whatever arrives on a client's first connection, and answers every request on later ones."""

    def __init__(self):
        self.address = loopback()
        self.seen: list[tuple[bytes, str]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _serve(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.bind(self.address)
        self._ready.set()
        first = None
        while not self._stop.is_set():
            if not sock.poll(20):
                continue
            identity, body, *_ = sock.recv_multipart()
            header = msgpack.unpackb(body)
            self.seen.append((identity, header["op"]))
            first = first or identity
            if identity != first:
                sock.send_multipart([identity, msgpack.packb({"ok": True, "req": header["req"], "op": header["op"]})])
        sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_silent_queue_gets_every_outstanding_request_again_on_a_new_socket():
    double = SilentOnce()
    try:
        producer = QueueProducer(double.address, "p0", timeout_s=0.5, retries=2)
        a = producer.send("stats")
        b = producer.send("status", {"ids": []})
        reply, _ = producer.wait(a)  # times out, rebuilds the socket, sends both again
        assert reply["op"] == "stats" and producer.tries == 2
        reply, _ = producer.wait(b)  # its reply came while waiting for a's, and was kept
        assert reply["op"] == "status" and producer.tries == 2
        ops = [op for _, op in double.seen]
        assert ops == ["stats", "status", "stats", "status"]
        assert double.seen[0][0] == double.seen[1][0] != double.seen[2][0] == double.seen[3][0]
    finally:
        double.close()
