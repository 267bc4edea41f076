"""The media boundary: ``Encoder.encode(frame, pts, force_keyframe) -> packets`` and
``Decoder.decode(data) -> frames``.

Every PyAV/libx264 option lives in this module; the node loop and the client kernel never set codec
options. A second codec is one more module that defines an encoder and a decoder class and calls
:func:`register_codec`.

RGB -> YUV 4:2:0 conversion, measured at 1280x720 on a 2-core container (PyAV 18, FFmpeg swscale,
probe frames, ms per frame, median of 5 runs):

=========================================================================  ==========
``VideoFrame.from_ndarray(rgb).reformat(format="yuv420p")``                  1.5 (up to 3.9)
numpy BT.601 maths writing the planes (float32 / integer)                    22.6 / 27.1
rgb24 frame straight into ``encode`` (PyAV runs swscale inside)              convert+encode 2.2
``from_numpy_buffer`` (zero copy) + one long-lived ``VideoReformatter``      1.0; convert+encode 2.0
  ... same with swscale ``threads=1``                                        1.6
=========================================================================  ==========

``from_ndarray`` copies the array (0.2 ms, but 2.3 ms on a cold allocator) and ``frame.reformat``
builds a new swscale context on every call (+0.5 ms); wrapping the numpy buffer and keeping one
reformatter (swscale slice threads, automatic count) is the fastest, so
:meth:`H264Encoder.to_video_frame` does that. x264 ultrafast/zerolatency then encodes a frame in
1-3 ms depending on content.
A conversion thread overlapping frame N+1 with the encode of frame N was tried and not kept: it
raised throughput only from 2.6-3.3 to 2.2-2.3 ms/frame (swscale and x264 already use both cores),
leaves the latency of each frame as it was, and the node renders one frame per tick anyway.

Only the rows that changed are converted when the caller says which (``encode(..., changed=box)``,
the app's damage): the encoder keeps its last yuv420p picture and reconverts a band of full rows
(0.13 ms for 32 rows at 720p, against 1-2 ms for the frame). The band (the change and
:data:`BAND_REACH` rows around it, whose chroma it can alter) is converted with
:data:`BAND_CONTEXT` rows of context on each side and only its inner rows are copied, which gives
the same bytes as converting the whole picture (swscale treats a slice's first and last rows
differently; tests/test_codec.py checks the equality). Every keyframe is converted in full, so an
app whose damage is ever wrong shows it for one GOP at most.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, Protocol

import av
import numpy as np
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
"""A rectangle of a picture: ``(x0, y0, x1, y1)``, x1 and y1 exclusive."""


def box_union(a: Box | None, b: Box) -> Box:
    """The smallest box holding ``a`` (None: nothing) and ``b``."""
    if a is None:
        return b
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


BAND_REACH = 2
"""Rows above and below a change whose chroma it can alter (swscale's vertical chroma filter spans
more than the two rows of a 4:2:0 sample): they are written too (an even number)."""
BAND_CONTEXT = 6
"""Rows converted above and below the rows written, and dropped (an even number)."""

__all__ = [
    "AUDIO_CHANNELS",
    "AUDIO_FRAME",
    "AUDIO_RATE",
    "Box",
    "CodecParams",
    "DecodeError",
    "Decoder",
    "EncodedPacket",
    "Encoder",
    "H264Decoder",
    "H264Encoder",
    "OpusDecoder",
    "OpusEncoder",
    "Yuv420Picture",
    "available_codecs",
    "get_decoder",
    "get_encoder",
    "h264_is_keyframe",
    "register_codec",
]


@dataclass(frozen=True, slots=True)
class EncodedPacket:
    """One compressed access unit (one frame in, one packet out)."""

    data: bytes
    pts: int
    keyframe: bool


@dataclass(frozen=True, slots=True)
class CodecParams:
    """What a decoder needs to know about a stream; the video envelope carries it on keyframes."""

    codec: str
    width: int
    height: int
    fps: float


class DecodeError(ValueError):
    """A packet could not be decoded. The decoder then waits for the next keyframe."""


class Encoder(Protocol):
    name: ClassVar[str]

    @property
    def params(self) -> CodecParams: ...

    def encode(
        self, frame: np.ndarray, pts: int, force_keyframe: bool = False, changed: Box | None = None
    ) -> list[EncodedPacket]: ...

    def close(self) -> None: ...


class Decoder(Protocol):
    name: ClassVar[str]

    @property
    def waiting_for_keyframe(self) -> bool: ...

    def decode(self, data: bytes, pts: int | None = None) -> list[av.VideoFrame]: ...

    def to_rgb(self, frame: av.VideoFrame) -> np.ndarray: ...

    def reset(self) -> None: ...


# ---------------------------------------------------------------------------------------------------
# registry

_CODECS: dict[str, tuple[type[Any], type[Any]]] = {}


def register_codec(name: str, encoder: type[Any], decoder: type[Any]) -> None:
    """Make ``name`` available to :func:`get_encoder` / :func:`get_decoder`."""
    _CODECS[name] = (encoder, decoder)


def available_codecs() -> list[str]:
    return sorted(_CODECS)


def _lookup(name: str) -> tuple[type[Any], type[Any]]:
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}") from None


def get_encoder(name: str, width: int, height: int, fps: float, **options: Any) -> Encoder:
    """Build an encoder for codec ``name`` (e.g. ``"h264"``); options go to its constructor."""
    return _lookup(name)[0](width, height, fps, **options)


def get_decoder(name: str, **options: Any) -> Decoder:
    return _lookup(name)[1](**options)


# ---------------------------------------------------------------------------------------------------
# H.264


def _check_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != (height, width, 3):
        got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"expected a ({height}, {width}, 3) uint8 RGB array, got {got}")
    return np.ascontiguousarray(frame)


class Yuv420Picture:
    """An RGB picture kept converted to yuv420p (BT.601, limited range), updated a band of rows at a
    time: :meth:`update` with the rectangle that changed reconverts only the rows it covers."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.frame: av.VideoFrame | None = None
        self.rows_converted = 0
        self._reformatter = VideoReformatter()
        self._planes: list[np.ndarray] = []

    def convert(self, rgb: np.ndarray) -> av.VideoFrame:
        """A new yuv420p frame of a contiguous RGB array (any number of rows)."""
        self.rows_converted += rgb.shape[0]
        src = av.VideoFrame.from_numpy_buffer(rgb, format="rgb24")
        return self._reformatter.reformat(src, format="yuv420p")

    def planes(self) -> list[np.ndarray]:
        """Views of the kept picture's Y, U and V planes (rows x width, no line padding)."""
        return self._planes

    def update(self, rgb: np.ndarray, changed: Box | None = None) -> av.VideoFrame:
        """The kept picture, brought up to ``rgb`` (contiguous, (height, width, 3)): in full when
        ``changed`` is None or nothing is kept yet, else only the rows ``changed`` covers."""
        if changed is None or self.frame is None:
            self.frame = self.convert(rgb)
            self._planes = [
                np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[
                    : self.height >> (i > 0), : self.width >> (i > 0)
                ]
                for i, p in enumerate(self.frame.planes)
            ]
        elif changed[2] > changed[0]:
            self._update_rows(rgb, changed[1], changed[3])
        return self.frame

    def _update_rows(self, rgb: np.ndarray, top: int, bottom: int) -> None:
        y0 = max(0, top - BAND_REACH) & ~1
        y1 = min(self.height, bottom + BAND_REACH + (bottom & 1))
        if y1 <= y0:
            return
        b0, b1 = max(0, y0 - BAND_CONTEXT), min(self.height, y1 + BAND_CONTEXT)
        band = self.convert(rgb[b0:b1])
        for i, (dst, p) in enumerate(zip(self._planes, band.planes, strict=True)):
            s = 1 if i else 0
            src = np.frombuffer(p, np.uint8).reshape(-1, p.line_size)
            dst[y0 >> s : y1 >> s] = src[(y0 - b0) >> s : (y1 - b0) >> s, : dst.shape[1]]


class H264Encoder:
    """libx264 in yuv420p, ``tune=zerolatency``, no B-frames: one packet out for every frame in.

    IDR frames come on the first frame, on ``force_keyframe`` and whenever ``gop_seconds`` of pts
    have passed since the last one (timed on pts, so an app that renders only on change still gets
    a keyframe every ``gop_seconds`` it is shown). SPS/PPS are repeated in front of every IDR (Annex
    B, no global header), so any keyframe decodes on its own.

    ``pts`` is in units of ``time_base`` (default ``1/fps``: pass the frame tick number; pass
    ``time_base=Fraction(1, 1000)`` to give milliseconds) and must increase strictly.
    """

    name: ClassVar[str] = "h264"

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        bitrate: int = 2_000_000,
        preset: str = "ultrafast",
        gop_seconds: float = 2.0,
        time_base: Fraction | None = None,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even for yuv420p, got {width}x{height}")
        if fps <= 0 or bitrate <= 0 or gop_seconds <= 0:
            raise ValueError("fps, bitrate and gop_seconds must be positive")
        self.width = width
        self.height = height
        self.fps = fps
        self.bitrate = bitrate
        self.gop_seconds = gop_seconds
        rate = Fraction(fps).limit_denominator(1001)
        self.time_base = time_base if time_base is not None else 1 / rate
        self._gop_ticks = gop_seconds / float(self.time_base)
        self._last_pts: int | None = None
        self._last_key_pts: int | None = None
        self._picture = Yuv420Picture(width, height)  # the last picture encoded

        kbps = max(1, bitrate // 1000)
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width = width
        ctx.height = height
        ctx.pix_fmt = "yuv420p"
        ctx.framerate = rate
        ctx.time_base = self.time_base
        ctx.bit_rate = bitrate
        ctx.max_b_frames = 0
        ctx.options = {
            "preset": preset,
            "tune": "zerolatency",
            "forced-idr": "1",  # a forced I frame is an IDR, not a recovery-point I frame
            "x264-params": ":".join(
                [
                    "bframes=0",
                    "repeat-headers=1",  # SPS/PPS before every IDR
                    "annexb=1",
                    # keyframes are placed from Python (pts-timed), not by frame count or scene cuts
                    "keyint=infinite",
                    "scenecut=0",
                    # say what to_video_frame produced (BT.601, limited range): without these tags a
                    # decoder guesses from the size, and browsers take an HD picture for BT.709
                    "colormatrix=smpte170m",
                    "colorprim=smpte170m",
                    "transfer=smpte170m",
                    "range=tv",
                    f"vbv-maxrate={kbps}",
                    f"vbv-bufsize={kbps}",
                ]
            ),
        }
        ctx.open()
        self._ctx: Any = ctx
        logger.debug(
            "h264 encoder open %dx%d @ %s fps, %d kbit/s, preset %s", width, height, fps, kbps, preset
        )

    @property
    def params(self) -> CodecParams:
        return CodecParams(self.name, self.width, self.height, float(self.fps))

    def to_video_frame(self, frame: np.ndarray) -> av.VideoFrame:
        """RGB (H, W, 3) uint8 -> a new yuv420p frame (BT.601, limited range).

        The result owns its pixels, so the caller may reuse ``frame`` as soon as this returns.
        """
        return self._picture.convert(_check_frame(frame, self.width, self.height))

    @property
    def rows_converted(self) -> int:
        """Picture rows converted from RGB so far (a full picture counts its height)."""
        return self._picture.rows_converted

    def encode(
        self, frame: np.ndarray, pts: int, force_keyframe: bool = False, changed: Box | None = None
    ) -> list[EncodedPacket]:
        """Convert and encode one RGB picture. ``changed``: the part of it that differs from the
        picture passed the call before (None: unknown, all of it; an empty box: none of it); only
        the rows it covers are converted again, except on keyframes (always converted in full)."""
        rgb = _check_frame(frame, self.width, self.height)
        keyframe = self._keyframe_due(pts, force_keyframe)
        yuv = self._picture.update(rgb, None if keyframe else changed)
        return self.encode_frame(yuv, pts, keyframe)

    def _keyframe_due(self, pts: int, force: bool) -> bool:
        return force or self._last_key_pts is None or pts - self._last_key_pts >= self._gop_ticks

    def encode_frame(
        self, frame: av.VideoFrame, pts: int, force_keyframe: bool = False
    ) -> list[EncodedPacket]:
        """Encode an already converted yuv420p frame (see :meth:`to_video_frame`)."""
        if self._ctx is None:
            raise RuntimeError("encoder is closed")
        if self._last_pts is not None and pts <= self._last_pts:
            raise ValueError(f"pts must increase strictly: {pts} after {self._last_pts}")
        keyframe = self._keyframe_due(pts, force_keyframe)
        frame.pts = pts
        frame.time_base = self.time_base
        frame.pict_type = PictureType.I if keyframe else PictureType.NONE
        packets = [
            EncodedPacket(bytes(p), int(p.pts) if p.pts is not None else pts, bool(p.is_keyframe))
            for p in self._ctx.encode(frame)
        ]
        self._last_pts = pts
        if keyframe:
            self._last_key_pts = pts
            if not any(p.keyframe for p in packets):
                logger.warning("h264 encoder: keyframe requested at pts %d but none came out", pts)
        return packets

    def close(self) -> None:
        """Free the encoder (x264 buffers, threads). Idempotent; a new encoder starts with an IDR."""
        if self._ctx is not None:
            self._ctx = None
            logger.debug("h264 encoder closed")

    def __enter__(self) -> H264Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nal_types(data: bytes) -> list[int]:
    """NAL unit types of an Annex B access unit, up to and including its first slice."""
    types: list[int] = []
    i = data.find(b"\x00\x00\x01")
    while i != -1 and i + 3 < len(data):
        nal = data[i + 3] & 0x1F
        types.append(nal)
        if 1 <= nal <= 5:  # first VCL NAL: the rest of the unit is slice data
            break
        i = data.find(b"\x00\x00\x01", i + 3)
    return types


def h264_is_keyframe(data: bytes) -> bool:
    """True if this Annex B access unit holds an IDR slice (NAL type 5)."""
    return 5 in _nal_types(data)


class H264Decoder:
    """FFmpeg's H.264 decoder, slice threads only (frame threads would delay output by frames).

    Until it has seen a keyframe (at start, after :meth:`reset` and after a :class:`DecodeError`)
    it drops non-keyframe packets and returns ``[]``; :attr:`waiting_for_keyframe` tells the
    caller to ask the node for one.
    """

    name: ClassVar[str] = "h264"

    def __init__(self) -> None:
        self._ctx: Any = None
        self._reformatter = VideoReformatter()
        self._waiting = True

    @property
    def waiting_for_keyframe(self) -> bool:
        return self._waiting

    def _open(self) -> Any:
        ctx = av.CodecContext.create("h264", "r")
        ctx.thread_type = "SLICE"
        ctx.open()
        return ctx

    def decode(self, data: bytes, pts: int | None = None) -> list[av.VideoFrame]:
        """Decode one packet. Raises :class:`DecodeError` on anything the decoder refuses."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"packet must be bytes, not {type(data).__name__}")
        data = bytes(data)
        if not (data.startswith(b"\x00\x00\x01") or data.startswith(b"\x00\x00\x00\x01")):
            self._fail()
            raise DecodeError(f"not an Annex B H.264 access unit ({len(data)} bytes)")
        keyframe = h264_is_keyframe(data)
        if self._waiting and not keyframe:
            logger.debug("h264 decoder: dropping a non-keyframe packet while waiting for a keyframe")
            return []
        if self._ctx is None:
            self._ctx = self._open()
        packet = av.Packet(data)
        packet.pts = pts
        try:
            frames = self._ctx.decode(packet)
        except av.FFmpegError as e:
            self._fail()
            raise DecodeError(f"h264 decode failed: {e}") from e
        self._waiting = False
        return list(frames)

    def decode_rgb(self, data: bytes, pts: int | None = None) -> list[np.ndarray]:
        return [self.to_rgb(f) for f in self.decode(data, pts)]

    def to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """A decoded frame as an (H, W, 3) uint8 RGB array."""
        return self._reformatter.reformat(frame, format="rgb24").to_ndarray()

    def _fail(self) -> None:
        # drop the reference state; the next keyframe starts from a fresh decoder
        self._ctx = None
        self._waiting = True

    def reset(self) -> None:
        """Forget all state (e.g. after a gap in the stream); decoding resumes at the next keyframe."""
        self._fail()


register_codec("h264", H264Encoder, H264Decoder)


# ---------------------------------------------------------------------------------------------------
# audio: Opus (libopus through PyAV), 48 kHz stereo s16, 20 ms frames

AUDIO_RATE = 48000
AUDIO_CHANNELS = 2
AUDIO_FRAME = 960
"""Samples per channel in one Opus frame (20 ms at 48 kHz): what the encoder takes per call."""


class OpusEncoder:
    """PCM (s16 interleaved, :data:`AUDIO_FRAME` samples per channel per call) -> Opus packets.

    ``lowdelay`` (CELT only: no SILK look-ahead) and 20 ms frames; ``pts`` counts samples. About
    0.35 ms of CPU per frame (1.7 % of a core while sound plays)."""

    name: ClassVar[str] = "opus"

    def __init__(self, bitrate: int = 96_000) -> None:
        ctx = av.CodecContext.create("libopus", "w")
        ctx.sample_rate = AUDIO_RATE
        ctx.layout = "stereo" if AUDIO_CHANNELS == 2 else "mono"
        ctx.format = "s16"
        ctx.bit_rate = bitrate
        ctx.time_base = Fraction(1, AUDIO_RATE)
        ctx.options = {"application": "lowdelay", "frame_duration": "20"}
        ctx.open()
        self._ctx: Any = ctx

    def encode(self, pcm: bytes, pts: int) -> list[EncodedPacket]:
        """One frame of PCM (``AUDIO_FRAME * AUDIO_CHANNELS`` s16 samples) -> its packets."""
        a = np.frombuffer(pcm, dtype=np.int16).reshape(1, -1)
        if a.shape[1] != AUDIO_FRAME * AUDIO_CHANNELS:
            raise ValueError(f"an audio frame is {AUDIO_FRAME * AUDIO_CHANNELS * 2} bytes, got {len(pcm)}")
        frame = av.AudioFrame.from_ndarray(a, format="s16", layout=self._ctx.layout.name)
        frame.sample_rate = AUDIO_RATE
        frame.pts = pts
        return [EncodedPacket(bytes(p), int(p.pts or 0), True) for p in self._ctx.encode(frame)]

    def close(self) -> None:
        self._ctx = None


class OpusDecoder:
    """Opus packets -> s16 interleaved numpy arrays (the tests' and benchmarks' side; the page
    decodes with WebCodecs)."""

    def __init__(self) -> None:
        ctx = av.CodecContext.create("libopus", "r")
        ctx.sample_rate = AUDIO_RATE
        ctx.layout = "stereo" if AUDIO_CHANNELS == 2 else "mono"
        self._ctx: Any = ctx

    def decode(self, data: bytes) -> np.ndarray:
        try:
            frames = self._ctx.decode(av.Packet(bytes(data)))
        except av.FFmpegError as e:
            raise DecodeError(f"opus decode failed: {e}") from e
        out = [f.to_ndarray().reshape(-1) for f in frames]
        if not out:
            return np.zeros(0, dtype=np.int16)
        a = np.concatenate(out)
        return a if a.dtype == np.int16 else (np.clip(a, -1, 1) * 32767).astype(np.int16)
