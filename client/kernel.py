"""The cloud client's kernel: heartbeats (on their own thread, so a slow decode never stops
them), the session's state, the video player (:mod:`cloudq.client.player`) and input back to the
node."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

import redis

from cloudq.client.player import Player, thread_failed
from cloudq.client.sinks import Sink
from cloudq.keys import Keys
from cloudq.sessionend import SESSION_FIELDS, session_fields
from cloudq.settings import Settings
from cloudq.wire import BadMessage, InputEvent

INPUT_MAXLEN = 1000
KEYFRAME_REQUEST_GAP = 0.25
INPUT_RETRY_AFTER = 0.5
"""After Redis failed or refused an input event, the pump drops what comes for this many seconds
without trying (counted), then tries again; 0 = try every event. A closed session's Redis user is
gone: without the pause each mouse move (30 a second) was a new connection and a refused AUTH."""

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Refreshes ``session:{sid}:hb`` every ``heartbeat_interval`` with TTL ``heartbeat_ttl``, and
    in the same round trip reads the session's :data:`SESSION_FIELDS` (:meth:`session`): a client
    learns of a close, a move or a warning from its heartbeat instead of polling the server."""

    def __init__(self, r: redis.Redis, keys: Keys, sid: str, settings: Settings) -> None:
        super().__init__(name=f"heartbeat-{sid}", daemon=True)
        self.r = r
        self.keys = keys
        self.sid = sid
        self.settings = settings
        self.stop = threading.Event()
        self.beats = 0
        self.failures = 0
        self.failure: str | None = None  # why run() stopped on its own
        self._session: dict[str, str] | None = None
        self._session_at = -math.inf  # monotonic time the beat that read it went out

    def beat(self) -> None:
        sent = time.monotonic()
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.keys.heartbeat(self.sid), "1", px=int(self.settings.heartbeat_ttl * 1000))
        pipe.hmget(self.keys.session(self.sid), SESSION_FIELDS)
        _, raw = pipe.execute()
        self._session = session_fields(raw)
        self._session_at = sent
        self.beats += 1

    def session(self, since: float = -math.inf) -> dict[str, str] | None:
        """The session's fields as the last heartbeat read them, if that beat went out at most two
        intervals ago and not before ``since`` (monotonic: e.g. when the caller logged in again,
        which changes the session's token) — else None: no such beat (the server does not
        answer, the clock is off), and the caller asks the server itself."""
        at = self._session_at
        if at < since or time.monotonic() - at > 2 * self.settings.heartbeat_interval:
            return None
        return self._session

    def run(self) -> None:
        if not (self.settings.heartbeat_ttl and self.settings.heartbeat_interval):
            return  # the heartbeat clock is off
        while not self.stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                self.failures += 1
                log.warning("heartbeat failed: %s", exc)
            except Exception as exc:
                self.failure = thread_failed("the heartbeat", exc)
                return
            self.stop.wait(self.settings.heartbeat_interval)


class InputSender:
    """XADDs input events (increasing ``seq``, ``client_time`` = now) to the session's input stream.

    ``on_input`` runs after each user event (not keyframe requests): the launcher marks activity
    there. Keyframe requests are rate-limited to one per ``keyframe_gap`` seconds.
    """

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        sid: str,
        on_input: Callable[[], object] | None = None,
        first_seq: int = 1,
        keyframe_gap: float = KEYFRAME_REQUEST_GAP,
    ) -> None:
        self.r = r
        self.key = keys.input(sid)
        self.on_input = on_input
        self.seq = first_seq
        self.keyframe_gap = keyframe_gap
        self._last_request = -float("inf")
        self._lock = threading.Lock()  # the player thread asks for keyframes, the UI sends input
        self.counters: Counter[str] = Counter()

    def send(self, type: str, **kw: object) -> InputEvent:
        with self._lock:
            ev = InputEvent(type, self.seq, time.time(), **kw)  # type: ignore[arg-type]
            self.seq += 1
        self.r.xadd(self.key, ev.pack(), maxlen=INPUT_MAXLEN, approximate=True)
        self.counters[type] += 1
        if self.on_input and type not in ("keyframe_request", "resize"):  # no user act
            self.on_input()
        return ev

    def request_keyframe(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last_request < self.keyframe_gap:
                self.counters["keyframe_requests_suppressed"] += 1
                return False
            self._last_request = now
        try:
            self.send("keyframe_request")
        except redis.RedisError as exc:
            log.warning("keyframe request not sent: %s", exc)
            return False
        return True


class InputPump(threading.Thread):
    """Sends user input from a queue on its own thread, so a window or a script never blocks on
    Redis; while Redis is unreachable or refuses the session's user, events are dropped (counted),
    not replayed late, and tried again only every ``retry_after`` seconds (one warning a spell)."""

    def __init__(
        self,
        sender: InputSender,
        on_sent: Callable[[InputEvent], object] | None = None,
        retry_after: float = INPUT_RETRY_AFTER,
    ) -> None:
        super().__init__(name="input", daemon=True)
        self.sender = sender
        self.on_sent = on_sent
        self.retry_after = retry_after
        self.queue: queue.Queue[tuple[str, dict[str, object]] | None] = queue.Queue(maxsize=10000)
        self.dropped = 0
        self.failure: str | None = None  # why run() stopped on its own
        self._failing_since_drop: int | None = None  # ``dropped`` when the spell began; None: sending
        self._quiet_until = -math.inf

    def put(self, type: str, **kw: object) -> None:
        try:
            self.queue.put_nowait((type, kw))
        except queue.Full:
            self.dropped += 1

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            type, kw = item
            if time.monotonic() < self._quiet_until:
                self.dropped += 1
                continue
            try:
                ev = self.sender.send(type, **kw)
                if self.on_sent:
                    self.on_sent(ev)
            except BadMessage as exc:  # an event the wire refuses: this one only
                self.dropped += 1
                log.warning("input %s dropped: %s", type, exc)
                continue
            except redis.RedisError as exc:  # Redis away, or it refuses the session's user
                self._failed(type, exc)
                continue
            except Exception as exc:
                self.failure = thread_failed("the input sender", exc)
                return
            if self._failing_since_drop is not None:
                log.info(
                    "input sent again (%d events dropped meanwhile)", self.dropped - self._failing_since_drop
                )
                self._failing_since_drop = None

    def _failed(self, type: str, exc: redis.RedisError) -> None:
        if self._failing_since_drop is None:
            self._failing_since_drop = self.dropped
            pause = (
                f"; input is dropped for {self.retry_after:g} s, then tried again" if self.retry_after else ""
            )
            log.warning("input %s dropped: %s%s", type, exc, pause)
        self.dropped += 1
        self._quiet_until = time.monotonic() + self.retry_after

    def close(self, timeout: float = 2.0) -> None:
        self.queue.put(None)
        self.join(timeout)


class Kernel:
    """Heartbeat thread + player thread + input sender for one session."""

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        sid: str,
        settings: Settings,
        sinks: Iterable[Sink] = (),
        on_input: Callable[[], object] | None = None,
        on_sent: Callable[[InputEvent], object] | None = None,
        media: redis.Redis | None = None,
    ) -> None:
        # heartbeats go to the control server (``r``); video and input to the session's media
        # server (``media``, cloudq/media.py; None: the control server holds them too)
        m = media if media is not None else r
        self.heartbeat = Heartbeat(r, keys, sid, settings)
        self.input = InputSender(m, keys, sid, on_input=on_input)
        self.pump = InputPump(self.input, on_sent)
        # the client's pool hands each thread its own connection while the player's XREAD blocks
        self.player = Player(m, keys, sid, sinks, request_keyframe=self.input.request_keyframe)
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self.player.run, args=(self.stop,), name=f"player-{sid}")

    def start(self) -> Kernel:
        self.heartbeat.start()
        self.pump.start()
        self._thread.start()
        return self

    def failure(self) -> str | None:
        """Why the kernel cannot go on: one of its threads stopped on an error it cannot survive
        (or died without saying why). The session ends on it instead of showing a frozen picture."""
        if self.stop.is_set():
            return None
        if self.heartbeat.failure is not None:  # (its thread also ends when the clock is off)
            return f"the heartbeat stopped ({self.heartbeat.failure})"
        for what, thread, why in (
            ("the video player", self._thread, self.player.failure),
            ("the input sender", self.pump, self.pump.failure),
        ):
            if why is not None:
                return f"{what} stopped ({why})"
            if thread.ident is not None and not thread.is_alive():
                return f"{what} stopped"
        return None

    def close(self, timeout: float = 5.0) -> None:
        """Stop both threads; sinks (recording, snapshot) are finished by the player thread."""
        self.heartbeat.stop.set()
        self.stop.set()
        self.player.interrupt()  # its read may be blocked for seconds on a sleeping node
        self.pump.close()
        self._thread.join(timeout)
        self.heartbeat.join(2)
