"""A session's sound on a node: read what the app plays (:meth:`App.audio_capture`: a FIFO of s16le
48 kHz stereo, the pipe sink of the session's PulseAudio server for x11 apps), encode it as Opus
(:class:`cloudq.codec.OpusEncoder`, 20 ms frames) and XADD one :class:`~cloudq.wire.AudioPacket`
per frame to ``session:{sid}:audio``.

It runs only while the session is awake (:class:`~cloudq.workers.streamer.Streamer` starts it on
wake and stops it on sleep and close): asleep, nothing is read, encoded or written. At each start
what the pipe holds (played while nobody listened) is thrown away. Silence is not sent: after
:data:`SILENT_TAIL` frames of digital silence (all samples zero) frames are skipped until sound
comes back, so a quiet program costs the reads only. One thread per session waits in ``select`` on
the FIFO and a stop pipe (no polling); a Redis error drops that frame (counted) and it goes on.

The FIFO may be in a directory the app's program can write to (x11: its sandbox's sound
directory): it is opened without following a symlink, and anything but a FIFO is refused, so a
program cannot make the node read a file of the node's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import threading
import time
from collections import Counter

import numpy as np
import redis

from cloudq.codec import AUDIO_CHANNELS, AUDIO_FRAME, AUDIO_RATE, OpusEncoder
from cloudq.wire import AudioPacket, BadMessage

log = logging.getLogger(__name__)

__all__ = ["AUDIO_MAXLEN", "SILENT_TAIL", "AudioStreamer", "open_fifo"]

FRAME_BYTES = AUDIO_FRAME * AUDIO_CHANNELS * 2
AUDIO_MAXLEN = 250
"""MAXLEN ~ of the audio stream: 5 s of 20 ms packets (a reader further behind skips ahead)."""
SILENT_TAIL = 10
"""Silent frames still sent after sound (200 ms: the decoder's tail; the page's buffer drains)."""
_COUNTERS = ("starts", "packets", "bytes", "silent_frames", "encode_us", "dropped", "failed", "refused")


def open_fifo(path: str) -> int:
    """A non-blocking read descriptor of the FIFO at ``path``; ``OSError`` if it is a symlink or
    not a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a FIFO")
    return fd


class AudioStreamer:
    """Read, encode and stream one session's sound while :meth:`start`-ed."""

    def __init__(self, r: redis.Redis, key: str, counters: Counter[str], maxlen: int = AUDIO_MAXLEN) -> None:
        self.r, self.key, self.counters, self.maxlen = r, key, counters, maxlen
        self.seq = self._next_seq()
        self.t0 = time.monotonic()
        self.thread: threading.Thread | None = None
        self._stop_w: int | None = None
        for name in _COUNTERS:
            counters[f"audio_{name}"] += 0  # the thread adds no key: the node copies them meanwhile

    def _next_seq(self) -> int:
        last = self.r.xrevrange(self.key, count=1)
        if last:
            with contextlib.suppress(BadMessage):
                return AudioPacket.unpack(last[0][1]).seq + 1
        return 0

    @property
    def running(self) -> bool:
        return self.thread is not None

    def start(self, fifo: str | None) -> None:
        """Start streaming what ``fifo`` carries (None: the app makes no sound). Idempotent."""
        if self.thread is not None or not fifo:
            return
        try:
            fd = open_fifo(fifo)
        except OSError as e:
            self.counters["audio_refused"] += 1
            log.warning("cannot read the session's sound: %s", e)
            return
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 65536):  # played while nobody listened
                pass
        stop_r, self._stop_w = os.pipe()
        self.counters["audio_starts"] += 1
        self.thread = threading.Thread(target=self._run, args=(fd, stop_r), name="audio", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop reading and encoding; returns once the thread has ended."""
        thread, w = self.thread, self._stop_w
        self.thread = self._stop_w = None
        if w is not None:
            os.close(w)  # the thread's select sees the stop pipe's end
        if thread is not None:
            thread.join(5)

    def _run(self, fd: int, stop_r: int) -> None:
        encoder = OpusEncoder()
        # pts: samples since this streamer began, wall-clock based at each start (sleep is a gap)
        pts = int((time.monotonic() - self.t0) * AUDIO_RATE)
        silent = SILENT_TAIL  # start quiet: the first sound opens the gate
        buf = bytearray()
        failing = False
        try:
            while True:
                ready, _, _ = select.select([fd, stop_r], [], [])
                if stop_r in ready:
                    return
                try:
                    chunk = os.read(fd, FRAME_BYTES - len(buf))
                except BlockingIOError:
                    continue
                if not chunk:  # no writer (the server ended): wait for the stop
                    select.select([stop_r], [], [])
                    return
                buf += chunk
                if len(buf) < FRAME_BYTES:
                    continue
                pcm, buf = bytes(buf), bytearray()
                captured = time.time()
                frame_pts, pts = pts, pts + AUDIO_FRAME
                if np.frombuffer(pcm, dtype=np.int16).any():
                    silent = 0
                else:
                    silent += 1
                    if silent > SILENT_TAIL:
                        self.counters["audio_silent_frames"] += 1
                        continue
                t = time.perf_counter()
                packets = encoder.encode(pcm, frame_pts)
                self.counters["audio_encode_us"] += int((time.perf_counter() - t) * 1e6)
                for p in packets:
                    ap = AudioPacket(
                        self.seq, p.pts, captured, p.data, rate=AUDIO_RATE, channels=AUDIO_CHANNELS
                    )
                    try:
                        self.r.xadd(self.key, ap.pack(), maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                        failing = False
                    except redis.RedisError as e:
                        self.counters["audio_dropped"] += 1
                        if not failing:
                            log.warning("audio packet dropped: %s", e)
                        failing = True
                        continue
                    self.seq += 1
                    self.counters["audio_packets"] += 1
                    self.counters["audio_bytes"] += len(p.data)
        except Exception:  # the node goes on without sound until the next wake
            self.counters["audio_failed"] += 1
            log.exception("audio streaming failed")
        finally:
            encoder.close()
            os.close(fd)
            os.close(stop_r)
