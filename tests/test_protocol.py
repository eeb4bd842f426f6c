"""docs/protocol.md is the specification: a client built from it alone, with plain msgpack, struct and
raw bytes (no asyncrl client or codec), drives a real queue server through put, get, ack and errors."""

import os
import struct
import uuid

import msgpack
import pytest
import zmq


class HandClient:
    """A DEALER socket speaking protocol version 1 exactly as the document describes it."""

    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.req = 0

    def call(self, op: str, frames=(), **fields):
        self.req += 1
        header = {"proto": 1, "op": op, "req": self.req, **fields}
        return self.raw([msgpack.packb(header, use_bin_type=True), *frames])

    def raw(self, frames):
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(5000), "no reply within 5 s"
        reply, *rest = self.sock.recv_multipart()
        return msgpack.unpackb(reply, raw=False), rest

    def close(self):
        self.sock.close(0)


def group_frames(lens=(3, 2), version=0, tokens=None, logprobs=None, group_id=None):
    """One group as the table in 'Trajectory group frames' lays it out."""
    total = sum(lens)
    header = {
        "id": group_id or uuid.uuid4().hex,
        "lens": list(lens),
        "rewards": [1.0] * len(lens),
        "finish": ["stop"] * len(lens),
        "task": "hand",
    }
    tokens = tokens if tokens is not None else [7] * total
    logprobs = logprobs if logprobs is not None else [-0.5] * total
    return header["id"], [
        msgpack.packb(header, use_bin_type=True),
        struct.pack("<3i", 1, 2, 3),
        struct.pack(f"<{total}i", *tokens),
        struct.pack(f"<{total}f", *logprobs),
        struct.pack(f"<{total}i", *[version] * total),
    ]


@pytest.fixture
def hand(queue_server):
    server = queue_server(max_staleness=1, groups_per_step=2, vocab_size=32)
    client = HandClient(server.address)
    yield client
    client.close()


def test_hello_reports_the_protocol_version_and_settings(hand):
    reply, frames = hand.call("hello", role="producer", name="hand")
    assert reply["ok"] and reply["proto"] == 1 and reply["req"] == 1 and frames == []
    assert (reply["max_staleness"], reply["groups_per_step"], reply["vocab_size"]) == (1, 2, 32)


def test_put_get_ack_round_trip_with_hand_built_frames(hand):
    gid, frames = group_frames(lens=(3, 2))
    reply, _ = hand.call("put", frames, ticketed=False)
    instance = reply.pop("instance")
    assert reply == {"ok": True, "status": "accepted", "req": 1} and len(instance) == 16
    reply, _ = hand.call("put", frames, ticketed=False)
    assert reply["status"] == "duplicate"
    reply, out = hand.call("get", version=0, groups=1, consumer="hand")
    assert reply["groups"] == 1 and isinstance(reply["lease"], int)
    assert len(out) == 5 and out[1:] == frames[1:]  # sent on exactly as put
    assert msgpack.unpackb(out[0])["id"] == gid
    assert struct.unpack("<5f", out[3]) == (-0.5,) * 5
    reply, _ = hand.call("ack", lease=reply["lease"])
    assert reply["acknowledged"] == 1
    stats = hand.call("stats")[0]["stats"]
    assert (stats["accepted"], stats["acknowledged"], stats["depth"], stats["balanced"]) == (1, 1, 0, True)


def test_status_names_each_groups_outcome_as_documented(hand):
    (trained, frames), (stale, old) = group_frames(), group_frames(version=0)
    hand.call("put", old, ticketed=False)
    hand.call("put", frames, ticketed=False)
    assert hand.call("status", ids=[trained, stale, "never-put"])[0]["outcomes"] == ["held", "held", "unknown"]
    reply, _ = hand.call("get", version=0, groups=2, consumer="hand")
    hand.call("ack", lease=reply["lease"])
    reply, _ = hand.call("status", ids=[trained, stale, "never-put"])
    assert reply["outcomes"] == ["trained", "trained", "unknown"] and len(reply["instance"]) == 16
    assert hand.call("status", ids="x")[0]["code"] == "bad_schema"


def test_a_get_for_another_instance_is_refused_until_the_consumer_says_hello(hand):
    instance = hand.call("hello", role="consumer", name="hand", version=0)[0]["instance"]
    gid, frames = group_frames()
    hand.call("put", frames, ticketed=False)
    reply, out = hand.call("get", version=0, groups=1, consumer="hand", instance="0123456789abcdef")
    assert (reply["ok"], reply["code"], out) == (False, "instance_changed", [])
    assert hand.call("get", version=0, groups=1, consumer="hand", instance=instance)[0]["groups"] == 1


def test_a_consumer_hello_naming_trained_groups_settles_their_resends(hand):
    (gid, frames), (other, more) = group_frames(), group_frames()
    hand.call("put", frames, ticketed=False)  # a producer's resend to a restarted queue
    reply, _ = hand.call("hello", role="consumer", name="hand", version=0, trained=[gid, other])
    assert reply["ok"]
    assert hand.call("status", ids=[gid, other])[0]["outcomes"] == ["trained", "trained"]
    assert hand.call("put", more, ticketed=False)[0]["status"] == "duplicate"
    assert hand.call("get", version=0, groups=1, consumer="hand")[0]["groups"] == 0
    stats = hand.call("stats")[0]["stats"]
    assert (stats["accepted"], stats["already_trained"], stats["depth"], stats["balanced"]) == (1, 1, 0, True)


def test_batched_put_and_rank_shares_as_documented(hand):
    batch = [group_frames()[1] for _ in range(4)]
    reply, _ = hand.call("put", [f for g in batch for f in g], ticketed=False, groups=4)
    assert reply["statuses"] == ["accepted"] * 4 and reply["accepted"] == 4
    shares = [hand.call("get", version=0, groups=2, rank=r, world=2)[0] for r in range(2)]
    assert [s["groups"] for s in shares] == [1, 1] and [s["rank"] for s in shares] == [0, 1]


def test_tickets_follow_the_documented_formula(hand):
    # (K + version + 1) * B = (1 + 0 + 1) * 2 = 4
    assert hand.call("ticket", version=0, want=10, engine="e")[0]["granted"] == 4
    assert hand.call("release", count=3, engine="e")[0]["released"] == 3


@pytest.mark.parametrize(
    "fields, frames, code",
    [
        ({"ticketed": False}, group_frames(tokens=[7, 7, 99, 7, 7])[1], "bad_token"),
        ({"ticketed": False}, group_frames(logprobs=[-1.0, float("nan"), -1.0, -1.0, -1.0])[1], "bad_value"),
        ({"ticketed": False}, group_frames(version=5)[1], "future_version"),
        ({"ticketed": False}, group_frames()[1][:3], "bad_frames"),
        ({"ticketed": "yes"}, group_frames()[1], "bad_schema"),
    ],
)
def test_bad_put_gets_the_documented_error_code(hand, fields, frames, code):
    reply, out = hand.call("put", frames, **fields)
    assert reply["ok"] is False and reply["code"] == code and reply["req"] == 1 and out == []
    assert hand.call("stats")[0]["stats"]["rejected"] == {code: 1}


def test_unknown_protocol_version_and_garbage_get_error_replies(hand):
    reply, _ = hand.raw([msgpack.packb({"proto": 2, "op": "hello", "req": 9})])
    assert (reply["ok"], reply["code"], reply["proto"], reply["req"]) == (False, "bad_protocol", 1, 9)
    reply, _ = hand.raw([b"\xc1\xc1not msgpack"])
    assert (reply["ok"], reply["code"], reply["req"]) == (False, "bad_msgpack", None)
    reply, _ = hand.call("teleport")
    assert reply["code"] == "bad_op"


def packed_batch(count, lens=(3, 2)):
    """`count` groups as 'Packed batches' lays them out: headers and prompt lengths in the message
    header, then 4 frames each holding every group's array back to back."""
    ids, headers, arrays = [], [], [[], [], [], []]
    for _ in range(count):
        gid, frames = group_frames(lens=lens)
        ids.append(gid)
        headers.append(msgpack.unpackb(frames[0]))
        for k in range(4):
            arrays[k].append(frames[1 + k])
    return ids, {"packed": True, "groups": count, "headers": headers, "plens": [3] * count}, [b"".join(a) for a in arrays]


def test_packed_put_and_packed_get_as_documented(hand):
    ids, fields, frames = packed_batch(3)
    reply, _ = hand.call("put", frames, ticketed=False, **fields)
    assert reply["statuses"] == ["accepted"] * 3
    reply, out = hand.call("get", version=0, groups=3, consumer="hand", packed=True)
    assert reply["groups"] == 3 and reply["packed"] is True and reply["plens"] == [3, 3, 3]
    assert [h["id"] for h in reply["headers"]] == ids and out == frames


def test_packed_put_with_a_short_frame_is_refused_whole(hand):
    _, fields, frames = packed_batch(2)
    reply, _ = hand.call("put", [frames[0], frames[1][:-4], frames[2], frames[3]], ticketed=False, **fields)
    assert (reply["ok"], reply["code"]) == (False, "bad_frames")
    assert hand.call("stats")[0]["stats"]["accepted"] == 0


def test_put_asking_for_tickets_gets_them_in_its_reply(hand):
    _, frames = group_frames()
    reply, _ = hand.call("put", frames, want=10, version=0, engine="e")
    # (K + version + 1) * B - usable = (1 + 0 + 1) * 2 - 1 = 3
    assert (reply["status"], reply["granted"], reply["learner_version"], reply["closed"]) == ("accepted", 3, 0, False)


def test_get_with_wait_ms_is_answered_when_the_batch_is_ready(hand):
    putter = HandClient(hand.sock.getsockopt_string(zmq.LAST_ENDPOINT))
    hand.sock.send_multipart([msgpack.packb({"proto": 1, "op": "get", "req": 1, "version": 0, "groups": 1, "wait_ms": 5000})])
    assert not hand.sock.poll(200), "a get with wait_ms must wait while no batch is ready"
    putter.call("put", group_frames()[1], ticketed=False)
    assert hand.sock.poll(2000), "the parked get must be answered once the put made a batch ready"
    reply = msgpack.unpackb(hand.sock.recv_multipart()[0])
    assert (reply["groups"], reply["req"]) == (1, 1)
    putter.close()


def test_get_with_wait_ms_answers_empty_when_the_wait_is_over(hand):
    reply, out = hand.call("get", version=0, groups=1, wait_ms=100)
    assert (reply["groups"], out) == (0, [])


def test_put_and_get_through_an_arena_as_documented(queue_server, tmp_path):
    """A producer on the queue's host writes the four arrays into its own file in the queue's directory
    and puts the header frame and the region only; a consumer asking for regions reads them from there."""
    server = queue_server(vocab_size=32, shm_dir=str(tmp_path))
    hand = HandClient(server.address)
    try:
        offer = hand.call("hello", role="producer", name="hand")[0]["shm"]
        with open(os.path.join(offer["dir"], "token")) as f:
            assert f.read() == offer["token"]  # same host: this client may use arenas
        gid, frames = group_frames(lens=(3, 2))
        arena = os.path.join(offer["dir"], "arena-hand.bin")
        with open(arena, "wb") as f:
            f.write(bytes(4096))
            f.seek(128)
            f.write(b"".join(frames[1:]))
        region = {"offset": 128, "sizes": [len(a) for a in frames[1:]]}
        reply, _ = hand.call("put", frames[:1], ticketed=False, engine="hand", arena="arena-hand.bin", shm=[region])
        assert (reply["status"], reply["freed"]) == ("accepted", [])

        reply, out = hand.call("get", version=0, groups=1, consumer="hand", shm=True)
        assert reply["groups"] == 1 and reply["shm"] == [{"arena": "arena-hand.bin", **region}]
        assert len(out) == 1 and msgpack.unpackb(out[0])["id"] == gid  # the header frame only
        with open(os.path.join(offer["dir"], reply["shm"][0]["arena"]), "rb") as f:
            f.seek(reply["shm"][0]["offset"])
            assert [f.read(n) for n in reply["shm"][0]["sizes"]] == frames[1:]
        assert hand.call("ack", lease=reply["lease"])[0]["acknowledged"] == 1

        reply, _ = hand.call("status", ids=[gid], arena="arena-hand.bin")
        assert (reply["outcomes"], reply["freed"]) == (["trained"], [128])  # the region may be written again
        stats = hand.call("stats")[0]["stats"]
        assert (stats["shm_in"], stats["shm_out"], stats["balanced"]) == (1, 1, True)
    finally:
        hand.close()
