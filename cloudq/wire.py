"""Media messages that cross Redis: video and audio packets (node -> client) and input events
(client -> node).

Each message is one msgpack map in the single XADD field ``m``. ``Msg.pack()`` gives the XADD
fields; ``Msg.unpack(fields)`` is the only way a reader turns stream fields back into a message: it
validates everything and raises :class:`BadMessage` (a ``ValueError``) with a reason on anything
wrong, never anything else. Unknown map keys are ignored so a newer writer can add fields; a
different ``v`` (envelope version) is refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

logger = logging.getLogger(__name__)

__all__ = [
    "FIELD",
    "INPUT_TYPES",
    "MAX_AUDIO_BYTES",
    "MAX_CLIPBOARD_BYTES",
    "MAX_CLIPBOARD_INPUT_BYTES",
    "MAX_INPUT_BYTES",
    "MAX_KEY_CHARS",
    "MAX_SCREEN",
    "MAX_TEXT_CHARS",
    "MAX_VIDEO_BYTES",
    "VERSION",
    "AudioPacket",
    "BadMessage",
    "InputEvent",
    "VideoPacket",
]

FIELD = "m"
"""The XADD field that holds the msgpack envelope."""
VERSION = 1
MAX_VIDEO_BYTES = 4 * 1024 * 1024
MAX_INPUT_BYTES = 64 * 1024
MAX_CLIPBOARD_BYTES = 1024 * 1024
"""Longest clipboard text (UTF-8 bytes) either way: a ``clipboard`` input event, a clip entry."""
MAX_CLIPBOARD_INPUT_BYTES = MAX_CLIPBOARD_BYTES + 1024
"""Only a ``clipboard`` input event may be bigger than :data:`MAX_INPUT_BYTES`, up to this."""
MAX_AUDIO_BYTES = 16 * 1024
INPUT_TYPES = frozenset(
    {
        "key",  # press and release of ``key``
        "key_down",
        "key_up",
        "text",  # type ``text`` (a string)
        "mouse_down",
        "mouse_move",
        "mouse_up",
        "wheel",  # scroll by ``dx``, ``dy`` steps (positive dy = down)
        "keyframe_request",
        "clipboard",  # set the remote clipboard to ``text`` (1..MAX_CLIPBOARD_BYTES UTF-8 bytes)
        "resize",  # the client's view is ``width`` x ``height`` pixels (1..MAX_SCREEN each)
    }
)
MAX_KEY_CHARS = 64
MAX_TEXT_CHARS = 1024
MAX_WHEEL_STEPS = 100
MAX_SCREEN = 16384
"""Largest ``width`` or ``height`` a ``resize`` event may ask for (the node clamps to its maximum)."""
_INT64 = 2**63
_COORD = 2**31


class BadMessage(ValueError):
    """A stream entry that is not a valid message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# field checks (bool is an int subclass in Python: every int check refuses it explicitly)


def _int(name: str, value: Any, lo: int = -_INT64, hi: int = _INT64 - 1) -> int:
    if type(value) is not int:
        raise BadMessage(f"{name} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise BadMessage(f"{name} out of range: {value}")
    return value


def _opt_int(name: str, value: Any, lo: int = -_INT64, hi: int = _INT64 - 1) -> int | None:
    return None if value is None else _int(name, value, lo, hi)


def _time(name: str, value: Any) -> float:
    if type(value) not in (int, float):
        raise BadMessage(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise BadMessage(f"{name} must be a finite non-negative number: {value}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if type(value) is not bool:
        raise BadMessage(f"{name} must be a boolean, not {type(value).__name__}")
    return value


def _envelope(fields: Mapping[Any, Any], max_bytes: int) -> dict[str, Any]:
    """XADD fields -> the decoded msgpack map (size, format and version checked)."""
    if not isinstance(fields, Mapping):
        raise BadMessage(f"stream fields must be a mapping, not {type(fields).__name__}")
    raw = fields.get(FIELD.encode(), fields.get(FIELD))
    if raw is None:
        raise BadMessage(f"missing field {FIELD!r}")
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise BadMessage(f"field {FIELD!r} must be bytes, not {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise BadMessage(f"message of {len(raw)} bytes exceeds the {max_bytes} byte limit")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, timestamp=0)
    except Exception as e:  # msgpack raises ValueError, TypeError, ExtraData, StackError, ...
        raise BadMessage(f"not msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(body, dict):
        raise BadMessage(f"envelope must be a map, not {type(body).__name__}")
    if type(body.get("v")) is not int or body["v"] != VERSION:
        raise BadMessage(f"unsupported envelope version {body.get('v')!r}")
    return body


def _require(body: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if n not in body]
    if missing:
        raise BadMessage(f"missing {', '.join(missing)}")


def _pack(body: dict[str, Any], max_bytes: int) -> dict[str, bytes]:
    raw = msgpack.packb(body, use_bin_type=True)
    if len(raw) > max_bytes:
        raise BadMessage(f"message of {len(raw)} bytes exceeds the {max_bytes} byte limit")
    return {FIELD: raw}


# ---------------------------------------------------------------------------------------------------
# messages


@dataclass(frozen=True, slots=True)
class VideoPacket:
    """One encoded frame on a session's video stream.

    ``seq`` goes up by one per packet on the stream, so the client sees gaps; ``pts`` is the
    encoder's timestamp; ``capture_time`` is ``time.time()`` when the app rendered the frame.
    Keyframes may carry the codec parameters (all four or none).
    """

    seq: int
    pts: int
    keyframe: bool
    capture_time: float
    data: bytes
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None

    MAX_BYTES: ClassVar[int] = MAX_VIDEO_BYTES

    def __post_init__(self) -> None:
        _int("seq", self.seq, 0)
        _int("pts", self.pts)
        _bool("keyframe", self.keyframe)
        _time("capture_time", self.capture_time)
        if not isinstance(self.data, bytes) or not self.data:
            raise BadMessage("data must be non-empty bytes")
        params = (self.codec, self.width, self.height, self.fps)
        if any(p is not None for p in params):
            if any(p is None for p in params):
                raise BadMessage("codec, width, height and fps come all together or not at all")
            if not isinstance(self.codec, str) or not 0 < len(self.codec) <= 32:
                raise BadMessage(f"bad codec name {self.codec!r}")
            _int("width", self.width, 1, 16384)
            _int("height", self.height, 1, 16384)
            if type(self.fps) not in (int, float) or not (0 < self.fps <= 1000):
                raise BadMessage(f"bad fps {self.fps!r}")

    @property
    def has_params(self) -> bool:
        return self.codec is not None

    def pack(self, max_bytes: int | None = None) -> dict[str, bytes]:
        body: dict[str, Any] = {
            "v": VERSION,
            "seq": self.seq,
            "pts": self.pts,
            "key": self.keyframe,
            "ct": self.capture_time,
            "data": self.data,
        }
        if self.codec is not None:
            body["codec"] = self.codec
            body["w"] = self.width
            body["h"] = self.height
            body["fps"] = self.fps
        return _pack(body, max_bytes or self.MAX_BYTES)

    @classmethod
    def unpack(cls, fields: Mapping[Any, Any], max_bytes: int | None = None) -> VideoPacket:
        body = _envelope(fields, max_bytes or cls.MAX_BYTES)
        _require(body, "seq", "pts", "key", "ct", "data")
        try:
            return cls(
                seq=body["seq"],
                pts=body["pts"],
                keyframe=body["key"],
                capture_time=body["ct"],
                data=body["data"],
                codec=body.get("codec"),
                width=body.get("w"),
                height=body.get("h"),
                fps=body.get("fps"),
            )
        except BadMessage:
            raise
        except Exception as e:  # defensive: nothing but BadMessage leaves unpack
            raise BadMessage(f"invalid video packet: {e}") from None


@dataclass(frozen=True, slots=True)
class AudioPacket:
    """One encoded audio frame on a session's audio stream (Opus: 20 ms, each decodable alone).

    ``seq`` goes up by one per packet; a jump is silence the node did not send or packets lost.
    ``pts`` is in samples at ``rate``; ``capture_time`` is ``time.time()`` when the node read the
    frame's last sample from the program's sink.
    """

    seq: int
    pts: int
    capture_time: float
    data: bytes
    codec: str = "opus"
    rate: int = 48000
    channels: int = 2

    MAX_BYTES: ClassVar[int] = MAX_AUDIO_BYTES

    def __post_init__(self) -> None:
        _int("seq", self.seq, 0)
        _int("pts", self.pts)
        _time("capture_time", self.capture_time)
        if not isinstance(self.data, bytes) or not self.data:
            raise BadMessage("data must be non-empty bytes")
        if not isinstance(self.codec, str) or not 0 < len(self.codec) <= 32:
            raise BadMessage(f"bad codec name {self.codec!r}")
        _int("rate", self.rate, 8000, 192000)
        _int("channels", self.channels, 1, 8)

    def pack(self, max_bytes: int | None = None) -> dict[str, bytes]:
        body: dict[str, Any] = {
            "v": VERSION,
            "seq": self.seq,
            "pts": self.pts,
            "ct": self.capture_time,
            "data": self.data,
            "codec": self.codec,
            "rate": self.rate,
            "ch": self.channels,
        }
        return _pack(body, max_bytes or self.MAX_BYTES)

    @classmethod
    def unpack(cls, fields: Mapping[Any, Any], max_bytes: int | None = None) -> AudioPacket:
        body = _envelope(fields, max_bytes or cls.MAX_BYTES)
        _require(body, "seq", "pts", "ct", "data", "codec", "rate", "ch")
        try:
            return cls(
                body["seq"], body["pts"], body["ct"], body["data"], body["codec"], body["rate"], body["ch"]
            )
        except BadMessage:
            raise
        except Exception as e:  # defensive: nothing but BadMessage leaves unpack
            raise BadMessage(f"invalid audio packet: {e}") from None


@dataclass(frozen=True, slots=True)
class InputEvent:
    """One user input (or a keyframe request) on a session's input stream.

    ``seq`` increases per client; ``client_time`` is the client's ``time.time()`` when the user
    acted. ``key``, ``key_down`` and ``key_up`` carry ``key``: an X keysym name (``"a"``,
    ``"Return"``, ``"plus"``), optionally with modifiers (``"ctrl+c"``, ``"shift+Tab"``); the
    built-in apps also accept the character itself (``"+"``). ``text`` carries ``text`` (a string
    to type). Mouse events carry ``x``, ``y`` (frame pixels) and optionally ``button`` (1-3);
    ``wheel`` carries ``dx``, ``dy`` (steps; positive ``dy`` scrolls down) and optionally ``x``, ``y``.
    ``resize`` carries ``width``, ``height``: the size in device pixels the client would like the
    picture to be (its window); the node clamps it to what it allows, or ignores it.
    """

    type: str
    seq: int
    client_time: float
    key: str | None = None
    button: int | None = None
    x: int | None = None
    y: int | None = None
    text: str | None = None
    dx: int | None = None
    dy: int | None = None
    width: int | None = None
    height: int | None = None

    MAX_BYTES: ClassVar[int] = MAX_INPUT_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or self.type not in INPUT_TYPES:
            raise BadMessage(f"unknown input type {self.type!r}")
        _int("seq", self.seq, 0)
        _time("client_time", self.client_time)
        _opt_int("button", self.button, 0, 31)
        _opt_int("x", self.x, -_COORD, _COORD - 1)
        _opt_int("y", self.y, -_COORD, _COORD - 1)
        if self.key is not None and (not isinstance(self.key, str) or not 0 < len(self.key) <= MAX_KEY_CHARS):
            raise BadMessage(f"key must be a string of 1..{MAX_KEY_CHARS} characters")
        if self.type == "clipboard":
            if not isinstance(self.text, str) or not self.text:
                raise BadMessage("clipboard event without text")
            try:
                size = len(self.text.encode())
            except UnicodeEncodeError:
                raise BadMessage("clipboard text is not valid Unicode") from None
            if size > MAX_CLIPBOARD_BYTES:
                raise BadMessage(f"clipboard text of {size} bytes exceeds {MAX_CLIPBOARD_BYTES}")
        elif self.text is not None and (
            not isinstance(self.text, str) or not 0 < len(self.text) <= MAX_TEXT_CHARS
        ):
            raise BadMessage(f"text must be a string of 1..{MAX_TEXT_CHARS} characters")
        _opt_int("dx", self.dx, -MAX_WHEEL_STEPS, MAX_WHEEL_STEPS)
        _opt_int("dy", self.dy, -MAX_WHEEL_STEPS, MAX_WHEEL_STEPS)
        _opt_int("width", self.width, 1, MAX_SCREEN)
        _opt_int("height", self.height, 1, MAX_SCREEN)
        if self.type == "resize" and (self.width is None or self.height is None):
            raise BadMessage("resize event without width and height")
        if self.type in ("key", "key_down", "key_up") and self.key is None:
            raise BadMessage(f"{self.type} event without key")
        if self.type == "text" and self.text is None:
            raise BadMessage("text event without text")
        if self.type == "wheel" and not (self.dx or self.dy):
            raise BadMessage("wheel event without dx or dy")
        if self.type.startswith("mouse_") and (self.x is None or self.y is None):
            raise BadMessage(f"{self.type} event without x and y")

    def pack(self, max_bytes: int | None = None) -> dict[str, bytes]:
        body: dict[str, Any] = {"v": VERSION, "type": self.type, "seq": self.seq, "ct": self.client_time}
        for name in ("key", "button", "x", "y", "text", "dx", "dy", "width", "height"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        limit = MAX_CLIPBOARD_INPUT_BYTES if self.type == "clipboard" else self.MAX_BYTES
        return _pack(body, max_bytes or limit)

    @classmethod
    def unpack(cls, fields: Mapping[Any, Any], max_bytes: int | None = None) -> InputEvent:
        # only a clipboard event may be bigger than MAX_BYTES (checked once its type is known)
        body = _envelope(fields, max_bytes or max(cls.MAX_BYTES, MAX_CLIPBOARD_INPUT_BYTES))
        if max_bytes is None and body.get("type") != "clipboard":
            raw = fields.get(FIELD.encode(), fields.get(FIELD))
            if len(raw) > cls.MAX_BYTES:
                raise BadMessage(f"message of {len(raw)} bytes exceeds the {cls.MAX_BYTES} byte limit")
        _require(body, "type", "seq", "ct")
        try:
            return cls(
                type=body["type"],
                seq=body["seq"],
                client_time=body["ct"],
                key=body.get("key"),
                button=body.get("button"),
                x=body.get("x"),
                y=body.get("y"),
                text=body.get("text"),
                dx=body.get("dx"),
                dy=body.get("dy"),
                width=body.get("width"),
                height=body.get("height"),
            )
        except BadMessage:
            raise
        except Exception as e:
            raise BadMessage(f"invalid input event: {e}") from None
