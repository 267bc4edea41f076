"""``cloudq node``: one service node.

The node registers in the pool, keeps its liveness key fresh, and waits for work without
polling: a reader thread (:class:`StreamReader`) blocks in ONE XREAD on the node's control stream
and its session's input stream and hands each batch over; the node loop waits for that hand-over
or for its own next duty (frame or liveness refresh), whichever comes first, on a local timer.

The frame clock is the node's own. A server ends a blocking read's timeout only on its event-loop
tick (1/``hz`` s; ``hz 10`` by default, and managed services do not let you change it), so pacing
frames with an XREAD timeout would render a 30 fps app at ~12 fps there. Entries end the read at
once whatever the ``hz``, so input latency does not depend on it either.

While a session is active its :class:`Streamer` renders the app at the app's frame rate (and at
once when input arrives), encodes only frames that changed (plus keyframes: on start, on wake, on a
client's request, every ``gop`` seconds) and XADDs one video envelope per packet.

Sleep: the node stops rendering and encoding, frees its encoder and only blocks on its streams;
the app stays in memory. The first input on a sleeping node wakes it at once (no round trip
through the central server): new encoder, IDR first, then the input is applied.

Apps that run programs (``x11:COMMAND``) use the generic hooks of :class:`App`: ``sleep(freeze)``
and ``wake()`` around sleep (``--freeze`` stops the program), ``close()`` when the session ends,
``exit_status()`` (a program that exits on its own ends the session through ``app_exit.lua``, data
saved) and ``fileno()``: a descriptor that is readable when the picture may have changed. The node
loop waits with ``select`` on a pipe the reader writes at each hand-over (and :meth:`Node.interrupt`
writes from a signal handler) and on that descriptor, so an app's answer to input is rendered the
moment it is drawn and a sleeping node wakes only for its duties.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import redis

from cloudq.keys import Keys
from cloudq.media import FIELD as MEDIA_FIELD
from cloudq.messages import BadMessage, unpack_control
from cloudq.retry import Backoff, passing
from cloudq.settings import Settings
from cloudq.state import CloseReason, StateMachine, with_detail
from cloudq.wire import BadMessage as BadMedia
from cloudq.wire import InputEvent
from cloudq.workers import data
from cloudq.workers.apps import app_factory
from cloudq.workers.data import workspace_dir
from cloudq.workers.guard import InputGuard, InputLimits
from cloudq.workers.medialink import MediaLink, refreshing
from cloudq.workers.reader import Batch, ReadLimits, StreamReader, stub_size
from cloudq.workers.recovery import NodeFailed, NodeIdTaken, Recovery
from cloudq.workers.streamer import MediaConfig, MediaObserver, Streamer, default_workspace

log = logging.getLogger(__name__)

__all__ = [
    "MediaConfig",
    "MediaObserver",
    "Node",
    "NodeFailed",
    "NodeIdTaken",
    "NodeSession",
    "StreamReader",
    "Streamer",
    "default_workspace",
]

MAX_INPUT_ENTRY = InputLimits.max_entry
FLOOD_REASON = CloseReason.INPUT_FLOOD.value
MAX_WAIT = 10.0
"""Longest single wait of the node loop (it wakes earlier for a hand-over, its app or a duty)."""
MAX_REASON = 300
"""Longest close reason a node writes (an app's error message can be long)."""
_REFRESH_ALIVE = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'instance') ~= ARGV[1] then return -2 end
if not v and redis.call('HGET', KEYS[2], 'state') == 'offline' then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] and ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'stats', ARGV[3]) end
return 1
"""
"""The node's liveness (``alive`` key, its instance, ``node_ttl``), and with ARGV[3] its counters
(the node hash's ``stats``) in the same round trip."""


@dataclass
class NodeSession:
    sid: str
    gen: int
    user: str = ""
    input_id: bytes = b"$"
    sleeping: bool = False
    streamer: Streamer | None = None
    ending: bool = False  # its app exited: a close was asked for
    closing: bool = False  # a close was requested for abuse
    unreported: str = ""  # an app error not yet recorded (app_error.lua): retried each step
    link: MediaLink | None = None  # where its streams are (workers/medialink.py)


class Node(Recovery):
    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        node_id: str,
        host: str | None = None,
        app: str = "paint",
        media: MediaConfig | None = None,
        display: str | None = None,
        freeze: bool = False,
        observer: MediaObserver | None = None,
        sandbox: object = None,
    ) -> None:
        self.observer = observer
        self.slept_at: float | None = None
        self.r = r
        self.keys = keys
        self.id = node_id
        self.host = host or socket.gethostname()
        self.app = app
        self.media = media or MediaConfig()
        # a bad --app fails now, not at login; the factory owns what apps share (an X display)
        self.factory = app_factory(
            app, self.media.width, self.media.height, display, sandbox, self.media.max_size
        )  # sandbox: x11 programs' confinement (x11/sandbox.py SandboxConfig; None: the default)
        self.freeze = freeze
        self.data_dir = workspace_dir(self.media.workspace, node_id)
        self.instance = uuid.uuid4().hex
        self.sm = StateMachine(r, keys)
        self.settings = Settings.load(r, keys)
        self.session: NodeSession | None = None
        self.control_id = b"0-0"
        self.stop = threading.Event()
        self.counters: Counter[str] = Counter()
        self.guard = InputGuard(InputLimits(), self.counters)
        self.read_limits = ReadLimits.for_input(self.guard.limits)  # the readers' bounds (fixed)
        self._refresh = r.register_script(_REFRESH_ALIVE)
        self._next_refresh = 0.0
        self._lock = threading.Lock()  # the node's state, between the loop and the reader
        self.reader: StreamReader | None = None
        self.media_reader: StreamReader | None = None  # the input stream, on a media server
        # readable when the reader hands a batch over or interrupt() is called
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

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

    def refresh_liveness(self) -> None:
        """Refresh the liveness key and publish the counters (field ``stats``, JSON, for
        ``cloudq status`` and tests), one script: one round trip a refresh."""
        ttl_ms = int((self.settings.node_ttl or 3600) * 1000)
        stats = json.dumps(self.stats(), sort_keys=True)
        res = self._refresh(
            keys=[self.keys.node_alive(self.id), self.keys.node(self.id)], args=[self.instance, ttl_ms, stats]
        )
        if res == 0:
            raise NodeIdTaken(f"node id {self.id!r} was taken over by another process")
        if res == -1:
            self.declared_offline()
        elif res == -2:
            self.lost_by_server()
        self._next_refresh = time.monotonic() + self.settings.node_refresh

    def keepalive(self) -> contextlib.AbstractContextManager[None]:
        """Refresh the liveness key from a helper thread while the loop is busy in a slow app
        call (save, load) or a save to the store: a slow app never makes the node look dead."""
        ttl_ms = int((self.settings.node_ttl or 3600) * 1000)
        keys, args = [self.keys.node_alive(self.id), self.keys.node(self.id)], [self.instance, ttl_ms]
        return refreshing(lambda: self._refresh(keys=keys, args=args), self.settings.node_refresh)

    def app_failed(self, where: str, exc: BaseException | str | None = None) -> None:
        """The app raised (or cannot go on): save what can be saved, drop the app, close the
        session with reason ``app_error: <where>: <what>``. The node itself goes on and returns to
        the pool when the close is done."""
        self.counters["app_errors"] += 1
        sess = self.session
        if sess is None or sess.ending:
            return
        sess.ending = True
        what = (
            exc if isinstance(exc, str) else (f"{type(exc).__name__}: {exc}" if exc is not None else "raised")
        )
        detail = f"{where}: {what}"
        detail = detail if len(detail) <= MAX_REASON else detail[: MAX_REASON - 3] + "..."
        log.error("node %s: the app failed in %s (%s); closing session %s", self.id, where, what, sess.sid)
        if sess.streamer is not None:
            with self.keepalive():
                sess.streamer.save(self.data_dir)  # the close's final save stores it (if it worked)
            sess.streamer.close()
            sess.streamer = None
        sess.unreported = detail
        self.check_app()  # reports it (if Redis refuses now, the next steps try again)

    def save_to_store(self, label: str, require_marker: bool = True) -> str:
        """The app writes its state into the workspace, which is saved as a new version of the
        user's data (under the user's save lock, only if this session mounted it)."""
        sess = self.session
        if sess is None or sess.streamer is None:
            return "nothing to save"
        with self.keepalive():
            if not sess.streamer.save(self.data_dir):
                return "the app could not save"
        try:
            with self.keepalive():
                saved = data.store_workspace(
                    self.r,
                    self.keys,
                    sess.sid,
                    sess.user,
                    self.data_dir,
                    label,
                    require_marker=require_marker,
                )
        except data.DataError as exc:
            saved = str(exc)
        log.info("node %s: session %s: %s: %s", self.id, sess.sid, label, saved)
        return saved

    def stats(self) -> dict[str, int]:
        st = self.session.streamer if self.session else None
        cpu = os.times()
        app: dict[str, int] = {}
        if st is not None:
            try:
                app = {f"app.{k}": int(v) for k, v in st.app.stats().items()}
            except Exception as exc:  # a third-party app's counters are not worth a dead node
                log.debug("node %s: the app's stats() failed: %s", self.id, exc)
        return {
            **self.counters,
            **app,
            "encoder_open": int(st is not None and st.encoder is not None),
            "sleeping": int(bool(self.session and self.session.sleeping)),
            # for rates (fps, CPU %) between two readings, e.g. `cloudq status --watch`
            "cpu_ms": int((cpu.user + cpu.system) * 1000),
            "at_ms": int(time.time() * 1000),
        }

    def shutdown(self) -> None:
        if self.reader is not None:
            self.reader.close()
        try:
            # to the store, not only the workspace: the session moves on to another node (or to
            # this one after a restart) with what the user did up to now
            self.save_to_store(f"node {self.id} shutting down")
            self.stop_session("node shutting down", save=False)
            self.sm.unregister_node(self.id, self.instance)
        except redis.RedisError as exc:
            log.warning("node %s: could not unregister: %s", self.id, exc)
        finally:
            self.stop_session("node shutting down")  # the app is closed even if Redis is gone
            self.factory.close()

    # -- session ----------------------------------------------------------------------------
    def start_session(self, sid: str, gen: int) -> None:
        self._end_sleep()
        streamer = link = None
        if self.session and self.session.sid == sid and self.session.streamer:
            streamer = self.session.streamer  # the same session again: its app state is newer than disk
            link = self.session.link
        elif self.session:
            self.stop_session("replaced", save=True)
        raw_user, url = self.r.hmget(self.keys.session(sid), "user", MEDIA_FIELD)
        user = (raw_user or b"").decode()
        link = link or MediaLink(self.r, self.keys, sid, (url or b"").decode(), self.counters)
        last = link.r.xrevrange(self.keys.input(sid), count=1)
        if streamer is None:
            self.session = NodeSession(
                sid, gen, user=user, input_id=last[0][0] if last else b"0-0", link=link
            )
            try:
                app = self.factory()
                self.data_dir.mkdir(parents=True, exist_ok=True)
                with self.keepalive():
                    app.load(self.data_dir)
            except Exception as exc:  # e.g. the program cannot start: end the session, keep serving
                self.app_failed("load", exc)
                return
            streamer = Streamer(
                link.r, self.keys, sid, app, self.media, self.counters, self.observer, home=self.data_dir
            )
        self.session = NodeSession(
            sid, gen, user=user, input_id=last[0][0] if last else b"0-0", streamer=streamer, link=link
        )
        self.guard.reset()
        if self.sm.activate(self.id, sid, gen):
            streamer.wake()
            log.info("node %s: session %s active", self.id, sid)
        else:
            log.info("node %s: start of %s gen %s is stale", self.id, sid, gen)
            streamer.close()
            self._drop_media()
            self.session = None

    def end_session(self, sid: str, gen: int, reason: str) -> None:
        """Ask for this session to be closed (data saved) because of its app: ``app_exited``,
        ``app_crashed: ...``. The close job then stops it here as usual."""
        reason = reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
        status = self.sm.app_exit(self.id, sid, gen, reason)
        log.info("node %s: session %s ends (%s): %s", self.id, sid, reason, status)

    def check_app(self) -> None:
        """End the session once its program has exited on its own (once; streaming stops)."""
        sess = self.session
        if sess is not None and sess.unreported:
            self.sm.app_error(self.id, sess.sid, sess.unreported)
            sess.unreported = ""
            return
        st = sess.streamer if sess else None
        if sess is None or st is None or sess.ending:
            return
        status = st.exit_status()
        if status is None and st.broken is not None:
            self.app_failed("render", st.broken)
            return
        if status is None:
            return
        kind, code = status
        if kind == CloseReason.APP_EXITED:
            reason = CloseReason.APP_EXITED.value
        elif isinstance(code, str):  # the app says why: "memory limit" (its sandbox's limits)
            reason = with_detail(CloseReason.APP_CRASHED, code)
        elif code < 0:
            reason = with_detail(CloseReason.APP_CRASHED, f"killed by signal {-code}")
        else:
            reason = with_detail(CloseReason.APP_CRASHED, f"exit status {code}")
        self.end_session(sess.sid, sess.gen, reason)  # first: if Redis refuses, the next step asks again
        sess.ending = True
        st.sleep()  # nothing left to show
        self.counters[kind] += 1

    def stop_session(self, reason: str, save: bool = False) -> bool:
        """Drop the session's app and encoder (saving the app's data first if ``save``)."""
        saved = True
        self._end_sleep()
        if self.session:
            log.info("node %s: session %s stopped (%s)", self.id, self.session.sid, reason)
            st = self.session.streamer
            if st:
                if save:
                    with self.keepalive():
                        saved = st.save(self.data_dir)
                st.close()
            self._drop_media()
        self.session = None
        return saved

    def _drop_media(self, keep_link: bool = False) -> None:
        """Stop reading the session's media server (and let go of it unless ``keep_link``)."""
        if self.media_reader is not None:
            self.media_reader.close()
            self.media_reader = None
        if self.session and self.session.link and not keep_link:
            self.session.link.close()

    def sleep(self) -> None:
        if self.session and not self.session.sleeping:
            self.session.sleeping = True
            if self.session.streamer:
                self.session.streamer.sleep(self.freeze)
            self.slept_at = time.monotonic()
            log.info("node %s: sleeping%s", self.id, " (app frozen)" if self.freeze else "")

    def sleeping_seconds(self) -> float:
        """Seconds this node has slept in all (counting a sleep in progress)."""
        now = 0.0 if self.slept_at is None else time.monotonic() - self.slept_at
        return self.counters["sleeping_ms"] / 1000 + now

    def _end_sleep(self) -> None:
        if self.slept_at is not None:
            self.counters["sleeping_ms"] += int((time.monotonic() - self.slept_at) * 1000)
            self.slept_at = None

    def wake(self) -> None:
        if self.session and self.session.sleeping and not self.session.ending:
            self.sm.wake(self.id, self.session.sid)  # first: if Redis refuses, nothing changed here
            self._end_sleep()
            self.session.sleeping = False
            if self.session.streamer:
                self.session.streamer.wake()
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
            if c.cmd == "stop":  # nothing of that session runs here: nothing to wait for
                self.r.hset(self.keys.node(self.id), "stopped", f"{c.sid}:{c.gen}")
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
            else:
                with self.keepalive():
                    ok = st.save(self.data_dir)
                if ok:
                    self.r.hset(self.keys.node(self.id), "flushed", f"{c.ref}|dirty")
        elif c.cmd == "stop":
            # acknowledged even if the save failed (logged, counted): the app is gone either way
            self.stop_session("closed", save=True)
            self.r.hset(self.keys.node(self.id), "stopped", f"{c.sid}:{c.gen}")

    def close_for_abuse(self, why: str) -> None:
        """Ask for the session to be closed (``input_flood``); the sweeper enqueues the close.
        From now on the session's input stream is emptied at each read (:meth:`discard_input`)
        until its user is gone and the close deletes it."""
        if not self.session or self.session.closing:
            return
        res = self.sm.request_close(self.session.sid, self.session.gen, FLOOD_REASON)
        self.session.closing = True
        self.counters["input_flood_closes"] += 1
        log.warning("node %s: closing session %s: %s (%s)", self.id, self.session.sid, why, res)
        self.discard_input()

    def discard_input(self) -> None:
        """Empty a flooding session's input stream. XTRIM, not DEL: the stream keeps its last id,
        so the client cannot restart it below the node's read position and out of its sight."""
        if self.session and self.session.link:
            self.session.link.r.xtrim(self.keys.input(self.session.sid), maxlen=0, approximate=False)

    def check_input_stream(self) -> None:
        if self.session and self.session.closing:
            self.discard_input()
        elif self.session and self.session.link:
            why = self.guard.check_stream(self.session.link.r, self.keys.input(self.session.sid))
            if why:
                self.close_for_abuse(why)

    def handle_input(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        size = stub_size(fields)
        if size is None:
            size = sum(len(k) + len(v) for k, v in fields.items())
        dropped = self.guard.admit(size)
        if dropped:
            if dropped == "size":
                self.counters["bad_input"] += 1
                log.warning("node %s: dropped input entry %s of %d bytes", self.id, entry_id.decode(), size)
                if size > self.guard.limits.close_entry:  # no accident: close at once
                    self.close_for_abuse(f"an input entry of {size} bytes")
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
        if self.session.sleeping and ev.type not in ("keyframe_request", "resize"):
            self.wake()  # a client catching up (keyframe, its window size) does not wake the node
        try:
            self.session.streamer.on_input(ev)
        except redis.RedisError:
            raise
        except Exception as exc:  # the app's bug ends its session, not the node
            self.app_failed("handle_input", exc)

    def next_timeout(self) -> float:
        due = self._next_refresh
        st = self.session.streamer if self.session else None
        frame = st.deadline() if st else None
        if frame is not None:
            due = min(due, frame)
        return max(0.0, due - time.monotonic())

    def streams(self, media: bool = False) -> dict[str, bytes]:
        """What the reader blocks on: the control stream, and the session's input stream; with
        ``media``, what the media reader does (the input stream, when it is on a media server)."""
        with self._lock:
            sess = self.session
            separate = bool(sess and sess.link and sess.link.separate)
            streams = {} if media else {self.keys.node_control(self.id): self.control_id}
            if sess and separate == media and not (media and sess.link.lost_at is not None):  # type: ignore[union-attr]
                streams[self.keys.input(sess.sid)] = sess.input_id
            return streams

    def step(self) -> None:
        """Wait (on the local clock) for a batch from a reader, the app's change descriptor or
        the next duty; then do what is due."""
        control = self.keys.node_control(self.id)
        limits = self.read_limits
        if self.reader is None or not self.reader.is_alive():
            self.reader = StreamReader.for_node(self.r, self.streams, self._wake_w, limits, control)
        link = self.session.link if self.session else None
        if link is not None and link.separate and (up := link.ready()) is not None:
            if not up and self.session and self.session.streamer:  # back: a keyframe first
                self.session.streamer.key_requested = True
            if self.media_reader is None or not self.media_reader.is_alive():
                self.media_reader = StreamReader.for_node(
                    link.r, lambda: self.streams(media=True), self._wake_w, limits, control
                )
        readers = [rd for rd in (self.reader, self.media_reader) if rd is not None]
        st = self.session.streamer if self.session else None
        paused = link is not None and link.lost_at is not None
        # asleep, the app's descriptor is not watched (a program that is not frozen still draws)
        fd = st.fileno() if st is not None and not st.sleeping and not paused else None
        changed = False
        if all(rd.batches.empty() for rd in readers):
            waits = [self._wake_r] + ([fd] if fd is not None else [])
            timeout = min(self.next_timeout(), MAX_WAIT, 0.2 if paused else MAX_WAIT)
            got, _, _ = select.select(waits, [], [], timeout)
            changed = fd is not None and fd in got
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        for rd in readers:
            self._take(rd, link)
        now = time.monotonic()
        with self._lock:
            try:
                if self.session and self.session.streamer and not paused:
                    if changed:
                        self.session.streamer.on_change(now)
                    self.session.streamer.tick(now)
                self.check_app()
                if now >= self._next_refresh:
                    self.refresh_liveness()
                    self.check_input_stream()
            except Exception as exc:
                if link is None or not link.owns(exc):
                    raise
                link.failed(exc)  # the media server's outage: the session's media pauses

    def _take(self, rd: StreamReader, link: MediaLink | None) -> None:
        """Handle the batch ``rd`` has ready, if any."""
        batch = rd.next(0)
        if batch is None:
            return
        try:
            with self._lock:
                if isinstance(batch, Exception) and rd is self.media_reader and link and link.owns(batch):
                    link.failed(batch)
                    self._drop_media(keep_link=True)  # a new reader once the server is back
                    return
                if isinstance(batch, Exception):
                    # a read that keeps failing must not stop the liveness refresh too: that
                    # took every node a flooding session was moved to offline (issue 20)
                    if time.monotonic() >= self._next_refresh:
                        with contextlib.suppress(redis.RedisError):
                            self.refresh_liveness()
                    raise batch
                try:
                    self.handle_batch(batch)
                except Exception as exc:  # e.g. trimming a flooding client's input there
                    if link is None or not link.owns(exc):
                        # e.g. a start whose media server is down: retried (the control entry
                        # is read again), the node kept alive meanwhile
                        if time.monotonic() >= self._next_refresh:
                            with contextlib.suppress(redis.RedisError):
                                self.refresh_liveness()
                        raise
                    link.failed(exc)
        finally:
            rd.done.set()

    def handle_batch(self, batch: Batch) -> None:
        control = self.keys.node_control(self.id)
        if self.session:  # the input stream's length and memory after the read (the reader's script)
            length, mem = getattr(batch, "measured", {}).get(
                self.keys.input(self.session.sid).encode(), (-1, -1)
            )
            why = self.guard.judge(length, mem)
            if why:
                self.close_for_abuse(why)
        for stream, entries in batch:
            name = stream.decode()
            if self.session and self.session.closing and name == self.keys.input(self.session.sid):
                self.session.input_id = entries[-1][0]
                self.discard_input()  # a flooding client's entries go unread until its user is gone
                continue
            for entry_id, fields in entries:
                if name == control:
                    self.handle_control(fields)
                    self.control_id = entry_id  # after: a step that Redis refused reads it again
                elif self.session and name == self.keys.input(self.session.sid):
                    self.session.input_id = entry_id
                    self.handle_input(entry_id, fields)
                else:
                    self.counters["stale_input"] += 1  # a session that ended while the read was blocked

    def interrupt(self) -> None:
        """End the current wait now (safe in a signal handler): call after setting :attr:`stop`."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def run(self) -> None:
        """Serve until :attr:`stop`. Redis errors that pass (:func:`cloudq.retry.passing`: an
        outage, OOM, READONLY, BUSY, NOSCRIPT...) are waited out with backoff, the session and the
        registration kept; anything else shuts the node down and raises :class:`NodeFailed`."""
        try:
            self.register()
        except BaseException as exc:
            self.factory.close()
            if isinstance(exc, redis.ResponseError):
                raise NodeFailed(f"node {self.id} could not register: {exc}") from exc
            raise
        # retry at least as often as the liveness refresh, so that after an outage the node is
        # back within one TTL of the central server seeing again (see sweep.lua, blind periods)
        backoff = Backoff(0.05, max(0.05, self.settings.node_refresh))
        try:
            while not self.stop.is_set():
                try:
                    self.step()
                    backoff.reset()
                except NodeIdTaken:
                    raise
                except Exception as exc:
                    what = f"{type(exc).__name__}: {exc}"
                    if not passing(exc):
                        bug = not isinstance(exc, redis.RedisError)  # its traceback goes to the log
                        log.error("node %s: unexpected error: %s", self.id, what, exc_info=bug)
                        raise NodeFailed(f"node {self.id} stopped on an unexpected error: {what}") from exc
                    self.counters["redis_retries"] += 1
                    log.warning("node %s: redis: %s; retrying in <%.1fs", self.id, what, backoff.peek())
                    backoff.wait(self.stop)
        finally:
            self.shutdown()
