"""Property: whatever bytes arrive, a real queue server answers every message and keeps every group it
had already accepted, byte for byte."""

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncrl.queue.codec import encode_group
from test_codec import make_group

PRODUCER_OPS = ["put", "ticket", "release", "hello", "stats", "teleport", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(),
    st.text(max_size=20), st.binary(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


@st.composite
def mutated_put(draw):
    """A valid put, then one or more of: a header field replaced, a frame truncated, replaced, dropped or duplicated."""
    frames = [bytes(f) for f in encode_group(make_group(version=0))]
    header_intact = True  # a group header still decodable, so its fields can be mutated
    envelope = {"proto": 1, "op": "put", "req": 1, "ticketed": False}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["group_field", "envelope_field", "truncate", "replace", "drop", "duplicate", "flip"]))
        if kind == "group_field" and header_intact:
            header = msgpack.unpackb(frames[0])
            header[draw(st.sampled_from(["id", "lens", "rewards", "finish", "timings", "seed", "extra"]))] = draw(values)
            frames[0] = msgpack.packb(header)
        elif kind == "envelope_field":
            envelope[draw(st.sampled_from(["proto", "op", "req", "ticketed", "groups", "engine"]))] = draw(values)
        elif kind == "flip" and frames:
            i = draw(st.integers(0, len(frames) - 1))
            header_intact &= i != 0
            if frames[i]:
                j = draw(st.integers(0, len(frames[i]) - 1))
                frames[i] = frames[i][:j] + bytes([frames[i][j] ^ draw(st.integers(1, 255))]) + frames[i][j + 1 :]
        elif frames:
            i = draw(st.integers(0, len(frames) - 1))
            header_intact &= i != 0
            if kind == "truncate":
                frames[i] = frames[i][: draw(st.integers(0, max(0, len(frames[i]) - 1)))]
            elif kind == "replace":
                frames[i] = draw(st.binary(max_size=64))
            elif kind == "drop":
                frames.pop(i)
            else:
                frames.insert(i, frames[i])
    return [msgpack.packb(envelope), *frames]


@st.composite
def random_request(draw):
    fields = draw(st.dictionaries(st.sampled_from(["version", "want", "count", "engine", "groups", "rank"]), values, max_size=3))
    return [msgpack.packb({"proto": 1, "op": draw(st.sampled_from(PRODUCER_OPS)), "req": 1, **fields}), *draw(st.lists(st.binary(max_size=32), max_size=3))]


messages = st.one_of(
    mutated_put(),
    random_request(),
    st.lists(st.binary(max_size=64), min_size=1, max_size=6),  # garbage
    st.just([msgpack.packb({"proto": 1, "op": "put", "req": 1}), b"\0" * (80 << 10)]),  # oversized
)


def test_fuzzed_messages_all_get_replies_and_accepted_groups_survive(queue_server):
    server = queue_server(groups_per_step=3, vocab_size=32, max_message_bytes=64 << 10)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    kept = {}
    for _ in range(3):
        group = make_group(version=0)
        frames = [bytes(f) for f in encode_group(group)]
        sock.send_multipart([msgpack.packb({"proto": 1, "op": "put", "req": 0, "ticketed": False}), *frames])
        assert sock.poll(5000) and msgpack.unpackb(sock.recv_multipart()[0])["status"] == "accepted"
        kept[group.group_id] = frames

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(messages)
    def every_message_gets_a_reply(message):
        sock.send_multipart(message)
        assert sock.poll(5000), f"no reply to {message!r:.200}"
        reply = msgpack.unpackb(sock.recv_multipart()[0])
        assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert reply["code"] and reply["error"]

    every_message_gets_a_reply()

    sock.send_multipart([msgpack.packb({"proto": 1, "op": "stats", "req": 2})])
    assert sock.poll(5000)
    stats = msgpack.unpackb(sock.recv_multipart()[0])["stats"]
    assert stats["balanced"] and sum(stats["rejected"].values()) > 0
    sock.send_multipart([msgpack.packb({"proto": 1, "op": "get", "req": 3, "version": 0, "groups": stats["depth"]})])
    assert sock.poll(5000)
    reply, *out = sock.recv_multipart()
    delivered = {msgpack.unpackb(out[i])["id"]: out[i : i + 5] for i in range(0, len(out), 5)}
    for gid, frames in kept.items():
        assert delivered[gid] == frames
    sock.close(0)
