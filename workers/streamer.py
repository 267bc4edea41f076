"""A session's media on a node: the picture and encoder settings, and the :class:`Streamer` that
renders the app, encodes only what changed (plus keyframes: on start, on wake, on a client's
request, every ``gop`` seconds) and XADDs one video envelope per packet. The node loop
(``workers/node.py``) drives it; plug-ins watch it through :class:`MediaObserver`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import redis

from cloudq.codec import Box, Encoder, get_encoder
from cloudq.keys import Keys
from cloudq.state import CloseReason
from cloudq.wire import BadMessage as BadMedia
from cloudq.wire import InputEvent, VideoPacket
from cloudq.workers.apps import App
from cloudq.workers.audio import AudioStreamer
from cloudq.workers.data import workspace_root
from cloudq.workers.files import FileService

log = logging.getLogger(__name__)

INPUT_ANSWER = 0.1
"""Seconds after an input during which the app's changes are its answer: rendered at min_gap."""
KEYFRAME_REQUEST_GAP = 0.25
"""Seconds between two keyframes forced by client requests (a flood of requests costs one IDR)."""
CLIP_POLL = 1.0
"""At most this often (seconds, while awake) the node asks its app for new clipboard text."""
CLIP_MAXLEN = 4
"""Entries kept in a session's clip stream (exact trim: each may hold 1 MiB)."""
RESIZE_GAP = 0.25
"""Seconds between two resizes of the app's screen: a client sending many gets the last one it sent
at most four times a second (each one costs the program a redraw and the encoder a restart)."""
MIN_SIDE = 64
"""Smallest width or height a resize asks the app for."""


def default_workspace() -> str:
    return str(workspace_root())


@dataclass(frozen=True)
class MediaConfig:
    """Picture and encoder settings of one node (``cloudq node --size --fps --bitrate ...``)."""

    width: int = 1280
    height: int = 720
    fps: float = 30.0
    bitrate: int = 2_000_000
    preset: str = "ultrafast"
    gop: float = 2.0
    codec: str = "h264"
    workspace: str = field(default_factory=default_workspace)
    always_encode: bool = False
    """Encode every frame tick even when the app says nothing changed (a conventional streamer
    without the method; ``cloudq bench cost`` measures against it)."""
    max_width: int = 0
    """Largest picture a client's ``resize`` may ask for (``--max-size``; 0: the size)."""
    max_height: int = 0

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ValueError(f"size must be positive and even, got {self.width}x{self.height}")
        if not 0 < self.fps <= 240:
            raise ValueError(f"fps must be in (0, 240], got {self.fps}")
        if self.bitrate <= 0 or self.gop <= 0:
            raise ValueError("bitrate and gop must be positive")
        if self.max_width < 0 or self.max_height < 0 or self.max_width % 2 or self.max_height % 2:
            raise ValueError(f"max size must be even, got {self.max_width}x{self.max_height}")

    @property
    def max_size(self) -> tuple[int, int]:
        """The largest picture a session may have: ``max_width`` x ``max_height``, at least the size."""
        return max(self.width, self.max_width), max(self.height, self.max_height)

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """A size a client asked for, clamped to [:data:`MIN_SIDE`, :attr:`max_size`] and even."""
        max_w, max_h = self.max_size
        w = min(max(width, MIN_SIDE), max_w)
        h = min(max(height, MIN_SIDE), max_h)
        return w - w % 2, h - h % 2

    @property
    def period(self) -> float:
        return 1.0 / self.fps

    @property
    def min_gap(self) -> float:
        """Input-driven renders come at most this often (twice the frame rate)."""
        return 0.5 / self.fps

    @property
    def video_maxlen(self) -> int:
        """MAXLEN ~ of the video stream: two GOPs at the highest render rate (2 x fps), plus slack,
        so the newest keyframe and every packet after it are always still in the stream."""
        return 2 * math.ceil(2 * self.fps * self.gop) + 64

    def encoder(self, width: int | None = None, height: int | None = None) -> Encoder:
        """An encoder for pictures of ``width`` x ``height`` (default: the configured size)."""
        return get_encoder(
            self.codec,
            width or self.width,
            height or self.height,
            self.fps,
            bitrate=self.bitrate,
            preset=self.preset,
            gop_seconds=self.gop,
            time_base=Fraction(1, 1000),  # pts = milliseconds since the session's stream began
        )


class MediaObserver(Protocol):
    """A plug-in that watches the media loop (metrics): called after each encoded frame and after
    the first frame following a wake."""

    def on_frame(self, encode_s: float, nbytes: int) -> None: ...

    def on_wake_frame(self, latency_s: float) -> None: ...


class Streamer:
    """One session's media on a node: the app, the encoder (only while awake) and the video stream."""

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        sid: str,
        app: App,
        cfg: MediaConfig,
        counters: Counter[str],
        observer: MediaObserver | None = None,
        home: Path | None = None,
    ) -> None:
        self.observer = observer
        self.woke_at: float | None = None
        self.r = r
        self.key = keys.video(sid)
        self.app = app
        self.cfg = cfg
        self.counters = counters
        self.encoder: Encoder | None = None
        self.encoder_size: tuple[int, int] | None = None  # the pictures it takes
        self.size_wanted: tuple[int, int] | None = None  # the client's last resize, not yet applied
        self.last_resize = -math.inf
        self.sleeping = False
        self.seq = self._next_seq()
        self.t0 = time.monotonic()
        self.last_pts = -1
        self.next_frame = self.t0
        self.last_render = -math.inf
        self.last_frame = -math.inf  # when a frame was last encoded
        self.last_input = -math.inf
        self.last_input_render = -math.inf
        self.input_pending = False
        self.last_key = -math.inf
        self.last_forced = -math.inf
        self.key_requested = False
        self.unsaved_input = False  # user data changes only through input
        self.broken: str | None = None  # why the app cannot render any more
        self.clip_key = keys.clip(sid)  # the remote clipboard, out to the client
        self.last_clip = -math.inf
        self.audio = AudioStreamer(r, keys.audio(sid), counters)  # the app's sound, while awake
        # uploads into and downloads out of HOME (the app's data directory), asleep or awake
        self.files = FileService(r, keys, sid, home, counters) if home is not None else None
        if self.files is not None:
            self.files.start()

    def _next_seq(self) -> int:
        """Carry on the stream's numbering (a reconnecting client must not see seq go back)."""
        last = self.r.xrevrange(self.key, count=1)
        if last:
            try:
                return VideoPacket.unpack(last[0][1]).seq + 1
            except BadMedia as exc:
                log.warning("%s: the last entry is no video packet (%s); seq starts at 0", self.key, exc)
        return 0

    # -- what the node loop calls -----------------------------------------------------------
    def deadline(self) -> float | None:
        """Monotonic time of the next frame, or None while sleeping (nothing to do but wait)."""
        return None if self.sleeping else self.next_frame

    def on_input(self, ev: InputEvent) -> None:
        if ev.type == "keyframe_request":
            self.counters["keyframe_requests"] += 1
            self.key_requested = True
            return
        if ev.type == "resize":
            self._want_size(ev)
            return
        self.app.handle_input(ev)  # raising ends the session (the node's handler), never the node
        self.unsaved_input = True
        self.last_input = time.monotonic()
        # render at once; input-driven renders come at most every min_gap (each one also pushes the
        # periodic frame a full period on), so a mouse flood costs at most about 2x the frame rate
        self.input_pending = True
        due = max(time.monotonic(), self.last_input_render + self.cfg.min_gap)
        self.next_frame = min(self.next_frame, due)

    def _want_size(self, ev: InputEvent) -> None:
        """A client's window size: kept (the last one wins) and applied by :meth:`tick` at most once
        a :data:`RESIZE_GAP`, clamped to the node's maximum. An app without ``resize`` (the built-in
        ones) keeps its size: counted ``resize_ignored``, nothing else happens."""
        self.counters["resize_requests"] += 1
        if not callable(getattr(self.app, "resize", None)):
            self.counters["resize_ignored"] += 1
            return
        assert ev.width is not None and ev.height is not None  # the wire format checked
        self.size_wanted = self.cfg.fit(ev.width, ev.height)
        self.next_frame = min(self.next_frame, self.last_resize + RESIZE_GAP)

    def _resize(self, now: float) -> None:
        """Apply the wanted size; the next frame (a keyframe from a new encoder) has it."""
        assert self.size_wanted is not None
        (w, h), self.size_wanted, self.last_resize = self.size_wanted, None, now
        if (w, h) == (getattr(self.app, "width", None), getattr(self.app, "height", None)):
            return
        try:
            got = self.app.resize(w, h)  # type: ignore[attr-defined]
        except Exception as exc:  # the display refused: the session goes on at its size
            self.counters["resize_failed"] += 1
            log.warning("resize to %dx%d failed: %s", w, h, exc)
            return
        self.counters["resizes"] += 1
        log.info("session picture resized to %s (asked %dx%d)", got, w, h)

    def tick(self, now: float) -> None:
        if self.sleeping or now < self.next_frame:
            return
        if self.size_wanted is not None and now - self.last_resize >= RESIZE_GAP:
            self._resize(now)
        force = False
        if self.key_requested and now - self.last_forced >= KEYFRAME_REQUEST_GAP:
            force, self.key_requested, self.last_forced = True, False, now
        key_due = self.encoder is None or now - self.last_key >= self.cfg.gop
        try:
            if force or key_due or self.cfg.always_encode or self.app.changed():
                self._frame(now, force or key_due)
        except redis.RedisError:  # the node loop's business (backoff); the packet is lost: next an IDR
            self.last_key = -math.inf
            raise
        except Exception as exc:  # the app cannot render any more (e.g. its X server died)
            self._broke(exc)
        self.last_render = now
        if now - self.last_clip >= CLIP_POLL:
            self.last_clip = now
            self._clipboard()
        if self.input_pending:
            self.input_pending, self.last_input_render = False, now
        nxt = self.next_frame + self.cfg.period
        if nxt <= now:  # fell behind (or rendered on input): start the clock again from now
            if now - self.next_frame > self.cfg.period:
                self.counters["late_frames"] += 1
            nxt = now + self.cfg.period
        if self.size_wanted is not None:  # a resize held back by RESIZE_GAP
            nxt = min(nxt, max(now, self.last_resize + RESIZE_GAP))
        self.next_frame = nxt

    def _clipboard(self) -> None:
        """Publish the app's clipboard text if a program there set it (at most once a CLIP_POLL)."""
        take = getattr(self.app, "clipboard_text", None)
        if take is None:
            return
        try:
            text = take()
        except Exception as exc:  # the clipboard is optional: never the session's end
            self.counters["clipboard_failed"] += 1
            log.info("clipboard read failed: %s", exc)
            return
        if text:
            self.r.xadd(self.clip_key, {"text": text.encode()}, maxlen=CLIP_MAXLEN, approximate=False)
            self.counters["clipboard_published"] += 1

    def _frame(self, now: float, keyframe: bool) -> None:
        rgb = self.app.render(now - self.t0)
        capture = time.time()
        size = (rgb.shape[1], rgb.shape[0])
        if self.encoder is not None and size != self.encoder_size:  # resized: a new stream of IDR
            self.encoder.close()
            self.encoder = None
            self.counters["encoders_resized"] += 1
        if self.encoder is None:
            self.encoder = self.cfg.encoder(*size)
            self.encoder_size = size
            self.counters["encoders_opened"] += 1
            keyframe = True
        pts = max(self.last_pts + 1, int((now - self.t0) * 1000))
        self.last_pts = pts
        t_enc = time.perf_counter()
        packets = self.encoder.encode(rgb, pts, force_keyframe=keyframe, changed=self._damage())
        encode_s = time.perf_counter() - t_enc
        params = self.encoder.params
        nbytes = 0
        for p in packets:
            extra = (
                {"codec": params.codec, "width": params.width, "height": params.height, "fps": params.fps}
                if p.keyframe
                else {}
            )
            vp = VideoPacket(self.seq, p.pts, p.keyframe, capture, p.data, **extra)
            self.r.xadd(self.key, vp.pack(), maxlen=self.cfg.video_maxlen, approximate=True)
            self.seq += 1
            self.counters["packets"] += 1
            self.counters["video_bytes"] += len(p.data)
            nbytes += len(p.data)
            if p.keyframe:
                self.last_key = now
                self.counters["keyframes"] += 1
        self.counters["frames"] += 1
        self.last_frame = now
        if self.observer is not None:
            self.observer.on_frame(encode_s, nbytes)
            if self.woke_at is not None:
                self.observer.on_wake_frame(time.monotonic() - self.woke_at)
        self.woke_at = None

    def _damage(self) -> Box | None:
        """What the frame just rendered changed, as the app tells it (None: all of it). A
        conventional streamer (``always_encode``) converts every picture in full."""
        if self.cfg.always_encode:
            return None
        damage = getattr(self.app, "damage", None)
        if damage is None:
            return None
        try:
            box = damage()
        except Exception as exc:  # a third-party app may raise anything: convert it all
            self.counters["app_damage_failed"] += 1
            log.debug("app damage() failed: %s", exc)
            return None
        if not (isinstance(box, tuple) and len(box) == 4 and all(isinstance(v, int) for v in box)):
            return None
        return box

    def sleep(self, freeze: bool = False) -> None:
        """Stop rendering and encoding and free the encoder; the app stays in memory (with
        ``freeze``, the app also stops what it runs: :meth:`App.sleep`)."""
        self.audio.stop()
        if not self.sleeping:
            self._hook("sleep", freeze)
        self.sleeping = True
        self.key_requested = False
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None
            self.encoder_size = None

    def wake(self) -> None:
        """Render at once; the new encoder starts with an IDR."""
        if self.sleeping:
            self._hook("wake")
        self.sleeping = False
        try:
            self.audio.start(getattr(self.app, "audio_capture", lambda: None)())
        except Exception:  # a third-party app may raise anything: no sound, the node goes on
            log.exception("app audio_capture() failed")
        self.next_frame = self.woke_at = time.monotonic()

    def _broke(self, exc: Exception) -> None:
        """The app cannot show anything any more: no more frames; the node ends the session."""
        if self.broken is None:
            log.error("app failed: %s: %s", type(exc).__name__, exc)
        self.broken = f"{type(exc).__name__}: {exc}"
        self.sleeping = True

    def _hook(self, name: str, *args: object) -> None:
        try:
            getattr(self.app, name)(*args)
        except Exception:  # a third-party app may raise anything; the node keeps serving
            self.counters[f"app_{name}_failed"] += 1
            log.exception("app %s() failed", name)

    def exit_status(self) -> tuple[str, int | str] | None:
        """The app's :meth:`App.exit_status` (None while it runs)."""
        try:
            return self.app.exit_status()
        except Exception:
            log.exception("app exit_status() failed")
            return (CloseReason.APP_CRASHED, -1)

    def fileno(self) -> int | None:
        """The app's change descriptor (None: the app has none), asleep or not."""
        try:
            return self.app.fileno()
        except Exception as exc:  # asked every step: warn once, then debug
            self.counters["app_fileno_failed"] += 1
            first = self.counters["app_fileno_failed"] == 1
            log.log(logging.WARNING if first else logging.DEBUG, "app fileno() failed: %s", exc)
            return None

    def on_change(self, now: float) -> None:
        """The app's descriptor was readable: render now if the picture changed, at most once a
        frame period (a program that animates is paced by the frame clock, not by its damage)."""
        if self.sleeping:
            return
        try:
            if not self.app.changed():
                return
        except Exception as exc:
            self._broke(exc)
            return
        # the answer to an input goes out like an input-driven render (min_gap); the rest is paced
        gap = self.cfg.min_gap if now - self.last_input < INPUT_ANSWER else self.cfg.period
        self.next_frame = min(self.next_frame, max(now, self.last_frame + gap))

    def save(self, data_dir: Path) -> bool:
        try:
            self.app.save(data_dir)
            self.unsaved_input = False
        except Exception:  # a third-party app may raise anything; the node keeps serving
            self.counters["save_failed"] += 1
            log.exception("app could not save its data into %s", data_dir)
            return False
        return True

    def close(self) -> None:
        self.sleep()
        if self.files is not None:
            self.files.stop()
        self._hook("close")
