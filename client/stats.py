"""What a client session saw, for its status line and ``--stats-json``.

:class:`StatsSink` is a player sink (keyframes, fps and bitrate over the last two seconds) and
also measures **input latency** without any help from the app: for each input event the client
sent, the time from sending it (``client_time``) to decoding the first frame whose
``capture_time`` is later. That frame is the first one that *could* show the input; with the node
rendering on input at once it is the one that does. Both clocks are ``time.time()``, so across
hosts the figure is only as good as their clock sync (NTP: a few ms). An event no frame answers
within ``LATENCY_HORIZON`` seconds (an input that changed nothing, a sleeping node) is not counted.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from typing import Any

import av

from cloudq.client.sinks import Sink
from cloudq.percentile import percentile
from cloudq.wire import InputEvent, VideoPacket

WINDOW = 2.0
LATENCY_HORIZON = 5.0
MAX_SAMPLES = 2000


class StatsSink(Sink):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keyframes = 0
        self.frames = 0
        self.first_frame = threading.Event()
        self.last_frame_at: float | None = None  # monotonic
        self._recent: collections.deque[tuple[float, int, bool]] = collections.deque()  # (t, bytes, frame)
        self._pending: collections.deque[float] = collections.deque()  # client_time of unanswered input
        self.latencies_ms: list[float] = []
        self.unanswered = 0

    # -- sink -------------------------------------------------------------------------------
    def on_packet(self, vp: VideoPacket) -> None:
        with self.lock:
            self.keyframes += vp.keyframe
            self._recent.append((time.monotonic(), len(vp.data), False))

    def on_frame(self, frame: av.VideoFrame, vp: VideoPacket) -> None:
        now, wall = time.monotonic(), time.time()
        with self.lock:
            self.frames += 1
            self.last_frame_at = now
            self._recent.append((now, 0, True))
            while self._pending and self._pending[0] <= vp.capture_time:
                sent = self._pending.popleft()
                if len(self.latencies_ms) < MAX_SAMPLES:
                    self.latencies_ms.append(round((wall - sent) * 1000, 2))
                self.last_latency_ms = round((wall - sent) * 1000, 2)
        self.first_frame.set()

    last_latency_ms: float | None = None

    # -- input ------------------------------------------------------------------------------
    def on_sent(self, ev: InputEvent) -> None:
        with self.lock:
            while self._pending and ev.client_time - self._pending[0] > LATENCY_HORIZON:
                self._pending.popleft()
                self.unanswered += 1
            self._pending.append(ev.client_time)

    # -- summaries --------------------------------------------------------------------------
    def rates(self) -> tuple[float, float]:
        """(frames per second, bits per second) over the last ``WINDOW`` seconds."""
        now = time.monotonic()
        with self.lock:
            while self._recent and now - self._recent[0][0] > WINDOW:
                self._recent.popleft()
            frames = sum(1 for _, _, f in self._recent if f)
            size = sum(b for _, b, _ in self._recent)
        return frames / WINDOW, size * 8 / WINDOW

    def latency_summary(self) -> dict[str, Any]:
        with self.lock:
            lat = list(self.latencies_ms)
        return {
            "count": len(lat),
            "p50": percentile(lat, 50) if lat else None,
            "p99": percentile(lat, 99) if lat else None,
            "last": self.last_latency_ms,
            "unanswered": self.unanswered,
            "samples": lat,
        }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
