"""``cloudq node``: one service node.

The node registers in the pool, keeps its liveness key fresh, and waits in ONE blocking
XREAD on its control stream and its session's input stream, with a timeout equal to the
time to its next duty (frame or liveness refresh): no sleep-poll loop.

While a session is active its :class:`Streamer` renders the app at the app's frame rate (and at
once when input arrives), encodes only frames that changed (plus keyframes: on start, on wake, on a
client's request, every ``gop`` seconds) and XADDs one video envelope per packet.

Sleep: the node stops rendering and encoding, frees its encoder and only blocks on its streams;
the app stays in memory. The first input on a sleeping node wakes it at once (no round trip
through the central server): new encoder, IDR first, then the input is applied.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import redis

from cloudq.codec import Encoder, get_encoder
from cloudq.keys import Keys
from cloudq.messages import BadMessage, unpack_control
from cloudq.retry import Backoff
from cloudq.settings import Settings
from cloudq.state import StateMachine
from cloudq.wire import BadMessage as BadMedia
from cloudq.wire import InputEvent, VideoPacket
from cloudq.workers.apps import App, load_app
from cloudq.workers.data import workspace_dir
from cloudq.workers.guard import InputGuard, InputLimits

log = logging.getLogger(__name__)

MAX_INPUT_ENTRY = InputLimits.max_entry
FLOOD_REASON = "input_flood"
KEYFRAME_REQUEST_GAP = 0.25
"""Seconds between two keyframes forced by client requests (a flood of requests costs one IDR)."""
MAX_BLOCK = 1.0
"""Longest single XREAD block (below any socket timeout)."""
_REFRESH_ALIVE = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
if not v and redis.call('HGET', KEYS[2], 'state') == 'offline' then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


def default_workspace() -> str:
    return os.environ.get("CLOUDQ_WORKSPACE") or os.path.join(tempfile.gettempdir(), "cloudq-workspace")


class NodeIdTaken(RuntimeError):
    """Another live process already serves this node id."""


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

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ValueError(f"size must be positive and even, got {self.width}x{self.height}")
        if not 0 < self.fps <= 240:
            raise ValueError(f"fps must be in (0, 240], got {self.fps}")
        if self.bitrate <= 0 or self.gop <= 0:
            raise ValueError("bitrate and gop must be positive")

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

    def encoder(self) -> Encoder:
        return get_encoder(
            self.codec,
            self.width,
            self.height,
            self.fps,
            bitrate=self.bitrate,
            preset=self.preset,
            gop_seconds=self.gop,
            time_base=Fraction(1, 1000),  # pts = milliseconds since the session's stream began
        )


class Streamer:
    """One session's media on a node: the app, the encoder (only while awake) and the video stream."""

    def __init__(
        self, r: redis.Redis, keys: Keys, sid: str, app: App, cfg: MediaConfig, counters: Counter[str]
    ) -> None:
        self.r = r
        self.key = keys.video(sid)
        self.app = app
        self.cfg = cfg
        self.counters = counters
        self.encoder: Encoder | None = None
        self.sleeping = False
        self.seq = self._next_seq()
        self.t0 = time.monotonic()
        self.last_pts = -1
        self.next_frame = self.t0
        self.last_render = -math.inf
        self.last_input_render = -math.inf
        self.input_pending = False
        self.last_key = -math.inf
        self.last_forced = -math.inf
        self.key_requested = False
        self.unsaved_input = False  # user data changes only through input

    def _next_seq(self) -> int:
        """Carry on the stream's numbering (a reconnecting client must not see seq go back)."""
        last = self.r.xrevrange(self.key, count=1)
        if last:
            try:
                return VideoPacket.unpack(last[0][1]).seq + 1
            except BadMedia:
                pass
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
        self.app.handle_input(ev)
        self.unsaved_input = True
        # render at once; input-driven renders come at most every min_gap (each one also pushes the
        # periodic frame a full period on), so a mouse flood costs at most about 2x the frame rate
        self.input_pending = True
        due = max(time.monotonic(), self.last_input_render + self.cfg.min_gap)
        self.next_frame = min(self.next_frame, due)

    def tick(self, now: float) -> None:
        if self.sleeping or now < self.next_frame:
            return
        force = False
        if self.key_requested and now - self.last_forced >= KEYFRAME_REQUEST_GAP:
            force, self.key_requested, self.last_forced = True, False, now
        key_due = self.encoder is None or now - self.last_key >= self.cfg.gop
        if force or key_due or self.app.changed():
            self._frame(now, force or key_due)
        self.last_render = now
        if self.input_pending:
            self.input_pending, self.last_input_render = False, now
        nxt = self.next_frame + self.cfg.period
        if nxt <= now:  # fell behind (or rendered on input): start the clock again from now
            if now - self.next_frame > self.cfg.period:
                self.counters["late_frames"] += 1
            nxt = now + self.cfg.period
        self.next_frame = nxt

    def _frame(self, now: float, keyframe: bool) -> None:
        rgb = self.app.render(now - self.t0)
        capture = time.time()
        if self.encoder is None:
            self.encoder = self.cfg.encoder()
            self.counters["encoders_opened"] += 1
        pts = max(self.last_pts + 1, int((now - self.t0) * 1000))
        self.last_pts = pts
        packets = self.encoder.encode(rgb, pts, force_keyframe=keyframe)
        params = self.encoder.params
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
            if p.keyframe:
                self.last_key = now
                self.counters["keyframes"] += 1
        self.counters["frames"] += 1

    def sleep(self) -> None:
        """Stop rendering and encoding and free the encoder; the app stays in memory."""
        self.sleeping = True
        self.key_requested = False
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None

    def wake(self) -> None:
        """Render at once; the new encoder starts with an IDR."""
        self.sleeping = False
        self.next_frame = time.monotonic()

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


@dataclass
class NodeSession:
    sid: str
    gen: int
    input_id: bytes = b"$"
    sleeping: bool = False
    streamer: Streamer | None = None
    closing: bool = False  # a close was requested for abuse


class Node:
    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        node_id: str,
        host: str | None = None,
        app: str = "paint",
        media: MediaConfig | None = None,
    ) -> None:
        self.r = r
        self.keys = keys
        self.id = node_id
        self.host = host or socket.gethostname()
        self.app = app
        self.media = media or MediaConfig()
        load_app(app, self.media.width, self.media.height)  # a bad --app fails now, not at login
        self.data_dir = workspace_dir(self.media.workspace, node_id)
        self.instance = uuid.uuid4().hex
        self.sm = StateMachine(r, keys)
        self.settings = Settings.load(r, keys)
        self.session: NodeSession | None = None
        self.control_id = b"0-0"
        self.stop = threading.Event()
        self.counters: Counter[str] = Counter()
        self.guard = InputGuard(InputLimits(), self.counters)
        self._refresh = r.register_script(_REFRESH_ALIVE)
        self._next_refresh = 0.0
        self._published: dict[str, int] = {}

    # -- registration and liveness -----------------------------------------------------------
    def register(self) -> None:
        last = self.r.xrevrange(self.keys.node_control(self.id), count=1)
        self.control_id = last[0][0] if last else b"0-0"
        self.settings = Settings.load(self.r, self.keys)
        if not self.sm.register_node(self.id, self.host, self.app, self.instance):
            self.counters["id_taken"] += 1
            raise NodeIdTaken(f"node id {self.id!r} is already served by a live process")
        self.session = None
        self._next_refresh = time.monotonic() + self.settings.node_refresh
        log.info("node %s registered (host %s, app %s)", self.id, self.host, self.app)
        self.check_timer_precision()

    def check_timer_precision(self) -> None:
        """Warn if the server cannot end a blocking XREAD on time for the frame clock.

        Redis/Valkey time out blocked clients from their event loop, which without other traffic
        wakes ``hz`` times a second (default 10): an XREAD BLOCK of 33 ms then returns after up to
        100 ms and a 30 fps app renders at ~12 fps. ``hz 100`` (``--hz 100`` / ``CONFIG SET hz``)
        makes the granularity 10 ms. Input is not affected: it ends the block at once.
        """
        try:
            hz = int(self.r.config_get("hz").get("hz", 0))
        except (redis.ResponseError, ValueError):
            return  # no CONFIG rights (e.g. a restricted ACL user): nothing to check
        if hz and 1.0 / hz > self.media.period / 2:
            log.warning(
                "node %s: the Redis server runs with hz %d, so blocking reads time out in %.0f ms steps; "
                "frames at %g fps will come late. Start it with --hz 100 (or CONFIG SET hz 100).",
                self.id,
                hz,
                1000.0 / hz,
                self.media.fps,
            )
            self.counters["coarse_server_timer"] = 1

    def refresh_liveness(self) -> None:
        ttl_ms = int((self.settings.node_ttl or 3600) * 1000)
        res = self._refresh(
            keys=[self.keys.node_alive(self.id), self.keys.node(self.id)], args=[self.instance, ttl_ms]
        )
        if res == 0:
            raise NodeIdTaken(f"node id {self.id!r} was taken over by another process")
        if res == -1:
            log.warning("node %s was declared offline; registering again", self.id)
            self.stop_session("declared offline", save=False)
            self.register()
        self._next_refresh = time.monotonic() + self.settings.node_refresh
        self.publish_stats()

    def stats(self) -> dict[str, int]:
        st = self.session.streamer if self.session else None
        return {
            **self.counters,
            "encoder_open": int(st is not None and st.encoder is not None),
            "sleeping": int(bool(self.session and self.session.sleeping)),
        }

    def publish_stats(self) -> None:
        """Counters in the node hash (field ``stats``, JSON) for ``cloudq status`` and tests."""
        s = self.stats()
        if s != self._published:
            self.r.hset(self.keys.node(self.id), "stats", json.dumps(s, sort_keys=True))
            self._published = s

    def shutdown(self) -> None:
        try:
            self.stop_session("node shutting down", save=True)
            self.sm.unregister_node(self.id, self.instance)
        except redis.RedisError as exc:
            log.warning("node %s: could not unregister: %s", self.id, exc)

    # -- session ----------------------------------------------------------------------------
    def start_session(self, sid: str, gen: int) -> None:
        last = self.r.xrevrange(self.keys.input(sid), count=1)
        streamer = None
        if self.session and self.session.sid == sid and self.session.streamer:
            streamer = self.session.streamer  # the same session again: its app state is newer than disk
        elif self.session:
            self.stop_session("replaced", save=True)
        if streamer is None:
            app = load_app(self.app, self.media.width, self.media.height)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            app.load(self.data_dir)
            streamer = Streamer(self.r, self.keys, sid, app, self.media, self.counters)
        self.session = NodeSession(sid, gen, input_id=last[0][0] if last else b"0-0", streamer=streamer)
        self.guard.reset()
        if self.sm.activate(self.id, sid, gen):
            streamer.wake()
            log.info("node %s: session %s active", self.id, sid)
        else:
            log.info("node %s: start of %s gen %s is stale", self.id, sid, gen)
            streamer.close()
            self.session = None

    def stop_session(self, reason: str, save: bool = False) -> bool:
        """Drop the session's app and encoder (saving the app's data first if ``save``)."""
        saved = True
        if self.session:
            log.info("node %s: session %s stopped (%s)", self.id, self.session.sid, reason)
            st = self.session.streamer
            if st:
                if save:
                    saved = st.save(self.data_dir)
                st.close()
        self.session = None
        return saved

    def sleep(self) -> None:
        if self.session and not self.session.sleeping:
            self.session.sleeping = True
            if self.session.streamer:
                self.session.streamer.sleep()
            log.info("node %s: sleeping", self.id)

    def wake(self) -> None:
        if self.session and self.session.sleeping:
            self.session.sleeping = False
            if self.session.streamer:
                self.session.streamer.wake()
            self.sm.wake(self.id, self.session.sid)
            log.info("node %s: woke on input", self.id)

    # -- the loop ---------------------------------------------------------------------------
    def handle_control(self, fields: dict[bytes, bytes]) -> None:
        try:
            c = unpack_control(fields)
        except BadMessage as exc:
            self.counters["bad_control"] += 1
            log.warning("node %s: dropped control message: %s", self.id, exc)
            return
        if c.cmd == "start":
            self.start_session(c.sid, c.gen)
        elif not self.session or c.sid != self.session.sid:
            self.counters["stale_control"] += 1
        elif c.cmd == "sleep":
            self.sleep()
        elif c.cmd == "wake":
            self.wake()
        elif c.cmd == "keyframe":
            if self.session.streamer:
                self.session.streamer.key_requested = True
        elif c.cmd == "flush":
            # acknowledged as `<ref>|clean` when no input changed the app since its last save,
            # so an autosave of an unchanged session writes nothing to the store
            st = self.session.streamer
            if st is None or not st.unsaved_input:
                self.r.hset(self.keys.node(self.id), "flushed", f"{c.ref}|clean")
            elif st.save(self.data_dir):
                self.r.hset(self.keys.node(self.id), "flushed", f"{c.ref}|dirty")
        elif c.cmd == "stop":
            # acknowledged even if the save failed (logged, counted): the app is gone either way
            self.stop_session("closed", save=True)
            self.r.hset(self.keys.node(self.id), "stopped", f"{c.sid}:{c.gen}")

    def close_for_abuse(self, why: str) -> None:
        """Ask for the session to be closed (``input_flood``); the sweeper enqueues the close."""
        if not self.session or self.session.closing:
            return
        self.session.closing = True
        self.counters["input_flood_closes"] += 1
        res = self.sm.request_close(self.session.sid, self.session.gen, FLOOD_REASON)
        log.warning("node %s: closing session %s: %s (%s)", self.id, self.session.sid, why, res)

    def check_input_stream(self) -> None:
        if self.session:
            why = self.guard.check_stream(self.r, self.keys.input(self.session.sid))
            if why:
                self.close_for_abuse(why)

    def handle_input(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        size = sum(len(k) + len(v) for k, v in fields.items())
        dropped = self.guard.admit(size)
        if dropped:
            if dropped == "size":
                self.counters["bad_input"] += 1
                log.warning("node %s: dropped input entry %s of %d bytes", self.id, entry_id.decode(), size)
            if self.guard.flooded:
                self.close_for_abuse(f"{self.guard.drops} input entries over the limits")
            return
        try:
            ev = InputEvent.unpack(fields)
        except BadMedia as exc:
            self.counters["bad_input"] += 1
            log.warning("node %s: dropped input entry %s: %s", self.id, entry_id.decode(), exc.reason)
            return
        self.counters["input"] += 1
        if not self.session or not self.session.streamer:
            return
        if self.session.sleeping and ev.type != "keyframe_request":
            self.wake()  # a keyframe request alone (a client catching up) does not wake the node
        self.session.streamer.on_input(ev)

    def next_timeout(self) -> float:
        due = self._next_refresh
        st = self.session.streamer if self.session else None
        frame = st.deadline() if st else None
        if frame is not None:
            due = min(due, frame)
        return max(0.0, due - time.monotonic())

    def step(self) -> None:
        streams = {self.keys.node_control(self.id): self.control_id}
        if self.session:
            streams[self.keys.input(self.session.sid)] = self.session.input_id
        timeout = min(self.next_timeout(), MAX_BLOCK)
        # BLOCK 0 would mean forever: a duty that is due now gets a non-blocking read
        block = math.ceil(timeout * 1000) if timeout > 0 else None
        resp = self.r.xread(streams, count=100, block=block)
        for stream, entries in resp or []:
            is_control = stream.decode() == self.keys.node_control(self.id)
            if not is_control and len(entries) >= 100:
                self.check_input_stream()  # a full batch: the client may be flooding
            for entry_id, fields in entries:
                if is_control:
                    self.control_id = entry_id
                    self.handle_control(fields)
                elif self.session:
                    self.session.input_id = entry_id
                    self.handle_input(entry_id, fields)
        now = time.monotonic()
        if self.session and self.session.streamer:
            self.session.streamer.tick(now)
        if now >= self._next_refresh:
            self.refresh_liveness()
            self.check_input_stream()

    def run(self) -> None:
        self.register()
        backoff = Backoff()
        try:
            while not self.stop.is_set():
                try:
                    self.step()
                    backoff.reset()
                except redis.ConnectionError as exc:
                    log.warning(
                        "node %s: redis unreachable (%s); retrying in <%.1fs", self.id, exc, backoff.peek()
                    )
                    backoff.wait(self.stop)
        finally:
            self.shutdown()
