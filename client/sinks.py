"""Where decoded video goes: small plug-ins the player calls, so recording, snapshots and a viewer
are not ``if record:`` branches in the receive loop.

A sink sees every packet the player accepted for decoding (``on_packet``: a keyframe first, then the
packets that follow it without a gap) and every decoded frame (``on_frame``). ``close`` is called
once, when the player stops.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from cloudq.wire import VideoPacket

log = logging.getLogger(__name__)

PTS_TIME_BASE = Fraction(1, 1000)
"""The node stamps packets in milliseconds (see ``MediaConfig.encoder``)."""


class Sink:
    """Base class: override what you need."""

    def on_packet(self, vp: VideoPacket) -> None:
        """A packet accepted for decoding (the stream from a keyframe on, without gaps)."""

    def on_frame(self, frame: av.VideoFrame, vp: VideoPacket) -> None:
        """A decoded picture and the packet it came from."""

    def close(self) -> None:
        """The player stopped."""


class CallbackSink(Sink):
    """Hands each decoded frame to ``fn(frame, packet)`` (e.g. a viewer window)."""

    def __init__(self, fn: Callable[[av.VideoFrame, VideoPacket], Any]) -> None:
        self.fn = fn

    def on_frame(self, frame: av.VideoFrame, vp: VideoPacket) -> None:
        self.fn(frame, vp)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """An (H, W, 3) uint8 array as an 8-bit RGB PNG (zlib, no filter), written atomically."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(rgb).reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)


class SnapshotSink(Sink):
    """Keeps the last decoded frame and writes it as a PNG on close (or on :meth:`write`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.last: av.VideoFrame | None = None

    def on_frame(self, frame: av.VideoFrame, vp: VideoPacket) -> None:
        self.last = frame  # a reference-counted picture: keeping it costs no copy

    def write(self) -> bool:
        if self.last is None:
            log.warning("snapshot: no frame decoded, %s not written", self.path)
            return False
        write_png(self.path, self.last.to_ndarray(format="rgb24"))
        log.info("snapshot written to %s", self.path)
        return True

    def close(self) -> None:
        self.write()


class Mp4Recorder(Sink):
    """Remuxes the received H.264 packets into an MP4 file, without re-encoding.

    The output stream is copied from the parameters of the first keyframe (parsed by FFmpeg's
    H.264 demuxer, which also gives the ``avcC`` extradata MP4 needs). Timestamps are the node's
    millisecond pts, shifted so the file starts at 0 and never goes back (a session that moved to
    another node restarts its pts).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.packets = 0
        self._out: Any = None
        self._stream: Any = None
        self._size: tuple[int, int] | None = None
        self._offset: int | None = None
        self._last = -1

    def _open(self, vp: VideoPacket) -> None:
        template = av.open(io.BytesIO(vp.data), format="h264")
        try:
            src = template.streams.video[0]
            self._out = av.open(str(self.path), "w", format="mp4")
            self._stream = self._out.add_stream_from_template(src)
            self._stream.time_base = PTS_TIME_BASE
            self._size = (src.width, src.height)
        finally:
            template.close()

    def on_packet(self, vp: VideoPacket) -> None:
        if self._out is None:
            if not vp.keyframe:
                return
            try:
                self._open(vp)
            except (av.FFmpegError, IndexError, OSError) as e:
                log.warning("recorder: cannot start %s: %s", self.path, e)
                return
        if vp.has_params and self._size and (vp.width, vp.height) != self._size:
            log.warning("recorder: picture size changed to %sx%s; not recorded", vp.width, vp.height)
            return
        if self._offset is None or vp.pts + self._offset <= self._last:
            self._offset = self._last + 1 - vp.pts
        pts = vp.pts + self._offset
        pkt = av.Packet(vp.data)
        pkt.pts = pkt.dts = pts
        pkt.time_base = PTS_TIME_BASE
        pkt.is_keyframe = vp.keyframe
        pkt.stream = self._stream
        try:
            self._out.mux(pkt)
        except av.FFmpegError as e:
            log.warning("recorder: packet %d not recorded: %s", vp.seq, e)
            return
        self._last = pts
        self.packets += 1

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
            log.info("recorded %d packets to %s", self.packets, self.path)
