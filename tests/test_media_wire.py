"""Media wire messages: round trips, and unpack only ever returns a valid message or BadMessage."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudq.wire import (
    FIELD,
    INPUT_TYPES,
    MAX_INPUT_BYTES,
    MAX_SCREEN,
    BadMessage,
    InputEvent,
    VideoPacket,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
u63 = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def video_packets(draw: st.DrawFn) -> VideoPacket:
    params = draw(st.booleans())
    return VideoPacket(
        seq=draw(u63),
        pts=draw(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        keyframe=draw(st.booleans()),
        capture_time=draw(times),
        data=draw(st.binary(min_size=1, max_size=2048)),
        codec=draw(st.just("h264")) if params else None,
        width=draw(st.integers(1, 16384)) if params else None,
        height=draw(st.integers(1, 16384)) if params else None,
        fps=draw(st.one_of(st.integers(1, 240), st.floats(0.5, 240))) if params else None,
    )


@st.composite
def input_events(draw: st.DrawFn) -> InputEvent:
    kind = draw(st.sampled_from(sorted(INPUT_TYPES)))
    coord = st.integers(-(2**31), 2**31 - 1)
    mouse = kind.startswith("mouse_")
    return InputEvent(
        type=kind,
        seq=draw(u63),
        client_time=draw(times),
        key=draw(st.text(min_size=1, max_size=64)) if kind in ("key", "key_down", "key_up") else None,
        button=draw(st.none() | st.integers(0, 31)) if mouse else None,
        x=draw(coord) if mouse else None,
        y=draw(coord) if mouse else None,
        text=draw(st.text(min_size=1, max_size=100)) if kind in ("text", "clipboard") else None,
        dx=draw(st.integers(-100, 100)) if kind == "wheel" else None,
        dy=draw(st.integers(1, 100)) if kind == "wheel" else None,
        width=draw(st.integers(1, MAX_SCREEN)) if kind == "resize" else None,
        height=draw(st.integers(1, MAX_SCREEN)) if kind == "resize" else None,
    )


# any msgpack-representable value, biased towards the envelope's own keys
keys = st.sampled_from(
    [
        "v",
        "seq",
        "pts",
        "key",
        "ct",
        "data",
        "codec",
        "w",
        "h",
        "width",
        "height",
        "fps",
        "type",
        "button",
        "x",
        "y",
        "text",
        "dx",
        "dy",
    ]
) | st.text(max_size=5)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(sorted(INPUT_TYPES))
)
msgpack_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=6),
    max_leaves=20,
)


def fields(body: object) -> dict[str, bytes]:
    return {FIELD: msgpack.packb(body, use_bin_type=True)}


def check_valid_or_bad(cls: type, raw_fields: object) -> None:
    try:
        msg = cls.unpack(raw_fields)
    except BadMessage as e:
        assert e.reason
        return
    assert isinstance(msg, cls)
    assert cls.unpack(msg.pack()) == msg  # whatever unpack accepts packs back identically


@FUZZ
@given(video_packets())
def test_video_packet_round_trips(packet):
    packed = packet.pack()
    assert set(packed) == {"m"} and isinstance(packed["m"], bytes)
    assert VideoPacket.unpack(packed) == packet
    assert VideoPacket.unpack({b"m": packed["m"]}) == packet  # redis-py returns bytes field names


@FUZZ
@given(input_events())
def test_input_event_round_trips(event):
    assert InputEvent.unpack(event.pack()) == event


@pytest.mark.parametrize("cls", [VideoPacket, InputEvent])
@FUZZ
@given(raw=st.binary(max_size=200))
def test_unpack_of_arbitrary_bytes_is_valid_or_bad_message(cls, raw):
    check_valid_or_bad(cls, {b"m": raw})


@pytest.mark.parametrize("cls", [VideoPacket, InputEvent])
@FUZZ
@given(body=msgpack_values)
def test_unpack_of_arbitrary_msgpack_is_valid_or_bad_message(cls, body):
    check_valid_or_bad(cls, fields(body))


@FUZZ
@given(packet=video_packets(), name=keys, value=msgpack_values)
def test_video_packet_with_one_field_replaced_is_valid_or_bad_message(packet, name, value):
    body = msgpack.unpackb(packet.pack()["m"])
    body[name] = value
    check_valid_or_bad(VideoPacket, fields(body))


@FUZZ
@given(event=input_events(), name=keys, value=msgpack_values)
def test_input_event_with_one_field_replaced_is_valid_or_bad_message(event, name, value):
    body = msgpack.unpackb(event.pack()["m"])
    body[name] = value
    check_valid_or_bad(InputEvent, fields(body))


@pytest.mark.parametrize("cls", [VideoPacket, InputEvent])
@FUZZ
@given(stream_fields=st.dictionaries(st.text(max_size=3) | st.binary(max_size=3), scalars, max_size=3))
def test_unpack_of_arbitrary_stream_fields_is_valid_or_bad_message(cls, stream_fields):
    check_valid_or_bad(cls, stream_fields)


GOOD_VIDEO = {"v": 1, "seq": 1, "pts": 0, "key": True, "ct": 1.5, "data": b"\x00\x00\x01\x65"}
GOOD_INPUT = {"v": 1, "type": "mouse_down", "seq": 3, "ct": 2.0, "x": 1, "y": 2, "button": 0}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, "version"),
        ({"v": True}, "version"),
        ({"seq": True}, "seq must be an integer"),
        ({"seq": -1}, "seq out of range"),
        ({"pts": 1.5}, "pts must be an integer"),
        ({"key": 1}, "keyframe must be a boolean"),
        ({"ct": math.nan}, "capture_time"),
        ({"ct": "now"}, "capture_time"),
        ({"data": "text"}, "data"),
        ({"data": b""}, "data"),
        ({"codec": "h264"}, "all together"),
        ({"codec": "h264", "w": 0, "h": 720, "fps": 30}, "width out of range"),
        ({"codec": "h264", "w": 1280, "h": 720, "fps": -1.0}, "fps"),
    ],
)
def test_bad_video_fields_are_refused_with_a_reason(change, reason):
    with pytest.raises(BadMessage, match=reason):
        VideoPacket.unpack(fields({**GOOD_VIDEO, **change}))


def test_video_packet_missing_fields_are_named():
    body = dict(GOOD_VIDEO)
    del body["pts"], body["data"]
    with pytest.raises(BadMessage, match="missing pts, data"):
        VideoPacket.unpack(fields(body))


def test_keyframe_carries_codec_params():
    body = {**GOOD_VIDEO, "codec": "h264", "w": 1280, "h": 720, "fps": 30}
    packet = VideoPacket.unpack(fields(body))
    assert packet.has_params and (packet.codec, packet.width, packet.height, packet.fps) == (
        "h264",
        1280,
        720,
        30,
    )
    assert not VideoPacket.unpack(fields(GOOD_VIDEO)).has_params


def test_unknown_envelope_keys_are_ignored():
    assert VideoPacket.unpack(fields({**GOOD_VIDEO, "future": [1, 2]})).seq == 1


def test_oversized_video_packet_is_refused_and_the_limit_is_configurable():
    big = VideoPacket(seq=0, pts=0, keyframe=True, capture_time=0.0, data=b"x" * 5000)
    packed = big.pack()
    assert VideoPacket.unpack(packed).data == big.data
    with pytest.raises(BadMessage, match="exceeds"):
        VideoPacket.unpack(packed, max_bytes=4096)
    with pytest.raises(BadMessage, match="exceeds"):
        big.pack(max_bytes=4096)
    with pytest.raises(BadMessage, match="exceeds"):
        VideoPacket.unpack({"m": b"\x00" * (4 * 1024 * 1024 + 1)})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"type": "mouse_wheel"}, "unknown input type"),
        ({"type": None}, "unknown input type"),
        ({"seq": "1"}, "seq must be an integer"),
        ({"ct": math.inf}, "client_time"),
        ({"x": None}, "without x and y"),
        ({"x": 1.5}, "x must be an integer"),
        ({"x": 2**40}, "x out of range"),
        ({"button": 99}, "button out of range"),
        ({"type": "key"}, "key event without key"),
        ({"type": "key", "key": ""}, "key must be a string"),
        ({"type": "key", "key": "k" * 65}, "key must be a string"),
        ({"type": "key", "key": b"a"}, "key must be a string"),
    ],
)
def test_bad_input_fields_are_refused_with_a_reason(change, reason):
    with pytest.raises(BadMessage, match=reason):
        InputEvent.unpack(fields({**GOOD_INPUT, **change}))


def test_keyframe_request_travels_on_the_input_stream():
    req = InputEvent("keyframe_request", seq=9, client_time=3.0)
    assert InputEvent.unpack(req.pack()) == req


def test_oversized_input_is_refused():
    with pytest.raises(BadMessage, match="exceeds"):
        InputEvent.unpack(fields({**GOOD_INPUT, "pad": b"x" * MAX_INPUT_BYTES}))


@pytest.mark.parametrize(
    "stream_fields",
    [
        {},
        {"other": b"x"},
        {"m": "a str: decode_responses=True is not supported"},
        {"m": msgpack.packb(GOOD_INPUT) + b"trailing"},
        {"m": msgpack.packb([GOOD_INPUT])},
        {"m": b"\x91" * 100_000},  # deeply nested arrays
        ["m", b"x"],
    ],
)
def test_malformed_stream_entries_are_bad_messages(stream_fields):
    with pytest.raises(BadMessage):
        InputEvent.unpack(stream_fields)


def test_constructing_an_invalid_message_fails_early():
    with pytest.raises(BadMessage):
        InputEvent("mouse_move", seq=1, client_time=0.0)
    with pytest.raises(BadMessage):
        VideoPacket(seq=0, pts=0, keyframe=1, capture_time=0.0, data=b"x")  # type: ignore[arg-type]


def test_resize_events_carry_a_bounded_width_and_height():
    ev = InputEvent("resize", seq=1, client_time=0.0, width=1000, height=628)
    back = InputEvent.unpack(ev.pack())
    assert (back.type, back.width, back.height) == ("resize", 1000, 628)
    for bad in (
        {},
        {"width": 100},
        {"width": 0, "height": 10},
        {"width": 16385, "height": 10},
        {"width": True, "height": 10},
        {"width": 10.5, "height": 10},
        {"width": -2, "height": 10},
    ):
        with pytest.raises(BadMessage):
            InputEvent("resize", seq=1, client_time=0.0, **bad)
