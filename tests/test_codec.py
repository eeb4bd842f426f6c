"""Wire encoding of groups: round-trips, and the error each kind of bad frame gets."""

import math

import msgpack
import numpy as np
import pytest

from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id
from asyncrl.queue.codec import ProtocolError, decode_group, encode_group


def make_group(n=3, version=2, lens=(4, 2, 1), vocab=32) -> TrajectoryGroup:
    rng = np.random.default_rng(0)
    samples = [
        Sample(
            tokens=rng.integers(0, vocab, size=k).astype(np.int32),
            behav_logprobs=-rng.random(k).astype(np.float32),
            versions=np.full(k, version, np.int32),
            reward=i / n,
            finish_reason="stop",
        )
        for i, k in zip(range(n), lens)
    ]
    return TrajectoryGroup(new_group_id(), np.array([1, 5, 6, 14], np.int32), samples, task="repeat", engine_id="e0",
                           seed=7, reference="456", timings={"generate_s": 0.5})


def test_group_round_trips_every_field():
    group = make_group()
    back = decode_group(encode_group(group), vocab_size=32, max_version=2)
    assert back.group_id == group.group_id
    assert back.task == "repeat" and back.engine_id == "e0" and back.seed == 7 and back.reference == "456"
    assert back.timings == {"generate_s": 0.5}
    np.testing.assert_array_equal(back.prompt_tokens, group.prompt_tokens)
    for a, b in zip(back.samples, group.samples):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.behav_logprobs, b.behav_logprobs)
        np.testing.assert_array_equal(a.versions, b.versions)
        assert a.reward == pytest.approx(b.reward) and a.finish_reason == b.finish_reason


def test_arrays_travel_as_raw_frames_next_to_a_small_header():
    frames = encode_group(make_group(lens=(100, 100, 100)))
    assert len(frames) == 5
    assert len(frames[0]) < 300  # the header holds no per-token data
    assert len(frames[2]) == 300 * 4 and len(frames[3]) == 300 * 4 and len(frames[4]) == 300 * 4


def test_empty_response_is_rejected():
    group = make_group(lens=(3, 0, 2))
    with pytest.raises(ProtocolError, match="lens must be positive") as err:
        decode_group(encode_group(group))
    assert err.value.code == "bad_schema"


def test_behaviour_version_is_the_oldest_token():
    group = make_group()
    group.samples[0].versions[1] = 0
    assert group.behaviour_version == 0


def _mutate_header(frames, **changes):
    header = msgpack.unpackb(frames[0])
    header.update(changes)
    return [msgpack.packb(header), *frames[1:]]


@pytest.mark.parametrize(
    "make_frames, code",
    [
        (lambda f: [b"\xc1garbage", *f[1:]], "bad_msgpack"),
        (lambda f: [msgpack.packb([1, 2]), *f[1:]], "bad_schema"),
        (lambda f: f[:3], "bad_frames"),
        (lambda f: [f[0], f[1], f[2][:-2], f[3], f[4]], "bad_frames"),
        (lambda f: _mutate_header(f, lens="many"), "bad_schema"),
        (lambda f: _mutate_header(f, rewards=[1.0, float("nan"), 0.0]), "bad_value"),
        (lambda f: _mutate_header(f, finish=["stop", "eaten", "stop"]), "bad_schema"),
        (lambda f: _drop_field(f, "id"), "bad_schema"),
    ],
)
def test_bad_frames_raise_a_named_protocol_error(make_frames, code):
    with pytest.raises(ProtocolError) as err:
        decode_group(make_frames(encode_group(make_group())), vocab_size=32, max_version=5)
    assert err.value.code == code


def _drop_field(frames, key):
    header = msgpack.unpackb(frames[0])
    del header[key]
    return [msgpack.packb(header), *frames[1:]]


def test_nan_logprobs_are_rejected():
    group = make_group()
    group.samples[0].behav_logprobs[0] = math.nan
    with pytest.raises(ProtocolError, match="NaN or inf") as err:
        decode_group(encode_group(group))
    assert err.value.code == "bad_value"


def test_token_outside_vocabulary_is_rejected():
    group = make_group()
    group.samples[1].tokens[0] = 40
    with pytest.raises(ProtocolError, match="token id 40 is outside the vocabulary") as err:
        decode_group(encode_group(group), vocab_size=32)
    assert err.value.code == "bad_token"


def test_version_from_the_future_is_rejected():
    with pytest.raises(ProtocolError, match="newer than the learner's 1") as err:
        decode_group(encode_group(make_group(version=2)), max_version=1)
    assert err.value.code == "future_version"
