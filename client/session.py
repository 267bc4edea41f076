"""One cloud-client session: the launcher's side of ``cloudq connect``.

:class:`ClientSession` logs in (waiting in the queue if it must), starts the kernel (heartbeat,
player, input pump), watches the session hash, and logs out at the end. It also:

- **reconnects**: when Redis stops answering or the connection drops, it retries with exponential
  backoff and jitter for up to the reconnect grace; once the server answers it logs in again with
  the credentials it holds in memory (never on disk), which lands on the same session and node
  (online reconnection), and asks for a keyframe so the picture resumes at once;
- **follows a move**: when the central server gives the session another node (its node died),
  the video stream key stays the same; the client asks for a keyframe and shows the new node;
- **explains a close** in plain words (:mod:`cloudq.sessionend`, as the web gateway does) and raises
  ``ClientError("closed")``;
- **gives up on an unusable stream**: video entries arriving for ``stream_timeout`` seconds
  without one decodable frame raise ``ClientError("stream")``;
- **never freezes**: a kernel thread (player, input sender, heartbeat) that stops on an error it
  cannot survive ends the session with its reason (``ClientError("error")``, exit 1);
- marks **activity** for every real input (window or script), never for keyframe requests;
- keeps what it saw in :meth:`stats` (and ``stats_json``, rewritten every second and at the end).

The window (:mod:`cloudq.client.viewer`) and a script (:mod:`cloudq.client.script`) feed input
through :meth:`send_input`; the status line reads :meth:`status`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import redis

from cloudq.client.clipboard import Clipboard
from cloudq.client.kernel import Kernel
from cloudq.client.launcher import ClientError, Launcher, SessionOver, Ticket
from cloudq.client.script import ScriptEvent, ScriptPlayer
from cloudq.client.sinks import Mp4Recorder, Sink, SnapshotSink
from cloudq.client.stats import StatsSink, write_json
from cloudq.connection import connect
from cloudq.keys import Keys
from cloudq.retry import Backoff
from cloudq.sessionend import SESSION_FIELDS, close_message, session_end, session_fields, warning_message
from cloudq.state import CloseReason
from cloudq.tokens import hash_token

log = logging.getLogger(__name__)

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
STREAM_TIMEOUT = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0
STATS_EVERY = 1.0


@dataclass
class ConnectOptions:
    duration: float = 0.0
    queue_wait: float | None = None
    record: str | None = None
    snapshot: str | None = None
    script: list[ScriptEvent] = field(default_factory=list)
    stats_json: str | None = None
    stream_timeout: float = STREAM_TIMEOUT
    reconnect_budget: float | None = None  # None: the server's grace (or 120 s if grace is off)
    poll: float = 0.2
    sinks: list[Sink] = field(default_factory=list)
    uploads: list[str] = field(default_factory=list)  # files into ~/Uploads once attached
    downloads: list[str] = field(default_factory=list)  # paths in HOME, into the current directory


class _Quit(Exception):
    """The user stopped the client while it was reconnecting."""


class ClientSession:
    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        user: str,
        password: str,
        options: ConnectOptions | None = None,
        stop: threading.Event | None = None,
        say: Callable[[str], None] = lambda m: None,
    ) -> None:
        self.r = r
        self.keys = keys
        self.user = user
        self._password = password  # in memory only: needed to log in again after a drop
        self.opt = options or ConnectOptions()
        self.stop = stop or threading.Event()
        self.say = say
        self.launcher = Launcher(r, keys)
        self.stats_sink = StatsSink()
        self.kernel: Kernel | None = None
        self.clipboard: Clipboard | None = None
        self.clipboard_listeners: list[Callable[[str], None]] = []
        """Called (on the clipboard's thread) with each text a program in the session copies."""
        self.ticket: Ticket | None = None
        self.script: ScriptPlayer | None = None
        # what the status line and the stats show
        self.state = "connecting"
        self.node = ""
        self.position: int | None = None
        self.warning = ""
        self.media_lost = False  # the node said its media server is lost
        self.states: list[str] = []
        self.nodes: list[str] = []
        self.reconnects: list[dict[str, Any]] = []
        self.close_reason = ""
        self.ended = ""
        self.exit_code: int | None = None
        self.t0 = self.last_input = time.monotonic()

    # -- what the window and scripts call ----------------------------------------------------
    def send_input(self, type: str, **kw: object) -> None:
        """Queue one real user input (sent on the kernel's input thread; marks activity)."""
        if self.kernel is not None:
            self.last_input = time.monotonic()
            self.kernel.pump.put(type, **kw)

    def send_clipboard(self, text: str) -> bool:
        """The user's clipboard holds ``text`` (pasting, or the window focused): make it the
        session's clipboard unless it has it already or it is too big; True if sent."""
        return self.clipboard is not None and self.clipboard.offer(text)

    def idle_warning(self) -> str:
        """While the session sleeps (no input for ``idle_timeout``), how long until it closes.

        Counted from this client's last input; the server counts from the last activity it saw,
        so this is an estimate (a second client of the same session would push it back)."""
        idle_close = self.launcher.settings.idle_close
        if self.state != "sleeping" or not idle_close:
            return ""
        left = max(0.0, idle_close - (time.monotonic() - self.last_input))
        return f"idle: the session closes in about {left:.0f} s without input"

    def status(self) -> dict[str, Any]:
        fps, bps = self.stats_sink.rates()
        return {
            "state": self.state,
            "node": self.node,
            "fps": fps,
            "bitrate": bps,
            "latency_ms": self.stats_sink.last_latency_ms,
            "position": self.position,
            "warning": warning_message(self.warning) or self.idle_warning(),
        }

    def status_line(self) -> str:
        s = self.status()
        parts = [s["state"] + (f" on {s['node']}" if s["node"] else "")]
        if s["position"] and s["state"] == "queued":
            parts.append(f"queue position {s['position']}")
        parts.append(f"{s['fps']:.0f} fps")
        parts.append(f"{s['bitrate'] / 1e6:.2f} Mbit/s")
        if s["latency_ms"] is not None:
            parts.append(f"input {s['latency_ms']:.0f} ms")
        if s["warning"]:
            parts.append("WARNING: " + s["warning"])
        return " | ".join(parts)

    def stats(self) -> dict[str, Any]:
        counters: dict[str, int] = {}
        if self.kernel is not None:
            counters = dict(self.kernel.player.counters)
            ic = self.kernel.input.counters
            counters["keyframe_requests"] = ic["keyframe_request"]
            counters["keyframe_requests_suppressed"] = ic["keyframe_requests_suppressed"]
            counters["inputs_sent"] = sum(v for k, v in ic.items() if not k.startswith("keyframe"))
            counters["inputs_dropped"] = self.kernel.pump.dropped
            counters["heartbeats"] = self.kernel.heartbeat.beats
            counters["heartbeat_failures"] = self.kernel.heartbeat.failures
        st = self.stats_sink
        return {
            "user": self.user,
            "sid": self.ticket.sid if self.ticket else "",
            "elapsed_s": round(time.monotonic() - self.t0, 3),
            "frames": st.frames,
            "keyframes": st.keyframes,
            "gaps": counters.get("gaps", 0),
            "bad_entries": counters.get("bad_entries", 0),
            "decode_errors": counters.get("decode_errors", 0),
            "keyframe_requests": counters.get("keyframe_requests", 0),
            "counters": counters,
            "input_latency_ms": st.latency_summary(),
            "script_events_sent": self.script.sent if self.script else 0,
            "states": list(self.states),
            "nodes": list(self.nodes),
            "reconnects": list(self.reconnects),
            "warning": self.warning,
            "media_lost": self.media_lost,
            "clipboard": dict(self.clipboard.counts) if self.clipboard else {},
            "close_reason": self.close_reason,
            "ended": self.ended,
            "exit_code": self.exit_code,
        }

    def write_stats(self) -> None:
        if self.opt.stats_json:
            try:
                write_json(self.opt.stats_json, self.stats())
            except OSError as exc:
                log.warning("cannot write %s: %s", self.opt.stats_json, exc)

    # -- the session -------------------------------------------------------------------------
    def _seen(self, state: str) -> None:
        if state != self.state:
            log.info("session state: %s -> %s", self.state, state)
        self.state = state
        if not self.states or self.states[-1] != state:
            self.states.append(state)

    def _on_node(self, node: str) -> None:
        if node and node != self.node:
            if self.node:
                self.say(f"session moved to node {node}")
                if self.kernel is not None:
                    self.kernel.input.request_keyframe()
            self.node = node
            self.nodes.append(node)

    def _on_position(self, p: int) -> None:
        self.position = p
        self._seen("queued")
        self.say(f"queued: position {p}")

    def run(self) -> str:
        """Run until ``duration`` passes or ``stop`` is set; returns why it ended.

        Raises :class:`ClientError` if login fails, the session is closed by the server, the
        server stays unreachable, or the stream is unusable.
        """
        try:
            self.ended = self._run()
            self.exit_code = 0
            return self.ended
        except _Quit:
            self.ended, self.exit_code = "stopped while reconnecting", 0
            return self.ended
        except ClientError as exc:
            self.ended, self.exit_code = str(exc), exc.exit_code
            raise
        finally:
            self.write_stats()

    def _run(self) -> str:
        self.ticket = self.launcher.login(
            self.user, self._password, wait=self.opt.queue_wait, on_position=self._on_position
        )
        t = self.ticket
        self.say(f"session {t.sid} on node {t.node or '(being moved)'} ({t.status})")
        self._on_node(t.node)
        sinks: list[Sink] = [self.stats_sink, *self.opt.sinks]
        if self.opt.record:
            sinks.append(Mp4Recorder(self.opt.record))
        if self.opt.snapshot:
            sinks.append(SnapshotSink(self.opt.snapshot))
        self.kernel = Kernel(
            self.launcher.sr,
            self.keys,
            t.sid,
            self.launcher.settings,
            sinks,
            on_input=lambda: self.launcher.mark_activity(t.sid),
            on_sent=self.stats_sink.on_sent,
            media=self.launcher.media(t.sid),
        ).start()
        self.clipboard = Clipboard(
            self.launcher.media(t.sid), self.keys, t.sid, lambda text: self.send_input("clipboard", text=text)
        )
        self.clipboard.listeners += self.clipboard_listeners
        self.clipboard.start()
        if self.opt.script:
            self.script = ScriptPlayer(
                self.opt.script, self.send_input, self.stats_sink.first_frame, self.stop, time.monotonic
            )
            self.script.start()
        closed_by_server = False
        try:
            with contextlib.suppress(*REDIS_DOWN):  # the watch loop below notices and reconnects
                self.launcher.mark_activity(t.sid)
            self._transfer(t.sid)
            return self._watch()
        except ClientError as exc:
            closed_by_server = exc.kind == "closed"
            raise
        finally:
            self.kernel.close()
            self.clipboard.close()
            counts = self.kernel.player.counters
            log.info("video: %s", dict(counts))
            if counts["bad_entries"] or counts["decode_errors"] or counts["gaps"]:
                self.say(
                    f"video: {counts['bad_entries']} bad entries, {counts['decode_errors']} decode "
                    f"errors, {counts['gaps']} gaps (each dropped until the next keyframe)"
                )
            if not closed_by_server and self.ticket is not None:
                self.launcher.logout(self.ticket.token)

    def _transfer(self, sid: str) -> None:
        """``--upload`` and ``--download`` (client/transfer.py), each said on stderr."""
        from cloudq.client.transfer import TransferError, download, upload
        from cloudq.transfer import BadTransfer

        for f in self.opt.uploads:
            try:
                self.say(f"uploaded {f} to ~/{upload(self.launcher.media(sid), self.keys, sid, f)}")
            except (OSError, TransferError, BadTransfer) as exc:
                self.say(f"upload of {f} failed: {exc}")
        for p in self.opt.downloads:
            try:
                local, n = download(self.launcher.media(sid), self.keys, sid, p)
                self.say(f"downloaded ~/{p} to {local} ({n} bytes)")
            except (OSError, TransferError, BadTransfer) as exc:
                self.say(f"download of {p} failed: {exc}")

    def _watch(self) -> str:
        end = self.t0 + self.opt.duration if self.opt.duration else None
        next_stats = 0.0
        self._stream_bad_since: float | None = None
        self._resumed_at = -math.inf  # when the client last logged in again (see _check_session)
        self._stream_mark = (0, 0)
        while not self.stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                return "session ended (duration reached)"
            try:
                self._check_session()
            except REDIS_DOWN as exc:
                self._reconnect(exc)
                continue
            self._check_stream(now)
            self._check_kernel()
            if now >= next_stats:
                self.write_stats()
                next_stats = now + STATS_EVERY
            wait = self.opt.poll if end is None else max(0.0, min(self.opt.poll, end - now))
            self.stop.wait(wait)
        return "session ended (stopped by the user)"

    def _ended(self, reason: str) -> NoReturn:
        """The server ended the session (or another login holds it): say why, exit 6."""
        self._seen("closed")
        self.close_reason = reason
        raise ClientError("closed", close_message(reason))

    def _check_session(self) -> None:
        assert self.ticket is not None
        # the heartbeat reads the session with each beat (one round trip a beat, none more); without
        # a recent beat (no kernel yet, the clock off, the server silent) ask the server
        fields = self.kernel.heartbeat.session(self._resumed_at) if self.kernel is not None else None
        if fields is None:
            raw = self.launcher.sr.hmget(self.keys.session(self.ticket.sid), SESSION_FIELDS)
            fields = session_fields(raw)
        state, reason, node, warning, token, media_lost = (fields[f] for f in SESSION_FIELDS)
        if bool(media_lost) != self.media_lost:
            self.media_lost = bool(media_lost)
            self.say(
                "media server lost: waiting for it (the session is kept)"
                if media_lost
                else "media server back"
            )
        ended = session_end(state, reason, token, hash_token(self.ticket.token))
        if ended:
            self._ended(ended)
        if state == "sleeping" and self.state != "sleeping" and self.launcher.settings.idle_close:
            self.say(
                f"idle: the node is asleep until your next input; the session closes after "
                f"{self.launcher.settings.idle_close:g} s without input"
            )
        self._seen(state)
        self._on_node(node)
        if warning and warning != self.warning:
            self.warning = warning
            self.say("warning: " + warning_message(warning))

    def _check_stream(self, now: float) -> None:
        """Entries keep arriving but none decodes for ``stream_timeout`` s: the stream is unusable."""
        if not self.opt.stream_timeout or self.kernel is None:
            return
        c = self.kernel.player.counters
        entries, frames = c["entries"], c["frames"]
        last_entries, last_frames = self._stream_mark
        self._stream_mark = (entries, frames)
        if frames > last_frames or entries == last_entries:
            if frames > last_frames:
                self._stream_bad_since = None
            return
        if self._stream_bad_since is None:
            self._stream_bad_since = now
        elif now - self._stream_bad_since >= self.opt.stream_timeout:
            raise ClientError(
                "stream",
                f"the video stream is unusable: nothing decodable for {self.opt.stream_timeout:g} s "
                f"({c['bad_entries']} bad entries, {c['decode_errors']} decode errors, {c['gaps']} gaps)",
            )

    def _check_kernel(self) -> None:
        """A kernel thread stopped (the player, the input sender): end the session and say why,
        rather than leave a frozen picture while the heartbeats go on."""
        why = self.kernel.failure() if self.kernel is not None else None
        if why:
            raise ClientError("error", f"{why}; the session was ended")

    # -- reconnection ------------------------------------------------------------------------
    def _reconnect(self, exc: Exception) -> None:
        """Back off (exponential, jittered) until the server answers, then log in again."""
        assert self.ticket is not None
        sid = self.ticket.sid
        settings = self.launcher.settings
        budget = self.opt.reconnect_budget
        if budget is None:
            budget = (settings.grace or 120.0) + settings.heartbeat_ttl
        lost_at = time.monotonic()
        frames_before = self.stats_sink.frames
        self._seen("reconnecting")
        self.write_stats()
        self.say(f"lost the server ({exc}); reconnecting for up to {budget:.0f} s")
        backoff = Backoff(BACKOFF_FIRST, BACKOFF_MAX)
        unanswered = False  # a resume went out without a reply: it may have taken the token
        while True:
            if self.stop.is_set():
                raise _Quit
            try:
                # the login connection: this session's Redis user may be gone (the session
                # closed, another login took it) and resume.lua says which, with the reason
                self.r.ping()
                ticket = self._resume(unanswered)
            except (ClientError, *REDIS_DOWN) as err:
                if isinstance(err, ClientError) and err.kind != "unreachable":
                    raise
                unanswered = unanswered or isinstance(err, ClientError)
                if time.monotonic() - lost_at >= budget:
                    raise ClientError(
                        "unreachable", f"lost the server and could not get back within {budget:.0f} s"
                    ) from None
                log.info(
                    "reconnect attempt %d failed (%s); next in <%.1f s",
                    backoff.attempts + 1,
                    err,
                    backoff.peek(),
                )
                self.write_stats()
                if backoff.wait(self.stop):
                    raise _Quit from None
                continue
            break
        self.ticket = ticket
        # a beat sent before the resume read the old token: it would say another login took over
        self._resumed_at = time.monotonic()
        down = time.monotonic() - lost_at
        self.reconnects.append(
            {
                "at_s": round(lost_at - self.t0, 3),
                "down_s": round(down, 3),
                "attempts": backoff.attempts + 1,
                "status": ticket.status,
                "node": ticket.node,
                "frames_before": frames_before,
            }
        )
        self.say(f"reconnected after {down:.1f} s: session {sid} on node {ticket.node or '(being moved)'}")
        self._on_node(ticket.node)
        if self.kernel is not None:
            self.kernel.input.request_keyframe()

    def _resume(self, unanswered: bool) -> Ticket:
        """Back into this session (:meth:`Launcher.resume`, with its token: never another session),
        or end with the reason it is over. With the password only when the token cannot: it
        lapsed (``token_ttl``), or an earlier resume went unanswered and may have replaced it."""
        assert self.ticket is not None
        try:
            return self.launcher.resume(self.ticket)
        except SessionOver as over:
            if not (unanswered and over.reason == CloseReason.TAKEN_OVER):
                self._ended(over.reason)
        except ClientError as err:
            if err.kind != "expired":
                raise
        ticket = self.launcher.login(self.user, self._password, queue=False)
        if ticket.sid != self.ticket.sid:
            # the session ended meanwhile and this login started (or queued) another: end that one
            self.launcher.logout(ticket.token)
            self._ended(CloseReason.CLOSED)
        return ticket


def client_redis(url: str, socket_timeout: float = 3.0) -> redis.Redis:
    """The client's connection: a socket timeout, so a server that stops answering (not only one
    that closes the connection) is noticed and the session reconnects."""
    return connect(
        url, socket_connect_timeout=socket_timeout, socket_timeout=socket_timeout, health_check_interval=10
    )
