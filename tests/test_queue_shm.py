"""The queue's same-host data path (asyncrl/queue/shm.py): a large group's arrays go through its
producer's arena file in the queue's directory instead of the sockets, and nothing a consumer or an
observer receives changes because of it: the same bytes, whichever path they took, even after the
region they came from is written again. Real servers on real loopback ports; each queue's directory
is made under pytest's tmp_path (mmap works on any file system), so no test leaves /dev/shm behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id
from asyncrl.queue.client import QueueConsumer, QueueProducer
from asyncrl.queue.codec import encode_group
from conftest import loopback
from test_codec import make_group
from test_protocol import HandClient
from test_queue_restart import Served

VOCAB = 50_000
SAMPLES, TOKENS, PROMPT = 8, 3000, 16
REGION = -(-4 * (PROMPT + 3 * SAMPLES * TOKENS) // 64) * 64
"""Bytes of one large group's region: its four arrays, rounded up as ProducerArena aligns them."""


def large_group(seed: int, version: int = 0) -> TrajectoryGroup:
    """8 samples of 3000 tokens (288 KB of arrays, far above shm_min_bytes), distinct per seed."""
    rng = np.random.default_rng(seed)
    samples = [
        Sample(
            tokens=rng.integers(0, VOCAB, TOKENS).astype(np.int32),
            behav_logprobs=-rng.random(TOKENS).astype(np.float32),
            versions=np.full(TOKENS, version, np.int32),
            reward=float(rng.random()),
            finish_reason="stop" if i % 2 else "length",
        )
        for i in range(SAMPLES)
    ]
    prompt = rng.integers(0, VOCAB, PROMPT).astype(np.int32)
    return TrajectoryGroup(new_group_id(), prompt, samples, task="shm", engine_id="p0", seed=seed, reference=str(seed))


def wire(group: TrajectoryGroup) -> list[bytes]:
    """A group's five frames as bytes: equal lists mean every field and every array bit is equal."""
    return [bytes(f) for f in encode_group(group)]


def assert_same_groups(received: list[TrajectoryGroup], sent: list[TrajectoryGroup]) -> None:
    by_id = {g.group_id: g for g in received}
    assert sorted(by_id) == sorted(g.group_id for g in sent)
    for group in sent:
        assert wire(by_id[group.group_id]) == wire(group)


@pytest.fixture
def queue(tmp_path):
    """Starts queues whose arenas live under tmp_path (unless shm_dir is given); closes them after the test."""
    started: list[Served] = []

    def start(address: str = "", **settings) -> Served:
        defaults = {"max_staleness": 1, "vocab_size": VOCAB, "shm_dir": str(tmp_path)}
        served = Served(address or loopback(), **{**defaults, **settings})
        started.append(served)
        return served

    yield start
    for served in started:
        served.close()


@pytest.fixture
def clients():
    """Makes producers and consumers that have said hello; closes them after the test."""
    opened = []

    class Clients:
        @staticmethod
        def producer(served: Served, name: str = "p0", **kwargs) -> QueueProducer:
            producer = QueueProducer(served.address, name, timeout_s=2, **kwargs)
            opened.append(producer)
            producer.hello("producer")
            return producer

        @staticmethod
        def consumer(served: Served, name: str = "learner-0", version: int = 0, **kwargs) -> QueueConsumer:
            consumer = QueueConsumer(served.address, name, vocab_size=VOCAB, timeout_s=2, **kwargs)
            opened.append(consumer)
            consumer.hello("consumer", version)
            return consumer

    yield Clients
    for client in opened:
        client.close()


def arena_holds(producer: QueueProducer, group: TrajectoryGroup) -> bool:
    """Whether the group's token array lies in the producer's arena file as it is now."""
    with open(producer.arena.path, "rb") as f:
        return wire(group)[2] in f.read()


# -- the data path ----------------------------------------------------------------------------


def test_large_groups_travel_through_the_arena_and_arrive_bit_equal(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served), clients.consumer(served)
    groups = [large_group(seed) for seed in range(4)]
    assert producer.put_many(groups, ticketed=False) == ["accepted"] * 4
    assert served.stats()["shm_in"] == 4  # each put carried only the group's header frame
    assert producer.arena.in_use == 4 * REGION and all(arena_holds(producer, g) for g in groups)

    lease, batch, _ = consumer.try_get(0, 4)
    assert_same_groups(batch, groups)
    assert served.stats()["shm_out"] == 4
    assert consumer.ack(lease) == 4
    stats = served.stats()
    assert (stats["accepted"], stats["acknowledged"], stats["depth"], stats["leased"], stats["balanced"]) == (4, 4, 0, 0, True)
    assert stats["rejected"] == {}


def test_a_consumer_asking_for_views_reads_the_arena_in_place_until_it_acknowledges(queue, clients):
    """`shm_views`: no copy. The arrays are read-only views of the producer's arena, bit-equal to what
    was put while the lease is held; the default consumer's arrays are copies the arena cannot change."""
    served = queue()
    producer = clients.producer(served, arena_bytes=2 * REGION)
    viewer, copier = clients.consumer(served, shm_views=True), clients.consumer(served, "learner-1")
    groups = [large_group(seed) for seed in range(2)]
    producer.put_many(groups, ticketed=False)
    lease, viewed, _ = viewer.try_get(0, 1)
    lease_copied, copied, _ = copier.try_get(0, 1)
    assert_same_groups(viewed + copied, groups)
    tokens = viewed[0].samples[0].tokens
    assert not tokens.flags.writeable and not tokens.flags.owndata
    assert copied[0].samples[0].tokens.flags.writeable  # a copy of its own

    # The producer writes both regions again once told they are free: the view shows the new
    # bytes (why a view is valid only until its lease is acknowledged), the copy keeps the old.
    viewer.ack(lease)
    copier.ack(lease_copied)
    producer.reconcile(force=True)
    assert producer.arena.in_use == 0
    producer.put_many([large_group(seed) for seed in range(2, 4)], ticketed=False)
    assert served.stats()["shm_in"] == 4
    kept = {g.group_id: g for g in groups}
    assert not np.array_equal(tokens, kept[viewed[0].group_id].samples[0].tokens)
    assert wire(copied[0]) == wire(kept[copied[0].group_id])


def test_groups_below_shm_min_bytes_travel_in_the_messages(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served, shm_min_bytes=REGION + 1), clients.consumer(served)
    groups = [large_group(seed) for seed in range(2)]
    producer.put_many(groups, ticketed=False)
    lease, batch, _ = consumer.try_get(0, 2)
    assert_same_groups(batch, groups)
    assert producer.arena is None
    assert (served.stats()["shm_in"], served.stats()["shm_out"], served.stats()["accepted"]) == (0, 0, 2)


def test_a_region_is_written_again_once_the_queue_says_its_group_settled(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served, arena_bytes=3 * REGION), clients.consumer(served)
    first = [large_group(seed) for seed in range(3)]
    producer.put_many(first, ticketed=False)
    lease, batch, _ = consumer.try_get(0, 3)
    consumer.ack(lease)
    assert producer.arena.in_use == 3 * REGION  # settled, but the producer has not heard yet
    producer.reconcile(force=True)  # the status reply says which regions are free
    assert producer.arena.in_use == 0

    second = [large_group(seed) for seed in range(3, 6)]
    producer.put_many(second, ticketed=False)
    assert producer.arena.full == 0 and served.stats()["shm_in"] == 6  # all three regions written again
    assert not any(arena_holds(producer, g) for g in first)
    lease, batch, _ = consumer.try_get(0, 3)
    assert_same_groups(batch, second)
    consumer.ack(lease)
    assert served.stats()["balanced"]


def test_a_put_reply_tells_the_producer_which_regions_are_free(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served, arena_bytes=3 * REGION), clients.consumer(served)
    producer.put_many([large_group(0), large_group(1)], ticketed=False)
    lease, _, _ = consumer.try_get(0, 2)
    consumer.ack(lease)
    later = large_group(2)
    producer.put(later, ticketed=False)  # written in the third region; its reply frees the first two
    assert producer.arena.in_use == REGION and producer.arena.full == 0
    lease, batch, _ = consumer.try_get(0, 1)
    assert_same_groups(batch, [later])


def test_regions_whose_freed_list_was_lost_are_told_free_again_and_held_ones_are_not(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served, arena_bytes=3 * REGION), clients.consumer(served)
    first = [large_group(0), large_group(1)]
    producer.put_many(first, ticketed=False)
    lease, _, _ = consumer.try_get(0, 1)
    consumer.ack(lease)
    # The reply that would have carried the freed region is lost (as when a timed-out request is resent).
    assert len(served.server.shm.take_freed(producer.arena.name)) == 1
    held = large_group(2)
    producer.put(held, ticketed=False)
    assert producer.arena.in_use == 3 * REGION
    producer.reconcile(force=True)  # the status names what the producer thinks is held
    assert producer.arena.in_use == 2 * REGION  # the lost one is back; the two held ones are not
    lease, batch, _ = consumer.try_get(0, 2)
    assert_same_groups(batch, [first[1], held])
    consumer.ack(lease)
    producer.reconcile(force=True)
    assert producer.arena.in_use == 0


def test_a_duplicate_put_gives_its_region_back_at_once_and_the_held_one_stays(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served), clients.consumer(served)
    group = large_group(0)
    assert producer.put(group, ticketed=False) == "accepted"
    assert producer.put(group, ticketed=False) == "duplicate"  # written to a second region, freed in the reply
    assert producer.arena.in_use == REGION and served.stats()["duplicates"] == 1
    lease, batch, _ = consumer.try_get(0, 1)
    assert_same_groups(batch, [group])
    consumer.ack(lease)


def test_a_group_told_to_wait_gives_its_region_back_at_once(queue, clients):
    served = queue(capacity_groups=2)
    producer, consumer = clients.producer(served, arena_bytes=3 * REGION), clients.consumer(served)
    groups = [large_group(seed) for seed in range(3)]
    putter = threading.Thread(target=producer.put_many, args=(groups,), kwargs={"ticketed": False})
    putter.start()
    deadline = time.monotonic() + 2
    while served.stats()["waits"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    lease, batch, _ = consumer.try_get(0, 2)  # makes room for the third
    consumer.ack(lease)
    putter.join(timeout=5)
    assert not putter.is_alive()
    # Each try of the third group found a free region: the queue freed it with each 'wait'.
    assert producer.arena.full == 0 and served.stats()["waits"] >= 1
    lease, batch2, _ = consumer.try_get(0, 1)
    assert_same_groups(batch + batch2, groups)
    assert served.stats()["shm_in"] == 3


def test_a_full_arena_sends_groups_inline_and_loses_none(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served, arena_bytes=3 * REGION), clients.consumer(served)
    groups = [large_group(seed) for seed in range(5)]
    assert producer.put_many(groups, ticketed=False) == ["accepted"] * 5
    assert producer.arena.full == 2
    assert (served.stats()["accepted"], served.stats()["shm_in"]) == (5, 3)

    lease, batch, _ = consumer.try_get(0, 5)  # one reply mixing regions and inline frames
    assert_same_groups(batch, groups)
    assert served.stats()["shm_out"] == 3
    consumer.ack(lease)
    assert served.stats()["balanced"]


def test_a_consumer_without_shm_gets_arena_groups_inline_and_bit_equal(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served), clients.consumer(served, shm=False)
    groups = [large_group(seed) for seed in range(3)]
    producer.put_many(groups, ticketed=False)
    lease, batch, _ = consumer.try_get(0, 3)
    assert_same_groups(batch, groups)
    assert (served.stats()["shm_in"], served.stats()["shm_out"]) == (3, 0)
    consumer.ack(lease)


def test_a_consumer_that_cannot_read_the_arena_asks_again_for_the_arrays_inline(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served), clients.consumer(served)
    groups = [large_group(seed) for seed in range(2)]
    producer.put_many(groups, ticketed=False)
    # The queue mapped the file at the put; a consumer opening it by name now finds nothing.
    os.unlink(producer.arena.path)
    lease, batch, _ = consumer.try_get(0, 2)
    assert_same_groups(batch, groups)
    assert consumer.ack(lease) == 2
    stats = served.stats()
    assert (stats["delivered"], stats["acknowledged"], stats["leased"], stats["balanced"]) == (2, 2, 0, True)
    later = large_group(2)
    producer.put(later, ticketed=False)
    lease, batch, _ = consumer.try_get(0, 1)  # that consumer no longer asks for regions
    assert_same_groups(batch, [later])
    assert served.stats()["shm_out"] == 2  # only the regions of the first reply


def test_a_producer_that_says_hello_again_writes_its_next_groups_to_a_new_arena(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served), clients.consumer(served)
    before = large_group(0)
    producer.put(before, ticketed=False)
    old_path = producer.arena.path
    producer.hello("producer")  # the queue stops taking the arena it had from this producer
    after = large_group(1)
    producer.put(after, ticketed=False)
    assert producer.arena.path != old_path
    assert (served.stats()["shm_in"], served.stats()["rejected"]) == (2, {})
    lease, batch, _ = consumer.try_get(0, 2)
    assert_same_groups(batch, [before, after])


def test_small_groups_in_the_arena_come_back_as_regions_rather_than_packed(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served, shm_min_bytes=0), clients.consumer(served)
    groups = [make_group(version=0) for _ in range(3)]
    for group in groups:
        producer.put(group, ticketed=False)
    lease, batch, _ = consumer.try_get(0, 3)  # asks for a packed reply too
    assert_same_groups(batch, groups)
    assert (served.stats()["shm_in"], served.stats()["shm_out"]) == (3, 3)


def test_a_producer_restarted_under_the_same_name_makes_a_new_arena_and_the_old_one_goes_once_settled(queue, clients):
    served = queue()
    old, consumer = clients.producer(served), clients.consumer(served)
    held = large_group(0)
    old.put(held, ticketed=False)
    old_path = old.arena.path
    new = clients.producer(served)  # same name "p0": the queue retires the old arena
    fresh = large_group(1)
    new.put(fresh, ticketed=False)
    assert new.arena.path != old_path and served.stats()["shm_in"] == 2

    lease, batch, _ = consumer.try_get(0, 2)
    assert_same_groups(batch, [held, fresh])
    assert os.path.exists(old_path)  # its group was still held until now
    consumer.ack(lease)
    assert not os.path.exists(old_path) and os.path.exists(new.arena.path)


# -- observers ---------------------------------------------------------------------------------


class Recorder:
    """A QueueObserver that keeps the frames it is handed, as the replay mirror's buffer does."""

    def __init__(self):
        self.accepted: dict[str, list] = {}
        self.dropped: dict[str, list] = {}

    def on_accept(self, entry) -> None:
        self.accepted[entry.group_id] = entry.stable_frames()

    def on_drop(self, entry, reason: str) -> None:
        self.dropped[entry.group_id] = entry.stable_frames()

    def on_reject(self, code: str, detail: str) -> None:
        pass

    def tick(self, now: float) -> None:
        pass


def test_observers_keep_what_they_were_handed_after_its_region_is_written_again(queue, clients):
    served = queue()
    recorder = Recorder()
    served.server.observers.append(recorder)
    producer, consumer = clients.producer(served, arena_bytes=3 * REGION), clients.consumer(served)
    first = [large_group(seed) for seed in range(3)]
    producer.put_many(first, ticketed=False)
    lease, trained, _ = consumer.try_get(0, 1)
    consumer.ack(lease)
    consumer.try_get(2, 1)  # at version 2 the other two (version 0, K=1) are dropped as stale
    assert sorted(recorder.dropped) == sorted(g.group_id for g in first if g.group_id != trained[0].group_id)
    producer.reconcile(force=True)
    assert producer.arena.in_use == 0

    second = [large_group(seed, version=2) for seed in range(3, 6)]
    producer.put_many(second, ticketed=False)
    assert producer.arena.full == 0 and not any(arena_holds(producer, g) for g in first)
    for group in first:
        assert [bytes(f) for f in recorder.accepted[group.group_id]] == wire(group)
    for gid, frames in recorder.dropped.items():
        assert [bytes(f) for f in frames] == wire(next(g for g in first if g.group_id == gid))


# -- bad input ---------------------------------------------------------------------------------


def small_frames(version: int = 0) -> tuple[str, list[bytes]]:
    group = large_group(seed=99, version=version)
    group.samples = group.samples[:2]
    return group.group_id, wire(group)


def write_arena(directory: str, name: str, arrays: list[bytes], size: int = 1 << 16) -> None:
    """An arena file made by hand, holding `arrays` end to end from offset 0."""
    with open(os.path.join(directory, name), "wb") as f:
        f.write(b"".join(arrays).ljust(size, b"\0"))


def _good(sizes):
    return {"arena": "arena-hand.bin", "shm": [{"offset": 0, "sizes": sizes}]}


BAD_ARENA_PUTS = {
    # name: (put fields beyond ticketed, given the four array sizes; send all five frames; code)
    "a name outside the directory": (lambda s: {**_good(s), "arena": "../token"}, False, "bad_shm"),
    "an arena file that does not exist": (lambda s: {**_good(s), "arena": "arena-missing.bin"}, False, "bad_shm"),
    "an arena that is a directory": (lambda s: {**_good(s), "arena": "arena-dir.bin"}, False, "bad_shm"),
    "an empty arena file": (lambda s: {**_good(s), "arena": "arena-empty.bin"}, False, "bad_shm"),
    "an arena that is a symbolic link": (lambda s: {**_good(s), "arena": "arena-link.bin"}, False, "bad_shm"),
    "a region beyond the arena": (lambda s: {**_good(s), "shm": [{"offset": 1 << 16, "sizes": s}]}, False, "bad_shm"),
    "a negative offset": (lambda s: {**_good(s), "shm": [{"offset": -64, "sizes": s}]}, False, "bad_shm"),
    "three sizes": (lambda s: {**_good(s), "shm": [{"offset": 0, "sizes": s[:3]}]}, False, "bad_shm"),
    "a region that is not a map": (lambda s: {**_good(s), "shm": [[0, s]]}, False, "bad_shm"),
    "a region larger than max_message_bytes": (
        lambda s: {**_good(s), "shm": [{"offset": 0, "sizes": [*s[:3], 2 << 20]}]}, False, "oversized"),
    "a shm list longer than the groups": (lambda s: {**_good(s), "shm": [{"offset": 0, "sizes": s}, None]}, False, "bad_shm"),
    "a shm field that is not a list": (lambda s: {**_good(s), "shm": {"offset": 0, "sizes": s}}, False, "bad_shm"),
    "a packed put": (
        lambda s: {**_good(s), "groups": 1, "packed": True, "headers": [], "plens": [4]}, False, "bad_shm"),
    "sizes that disagree with the header": (
        lambda s: {**_good(s), "shm": [{"offset": 0, "sizes": [s[0], s[1] - 4, s[2], s[3]]}]}, False, "bad_frames"),
    "array frames as well as a region": (_good, True, "bad_frames"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARENA_PUTS))
def test_a_bad_arena_reference_is_refused_and_the_queue_keeps_serving(queue, clients, case):
    fields_of, all_frames, code = BAD_ARENA_PUTS[case]
    served = queue(max_message_bytes=1 << 20)
    producer, consumer = clients.producer(served), clients.consumer(served)
    before = large_group(0)
    producer.put(before, ticketed=False)

    directory = served.server.shm.path
    _, frames = small_frames()
    write_arena(directory, "arena-hand.bin", frames[1:])
    write_arena(directory, "arena-empty.bin", [], size=0)
    os.mkdir(os.path.join(directory, "arena-dir.bin"))
    os.symlink("arena-hand.bin", os.path.join(directory, "arena-link.bin"))  # to a good arena, yet refused
    hand = HandClient(served.address)
    try:
        fields = fields_of([len(f) for f in frames[1:]])
        reply, out = hand.call("put", frames if all_frames else frames[:1], ticketed=False, **fields)
    finally:
        hand.close()
    assert (reply["ok"], reply["code"], out) == (False, code, [])
    assert served.stats()["rejected"] == {code: 1}

    after = large_group(1)
    assert producer.put(after, ticketed=False) == "accepted"
    lease, batch, _ = consumer.try_get(0, 2)
    assert_same_groups(batch, [before, after])
    consumer.ack(lease)
    stats = served.stats()
    assert (stats["accepted"], stats["shm_in"], stats["balanced"]) == (2, 2, True)


def test_arena_values_are_validated_in_place(queue):
    served = queue()
    hand = HandClient(served.address)
    try:
        directory = hand.call("hello", role="producer", name="hand")[0]["shm"]["dir"]
        _, frames = small_frames()
        tokens = np.frombuffer(frames[2], np.int32).copy()
        tokens[5] = VOCAB
        arrays = [frames[1], tokens.tobytes(), frames[3], frames[4]]
        write_arena(directory, "arena-hand.bin", arrays)
        reply, _ = hand.call("put", frames[:1], ticketed=False, **_good([len(a) for a in arrays]))
    finally:
        hand.close()
    assert (reply["ok"], reply["code"]) == (False, "bad_token")
    assert (served.stats()["accepted"], served.stats()["rejected"]) == (0, {"bad_token": 1})


def test_an_arena_that_shrank_under_the_queue_is_refused_not_read_past_its_end(queue):
    """Reading a mapping past the end of its file kills the process (SIGBUS): the queue checks the
    file's size at every put, not only the size it had when first mapped."""
    served = queue()
    hand = HandClient(served.address)
    try:
        directory = hand.call("hello", role="producer", name="hand")[0]["shm"]["dir"]
        gid, frames = small_frames()
        sizes = [len(f) for f in frames[1:]]
        write_arena(directory, "arena-hand.bin", frames[1:])
        first, _ = hand.call("put", frames[:1], ticketed=False, **_good(sizes))
        os.truncate(os.path.join(directory, "arena-hand.bin"), 1024)
        _, frames2 = small_frames(version=0)
        second, _ = hand.call("put", frames2[:1], ticketed=False, arena="arena-hand.bin",
                              shm=[{"offset": 4096, "sizes": sizes}])
        alive, _ = hand.call("stats")
    finally:
        hand.close()
    assert first["status"] == "accepted"
    assert (second["ok"], second["code"]) == (False, "bad_shm") and "outside arena" in second["error"]
    assert alive["stats"]["rejected"] == {"bad_shm": 1} and alive["stats"]["accepted"] == 1


def test_a_queue_without_shm_dir_offers_no_arena_and_refuses_arena_puts(queue, clients, tmp_path):
    served = queue(shm_dir=None)
    assert served.server.shm is None
    producer, consumer = clients.producer(served), clients.consumer(served)
    group = large_group(0)
    producer.put(group, ticketed=False)
    assert producer.arena is None  # the hello offered nothing: arrays in the messages

    _, frames = small_frames()
    write_arena(str(tmp_path), "arena-hand.bin", frames[1:])
    hand = HandClient(served.address)
    try:
        assert "shm" not in hand.call("hello", role="producer", name="hand")[0]
        reply, _ = hand.call("put", frames[:1], ticketed=False, **_good([len(f) for f in frames[1:]]))
    finally:
        hand.close()
    assert (reply["ok"], reply["code"]) == (False, "bad_shm")
    lease, batch, _ = consumer.try_get(0, 1)
    assert_same_groups(batch, [group])
    stats = served.stats()
    assert (stats["shm_in"], stats["rejected"]) == (0, {"bad_shm": 1})


# -- the directory -----------------------------------------------------------------------------


def test_the_queue_directory_is_private_holds_the_offered_token_and_goes_at_close(queue, clients, tmp_path):
    served = queue()
    path = served.server.shm.path
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path) == f"asyncrl-queue-{os.getpid()}-{served.server.instance}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    producer = clients.producer(served)
    offer = producer.request("hello", {"role": "producer", "name": "other"})[0]["shm"]
    with open(os.path.join(path, "token")) as f:
        assert offer == {"dir": path, "token": f.read()}
    assert producer.request("status", {"ids": []})[0]["shm"] == offer
    producer.put(large_group(0), ticketed=False)
    assert os.path.exists(producer.arena.path)
    served.close()
    assert not os.path.exists(path)


def test_a_starting_queue_removes_directories_of_dead_queues_and_keeps_live_ones(queue, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    namespace = os.readlink("/proc/self/ns/pid")
    dead = tmp_path / f"asyncrl-queue-{child.pid}-0123456789abcdef"
    dead.mkdir()
    (dead / "arena-p0-0123.bin").write_bytes(b"x" * 64)
    (dead / "namespace").write_text(namespace)
    alive = tmp_path / f"asyncrl-queue-{os.getpid()}-fedcba9876543210"
    alive.mkdir()
    (alive / "namespace").write_text(namespace)
    # Made in another PID namespace (a container sharing /dev/shm): its pid means nothing here.
    elsewhere = tmp_path / f"asyncrl-queue-{child.pid}-aaaaaaaaaaaaaaaa"
    elsewhere.mkdir()
    (elsewhere / "namespace").write_text("pid:[1]")
    unrelated = tmp_path / "asyncrl-weights-1"
    unrelated.mkdir()
    queue()
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists() and unrelated.exists()


# -- acknowledging in the next get -------------------------------------------------------------


def test_a_get_acknowledges_the_previous_lease(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served), clients.consumer(served)
    groups = [large_group(seed) for seed in range(4)]
    producer.put_many(groups, ticketed=False)
    first, batch, _ = consumer.try_get(0, 2)
    second, batch2, _ = consumer.try_get(0, 2, ack=first)
    assert served.stats()["acknowledged"] == 2
    assert consumer.ack(first) == 0  # already settled by the get
    assert consumer.ack(second) == 2
    assert_same_groups(batch + batch2, groups)
    stats = served.stats()
    assert (stats["acknowledged"], stats["balanced"]) == (4, True)


def test_a_parked_get_acknowledges_the_previous_lease_once(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served), clients.consumer(served)
    producer.put_many([large_group(seed) for seed in range(2)], ticketed=False)
    lease, _, _ = consumer.try_get(0, 2)

    answered = {}

    def parked_get():
        answered["reply"] = consumer.request(
            "get", {"version": 0, "groups": 2, "consumer": consumer.name, "wait_ms": 5000, "ack": lease, "shm": True})

    getter = threading.Thread(target=parked_get)
    getter.start()
    deadline = time.monotonic() + 2
    while served.stats()["acknowledged"] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    # Acknowledged as soon as the get arrived, though the get waits for a batch.
    assert served.stats()["acknowledged"] == 2 and getter.is_alive()
    later = [large_group(seed) for seed in range(2, 4)]
    producer.put_many(later, ticketed=False)
    getter.join(timeout=5)
    reply, frames = answered["reply"]
    assert (reply["groups"], reply["acknowledged"], len(reply["shm"]), len(frames)) == (2, 2, 2, 2)
    assert served.stats()["acknowledged"] == 2
    assert consumer.ack(reply["lease"]) == 2
    stats = served.stats()
    assert (stats["acknowledged"], stats["balanced"]) == (4, True)


def test_a_parked_get_that_times_out_still_acknowledged_once(queue, clients):
    served = queue()
    producer, consumer = clients.producer(served), clients.consumer(served)
    producer.put_many([large_group(seed) for seed in range(2)], ticketed=False)
    lease, _, _ = consumer.try_get(0, 2)
    reply, _ = consumer.request("get", {"version": 0, "groups": 2, "consumer": consumer.name, "wait_ms": 100, "ack": lease})
    assert (reply["groups"], reply["acknowledged"]) == (0, 2)
    stats = served.stats()
    assert (stats["acknowledged"], stats["depth"], stats["leased"], stats["balanced"]) == (2, 0, 0, True)


# -- a queue restart ----------------------------------------------------------------------------


def test_a_producer_whose_arena_a_restarted_queue_cannot_read_loses_nothing(queue, clients, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = queue(shm_dir=str(tmp_path / "a"))
    producer = clients.producer(first)
    producer.reconcile_s = 3600.0  # only a restart makes it ask what settled
    consumer = clients.consumer(first)
    held = large_group(0)
    producer.put(held, ticketed=False)
    first.kill()

    second = queue(first.address, shm_dir=str(tmp_path / "b"))
    after = large_group(1)
    # Named an arena the new queue does not have: refused, sent again inline; the new instance makes
    # the producer ask about its unsettled groups, hear the new directory, and resend `held` through it.
    assert producer.put(after, ticketed=False) == "accepted"
    assert os.path.dirname(producer.arena.path) == second.server.shm.path
    last = large_group(2)
    producer.put(last, ticketed=False)
    stats = second.stats()
    assert (stats["accepted"], stats["shm_in"], stats["rejected"]) == (3, 2, {"bad_shm": 1})

    lease, batch, _ = consumer.try_get(0, 3)  # refused once (instance_changed), hello, asked again
    assert_same_groups(batch, [held, after, last])
    consumer.ack(lease)
    producer.reconcile(force=True)
    assert producer.unsettled == {} and producer.outcomes == {"trained": 3} and producer.arena.in_use == 0
