"""The client kernel's video receiver: XREAD BLOCK on the session's video stream, validate, decode,
hand frames to sinks.

Every entry goes through :meth:`VideoPacket.unpack` (size, msgpack, fields) before the decoder sees
it, and the decoder only ever gets an Annex B access unit that starts a clean chain: a keyframe,
then packets whose ``seq`` follows without a gap. Anything else (a bad entry, a gap, a decode error)
is logged and counted, the chain is dropped until the next keyframe, and the node is asked for one
(rate-limited by :class:`~cloudq.client.kernel.InputSender`).

When the player falls behind (a batch spans more than ``max_lag`` seconds of stream time, or more
than ``batch`` entries are waiting) it jumps to the newest keyframe instead of replaying old frames.
Where to start and when to jump are :mod:`cloudq.streamread`'s decisions (the gateway's socket
makes the same ones); this module does the reading and the decoding.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import av
import numpy as np
import redis

from cloudq.client.sinks import Sink
from cloudq.codec import Decoder, get_decoder, h264_is_keyframe
from cloudq.connection import read_block
from cloudq.keys import Keys
from cloudq.retry import Backoff, passing
from cloudq.streamread import BATCH, MAX_LAG, Cursor, Entry, KeyframeScan
from cloudq.wire import BadMessage, VideoPacket

log = logging.getLogger(__name__)

BLOCK = 5.0
"""Seconds the player's ``XREAD`` blocks (at most half its connection's socket timeout). A sleeping
node sends nothing: a shorter block only woke the server for an empty reply (a 0.25 s block, four
times a second for every idle client). Stopping does not wait for it: :meth:`Player.interrupt`."""


def thread_failed(what: str, exc: BaseException) -> str:
    """A client thread (``what``) stops on an error it cannot survive: log it (the traceback at
    debug: a user sees the reason, not the stack) and return the reason its owner reports."""
    why = f"{type(exc).__name__}: {exc}"
    log.error("%s stopped: %s", what, why)
    log.debug("%s stopped", what, exc_info=exc)
    return why


class Player:
    """Receives one session's video. ``poll()`` does one XREAD; ``run(stop)`` loops until ``stop``."""

    failure: str | None = None
    """Why :meth:`run` stopped on its own (an error it cannot survive); None while it plays."""

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        sid: str,
        sinks: Iterable[Sink] = (),
        request_keyframe: Callable[[], object] | None = None,
        max_lag: float = MAX_LAG,
        batch: int = BATCH,
        block: float = BLOCK,
        codec: str = "h264",
    ) -> None:
        self.r = r
        self.key = keys.video(sid)
        self.sinks = list(sinks)
        self.request_keyframe = request_keyframe or (lambda: None)
        self.cursor = Cursor(max_lag, batch)
        self.block = read_block(r, block)
        # the blocking read's own connection, outside the pool and without redis-py's retries, so
        # that interrupt() ends a blocked read at once (a retried read would block again)
        self._conn: redis.connection.AbstractConnection | None = None
        self._interrupted = False
        self._lock = threading.Lock()
        self.decoder: Decoder = get_decoder(codec)
        self.counters: Counter[str] = Counter()
        self.expected_seq: int | None = None
        self.last_frame: av.VideoFrame | None = None
        self.last_packet: VideoPacket | None = None

    # -- where to read (the decisions are cloudq.streamread's) ---------------------------------
    @property
    def last_id(self) -> bytes | None:
        """The id the next XREAD reads after (None: not placed yet)."""
        return self.cursor.last

    def scan(self, after: bytes = b"0-0") -> KeyframeScan:
        """Look for the newest keyframe entry newer than ``after`` (back from the stream's end)."""
        scan = KeyframeScan(after)
        while not scan.feed(self.r.xrevrange(self.key, **scan.page())):
            pass
        return scan

    def seek_start(self) -> None:
        """Start at the newest keyframe (the last picture shows at once), else at the stream's end."""
        if self.cursor.start(self.scan()):
            self._lost("no keyframe in the stream")

    # -- receiving --------------------------------------------------------------------------
    def poll(self, block: float | None = None) -> int:
        """One XREAD (blocking up to ``block`` s); returns how many frames were decoded."""
        if self.cursor.last is None:
            self.seek_start()
        assert self.cursor.last is not None
        wait = self.block if block is None else block
        resp = self._xread(wait)
        if not resp:
            return 0
        entries: list[Entry] = resp[0][1]
        if self.cursor.behind(entries) and self._jump():
            return 0
        decoded = 0
        for entry_id, fields in entries:
            self.cursor.last = entry_id
            decoded += self.handle(entry_id, fields)
        return decoded

    def _xread(self, wait: float) -> list[Any] | None:
        """One blocking XREAD on the player's own connection (parsed as ``Redis.xread`` does)."""
        if self._conn is None:
            self._conn = self.r.connection_pool.make_connection()
        conn = self._conn
        try:
            with self._lock:  # sent (and connected) either before interrupt() or not at all
                if self._interrupted:
                    raise redis.ConnectionError("the player was stopped")
                conn.send_command(
                    "XREAD", "COUNT", self.cursor.batch, "BLOCK", max(1, int(wait * 1000)), "STREAMS",
                    self.key, self.cursor.last,
                )  # fmt: skip
            return self.r.parse_response(conn, "XREAD")
        except redis.ResponseError:
            raise
        except BaseException:
            conn.disconnect()  # the next read connects again (the loop backs off meanwhile)
            raise

    def interrupt(self) -> None:
        """End a read blocked in :meth:`poll` now (from another thread; after setting ``stop``)."""
        with self._lock:
            self._interrupted = True
            conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()

    def _jump(self) -> bool:
        assert self.cursor.last is not None
        scan = self.scan(after=self.cursor.last)
        if not self.cursor.jump(scan):
            return False  # the newest keyframe is behind us: decode through to catch up
        self.counters["jumps"] += 1
        log.info("video: behind; skipping to the newest keyframe %s", (scan.found or b"").decode())
        self.decoder.reset()
        self.expected_seq = None
        return True

    def handle(self, entry_id: bytes, fields: dict[bytes, bytes]) -> int:
        """Validate and decode one stream entry; never raises for bad data."""
        self.counters["entries"] += 1
        try:
            vp = VideoPacket.unpack(fields)
        except BadMessage as e:
            self.counters["bad_entries"] += 1
            self._lost(f"bad video entry {entry_id.decode()}: {e.reason}")
            return 0
        if self.expected_seq is not None and vp.seq != self.expected_seq and not vp.keyframe:
            self.counters["gaps"] += 1
            self.expected_seq = vp.seq + 1
            self._lost(f"gap: seq {vp.seq}, expected {self.expected_seq - 1}")
            return 0
        self.expected_seq = vp.seq + 1
        if self.decoder.waiting_for_keyframe and not (vp.keyframe and h264_is_keyframe(vp.data)):
            self.counters["dropped"] += 1
            return 0
        try:
            frames = self.decoder.decode(vp.data, vp.pts)
        except Exception as e:  # DecodeError, or anything else FFmpeg/PyAV raise on hostile data
            self.counters["decode_errors"] += 1
            self._lost(f"undecodable packet seq {vp.seq}: {e}")
            return 0
        self.counters["packets"] += 1
        self.counters["bytes"] += len(vp.data)
        self.last_packet = vp
        for sink in self.sinks:
            self._call(sink.on_packet, vp)
        for frame in frames:
            self.counters["frames"] += 1
            self.last_frame = frame
            for sink in self.sinks:
                self._call(sink.on_frame, frame, vp)
        return len(frames)

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # a failing sink (viewer, disk full) must not stop playback
            self.counters["sink_errors"] += 1
            log.exception("video: sink %s failed", getattr(fn, "__qualname__", fn))

    def _lost(self, why: str) -> None:
        """Drop everything until the next keyframe and ask the node for one."""
        log.warning("video: %s; waiting for a keyframe", why)
        self.decoder.reset()
        self.request_keyframe()

    def to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        return self.decoder.to_rgb(frame)

    def run(self, stop: threading.Event) -> None:
        """Play until ``stop``. Redis errors that pass (:func:`cloudq.retry.passing`) are retried;
        anything else ends the thread with :attr:`failure` set, which ends the session."""
        backoff = Backoff(0.1, 0.5)
        try:
            while not stop.is_set():
                try:
                    self.poll()
                    backoff.reset()
                except Exception as exc:
                    if stop.is_set():
                        return  # interrupted (its connection closed under it)
                    if not passing(exc):
                        self.failure = thread_failed("video: the player", exc)
                        return
                    # the session's reconnection is the launcher's business: keep trying quietly
                    self.counters["redis_errors"] += 1
                    log.warning("video: redis error (%s)", exc)
                    backoff.wait(stop)
        finally:
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.disconnect()
            self._conn = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("video: sink %s failed to close", type(sink).__name__)
        self.sinks = []
