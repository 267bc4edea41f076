"""The per-browser WebSocket session of the web gateway (``GET /ws``): parsing the page's messages,
relaying video to the page and input to the node, the session's own Redis connection
(:func:`open_session_redis`) and its heartbeat. The protocol is the package docstring
(:mod:`cloudq.client.web`); the HTTP side is :mod:`cloudq.client.web.http`."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from aiohttp import WSCloseCode, WSMsgType, web
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cloudq import loginflow
from cloudq.client.web.audio import audio_loop
from cloudq.client.web.clipboard import CLIP_MESSAGE, clip_loop
from cloudq.connection import aconnect, without_credentials
from cloudq.media import FIELD as MEDIA_FIELD
from cloudq.media import aconnect_like
from cloudq.sessionend import SESSION_FIELDS, close_message, session_end, session_fields, warning_message
from cloudq.settings import Settings
from cloudq.streamread import Cursor, KeyframeScan
from cloudq.tokens import hash_token, session_acl_password, session_acl_user
from cloudq.wire import BadMessage as BadWire
from cloudq.wire import InputEvent, VideoPacket

if TYPE_CHECKING:
    from cloudq.client.web.http import Gateway

log = logging.getLogger(__name__)

VIDEO_HEADER = struct.Struct("<BBHHHQqd")
MSG_VIDEO = 1
FLAG_KEYFRAME = 0x01

MAX_MESSAGE = 4096
RATE = 240.0  # page messages per second, sustained
BURST = 480.0
KEYFRAME_GAP = 0.25
INPUT_MAXLEN = 1000
PAGE_INPUT_TYPES = frozenset(
    {"key_down", "key_up", "text", "mouse_down", "mouse_move", "mouse_up", "wheel", "clipboard", "resize"}
)
INPUT_FIELDS = ("key", "button", "x", "y", "text", "dx", "dy", "width", "height")

CLOSE_SESSION = 4001
CLOSE_UNAUTHORIZED = 4401

WATCH_EVERY = 0.2
"""How often (s) a socket reads its session's state when the heartbeat clock is off (else with each beat)."""


def pack_video(vp: VideoPacket, width: int, height: int) -> bytes:
    """One video packet as the page's binary WebSocket message (see the package docstring)."""
    flags = FLAG_KEYFRAME if vp.keyframe else 0
    return VIDEO_HEADER.pack(MSG_VIDEO, flags, width, height, 0, vp.seq, vp.pts, vp.capture_time) + vp.data


class PageMessageError(ValueError):
    """A page message that cannot be used; ``counted`` is the reason's counter name."""

    def __init__(self, counted: str, reason: str) -> None:
        super().__init__(reason)
        self.counted = counted
        self.reason = reason


def _reject_constant(name: str) -> float:
    raise PageMessageError("malformed", f"not JSON: {name}")


def parse_page_message(text: str) -> InputEvent | str:
    """One page text message -> an :class:`InputEvent` or ``"keyframe"``.

    Raises :class:`PageMessageError` for anything else. Unknown keys are ignored (a newer page may
    add some); every field the node reads is validated by :class:`InputEvent` itself.
    """
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except PageMessageError:
        raise
    except (ValueError, RecursionError) as exc:
        raise PageMessageError("malformed", f"not JSON: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise PageMessageError("malformed", "a message must be a JSON object")
    t = body.get("t")
    if t == "keyframe":
        return "keyframe"
    if t != "input":
        raise PageMessageError("invalid", f"unknown message type {str(t)[:32]!r}")
    kind = body.get("type")
    if kind not in PAGE_INPUT_TYPES:
        raise PageMessageError("invalid", f"unknown input type {str(kind)[:32]!r}")
    if kind in ("mouse_down", "mouse_up") and body.get("button") not in (1, 2, 3):
        raise PageMessageError("invalid", "button must be 1, 2 or 3")
    try:
        return InputEvent(
            kind,
            body.get("seq"),  # type: ignore[arg-type]  # validated by InputEvent
            body.get("ct"),  # type: ignore[arg-type]
            **{name: body.get(name) for name in INPUT_FIELDS},
        )
    except BadWire as exc:
        raise PageMessageError("invalid", exc.reason) from None


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


# ---------------------------------------------------------------------------------------------------
# Redis


def _redis(url: str, **kw: Any) -> aioredis.Redis:
    # no socket timeout: reads block on streams; a dead server shows as a connection error
    return aconnect(url, socket_connect_timeout=5, health_check_interval=10, **kw)


async def open_session_redis(
    url: str, sid: str, token: str, mode: str = "auto"
) -> tuple[aioredis.Redis, str]:
    """The connection one browser's session traffic goes through, and which rights it holds.

    ``mode``: ``session`` = authenticate as the session's Redis ACL user
    (:func:`~cloudq.tokens.session_acl_user`, password derived from the token) or fail;
    ``gateway`` = the gateway's own credentials from ``url``; ``auto`` = the session user when the
    server has it, else the gateway's credentials. Returns ``(client, "session" | "gateway")``.
    Raises :class:`redis.exceptions.AuthenticationError` when ``mode`` is ``session`` and the
    server refuses that user.
    """
    if mode in ("auto", "session"):
        # the URL's own credentials would win over these: connect without them
        r = _redis(
            without_credentials(url), username=session_acl_user(sid), password=session_acl_password(token)
        )
        try:
            await r.ping()
            return r, "session"
        except (AuthenticationError, ResponseError) as exc:
            await r.aclose()
            if mode == "session":
                raise AuthenticationError(
                    f"Redis refused session user {session_acl_user(sid)}: {exc}"
                ) from None
            log.debug("session user for %s not in force (%s): gateway credentials", sid, exc)
    return _redis(url), "gateway"


async def media_redis(sr: aioredis.Redis, keys: Any, sid: str) -> aioredis.Redis:
    """The connection for session ``sid``'s streams: its media server (:mod:`cloudq.media`) with
    ``sr``'s credentials, or ``sr`` itself when the control server holds them."""
    url = (await sr.hget(keys.session(sid), MEDIA_FIELD) or b"").decode()
    return aconnect_like(url, sr) if url else sr


MEDIA_RETRY = 0.5
"""Seconds between two tries of a lost media server (the page is told it is lost meanwhile)."""


async def _send_json(ws: web.WebSocketResponse, obj: dict[str, Any]) -> None:
    if not ws.closed:
        await ws.send_str(json.dumps(obj, separators=(",", ":")))


async def stop_tasks(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and return when every one has ended.

    One ``cancel()`` is not enough: on Python 3.11 ``asyncio.wait_for`` (which redis-py wraps
    around its reads) drops a cancellation that lands as the read completes, so a loop cancelled
    in the middle of a Redis command carries on (this left every early-closed socket's heartbeat
    and connection alive). So cancel again until each task is done; the retrieved results and
    errors are the caller's business (``Task.exception()`` of a done task)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.05)
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" at exit


class _Closed(Exception):
    """This socket is done (closed by the page, by a policy, or because the session ended)."""


class Socket:
    """One browser's WebSocket: attaches to its session, then runs heartbeat, session watch, video
    and input until the first of them ends."""

    def __init__(
        self, gw: Gateway, ws: web.WebSocketResponse, token: str, sid_hints: tuple[str, ...] = ()
    ) -> None:
        self.gw, self.ws, self.token = gw, ws, token
        self.token_hash = hash_token(token)  # what the session hash holds of it (read each beat)
        self.keys = gw.keys
        self.bucket = TokenBucket(gw.cfg.rate, gw.cfg.burst)
        self.clip_bucket = TokenBucket(1.0, 4.0)  # clipboard messages (up to 1 MiB each)
        self.sr: aioredis.Redis | None = None
        self.mr: aioredis.Redis | None = None  # the session's streams (its media server, or sr)
        self.media_lost = False
        self.sid = ""
        self.user = ""
        self.settings = Settings()
        self.last_keyframe_request = -math.inf
        self.last_activity = -math.inf
        self.size = (0, 0)
        self.state: dict[str, str] = {}
        self.sid_hints = sid_hints
        self.ending = asyncio.Event()  # set when the gateway starts closing the socket

    async def close(self, code: int, reason: str, counted: str) -> None:
        self.ending.set()
        self.gw.closes[counted] += 1
        log.info("ws %s: closing %d (%s)", self.sid or "-", code, reason)
        await self.ws.close(code=code, message=reason.encode()[:120])

    async def why_gone(self) -> str:
        """Why this socket's session ended for it ('' if it did not, or Redis cannot say)."""
        try:
            raw = await self.gw.r.hmget(self.keys.session(self.sid), "state", "close_reason", "token")
        except RedisError:
            return ""
        return session_end(*raw, mine=self.token_hash) or ""

    async def end_session(self, reason: str) -> None:
        await _send_json(self.ws, {"t": "close", "reason": reason, "text": close_message(reason)})
        await self.close(CLOSE_SESSION, reason, f"session_{reason.split(':')[0]}")

    async def run(self) -> None:
        try:
            who = await self.gw.resolve(self.token, self.sid_hints)
        except RedisError as exc:
            log.warning("ws: redis: %s", exc)
            await self.close(WSCloseCode.TRY_AGAIN_LATER, "redis unreachable", "redis")
            return
        if who is None:
            await _send_json(self.ws, {"t": "close", "reason": "unauthorized"})
            await self.close(CLOSE_UNAUTHORIZED, "unauthorized", "unauthorized")
            return
        if who.status == "gone":
            await self.end_session(who.reason)
            return
        self.user = who.user
        self.settings = await self.gw.settings()
        reader = asyncio.ensure_future(self.read_loop())
        tasks: list[asyncio.Future[Any]] = [reader]
        try:
            if who.status == "queued":
                queued = asyncio.ensure_future(self.wait_in_queue())
                tasks.append(queued)
                await asyncio.wait({queued, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not queued.done():
                    return  # the page went away: the finally stops the queue wait
                step = queued.result()
                if step.kind != loginflow.ASSIGNED:
                    # from this task, not the queue's: run() must not cancel a close half done
                    await self.end_session(step.reason)
                    return
                self.sid = step.sid
            else:
                self.sid = who.sid
            if reader.done():
                return  # ended before it was attached: no session connection, no heartbeat
            try:
                self.sr, rights = await open_session_redis(
                    self.gw.cfg.redis_url, self.sid, self.token, self.gw.cfg.session_rights
                )
            except AuthenticationError as exc:  # --session-rights session, and Redis refused the user
                log.warning("ws %s: %s", self.sid, exc)
                await _send_json(self.ws, {"t": "close", "reason": "unauthorized"})
                await self.close(CLOSE_UNAUTHORIZED, "unauthorized", "session_user_refused")
                return
            self.gw.rights[rights] += 1
            self.mr = await media_redis(self.sr, self.keys, self.sid)
            if reader.done():
                return
            node = (await self.sr.hget(self.keys.session(self.sid), "node") or b"").decode()
            await _send_json(
                self.ws, {"t": "hello", "user": self.user, "sid": self.sid, "node": node, "rights": rights}
            )
            await self.mark_activity()
            loops = [
                asyncio.ensure_future(c)
                for c in (
                    self.heartbeat_loop(),
                    self.on_media(self.video_loop),
                    self.on_media(lambda: audio_loop(self)),
                    self.on_media(lambda: clip_loop(self)),
                    self.ending.wait(),
                )
            ]
            tasks += loops
            done, _ = await asyncio.wait([*loops, reader], return_when=asyncio.FIRST_COMPLETED)
            # the socket is ending (the page left, or a close is under way): the heartbeat, the
            # session watch and the video stop now, not when the close handshake is over
            await stop_tasks(loops)
            for t in done - {reader}:
                exc = t.exception()
                if isinstance(exc, RedisError):
                    # the server cuts a session user's connections when its token ends (another
                    # login took the session over, logout, close): say why, not "unreachable"
                    gone = await self.why_gone()
                    if gone:
                        await self.end_session(gone)
                        continue
                    log.warning("ws %s: redis: %s", self.sid, exc)
                    await self.close(WSCloseCode.TRY_AGAIN_LATER, "redis unreachable", "redis")
                elif exc is not None and not isinstance(exc, _Closed | ConnectionResetError):
                    log.error("ws %s: %r", self.sid, exc, exc_info=exc)
                    await self.close(WSCloseCode.INTERNAL_ERROR, "internal error", "internal")
            if self.ending.is_set() and not reader.done():
                # a close frame is out: let the reader see the answer (bounded by the close timeout)
                await asyncio.wait({reader}, timeout=self.gw.cfg.close_timeout + 0.5)
        finally:
            # whatever ended the socket (a bad message, a close, a reset, an error, this task
            # cancelled): no loop of it outlives it, and its connection is closed
            await stop_tasks(tasks)
            if self.mr is not None and self.mr is not self.sr:
                await self.mr.aclose()
            if self.sr is not None:
                await self.sr.aclose()

    async def on_media(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop`` (it reads one of the session's streams). When they live on a media server
        and it stops answering, tell the page (``{"t": "media", "state": "lost"}``), wait for it
        (the session is kept: the heartbeats go to the control server), say it is back and run
        ``loop`` again, from the stream's newest keyframe."""
        while True:
            try:
                return await loop()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if self.mr is self.sr or self.mr is None:
                    raise
                if not self.media_lost:
                    self.media_lost = True
                    self.gw.counters["media_lost"] += 1
                    log.warning("ws %s: media server lost: %s", self.sid, exc)
                    await _send_json(self.ws, {"t": "media", "state": "lost"})
            while self.media_lost:
                await asyncio.sleep(MEDIA_RETRY)
                try:
                    await self.mr.ping()
                except (RedisConnectionError, RedisTimeoutError):
                    continue
                if self.media_lost:
                    self.media_lost = False
                    await _send_json(self.ws, {"t": "media", "state": "ok"})

    # -- queue --------------------------------------------------------------------------------
    async def wait_in_queue(self) -> loginflow.QueueStep:
        """Keep the place until a node is assigned (``ASSIGNED``) or the place is lost
        (``DROPPED``). What each poll means is :class:`loginflow.QueueWait`'s decision, the same
        as the launcher's."""
        r, keys, th = self.gw.r, self.keys, self.token_hash
        q = loginflow.QueueWait(self.settings)
        while True:
            await r.set(keys.queued(self.user), "1", px=q.beat_ms)
            pos = await r.lpos(keys.queue, self.user)
            if q.moved(pos):
                await _send_json(self.ws, {"t": "state", "state": "queued", "position": q.position})
            step = q.after_wait(pos, await r.blpop([keys.notify(th)], timeout=q.interval))
            if step.kind == loginflow.LEFT:
                # the gateway may look the ticket up: another socket of the same token (a second
                # tab, another gateway) may have taken the notification
                who = await self.gw.resolve(self.token, self.sid_hints)
                step = q.left(*((who.status, who.sid, who.reason) if who else ("revoked",)))
            if step.kind in (loginflow.ASSIGNED, loginflow.DROPPED):
                return step

    # -- the session ---------------------------------------------------------------------------
    async def mark_activity(self) -> None:
        """The browser attached: like the launcher at start, the user is there."""
        idle = self.settings.idle_timeout
        if idle and self.sr is not None:
            self.last_activity = time.monotonic()
            await self.sr.set(self.keys.activity(self.sid), "1", px=int(idle * 1000))

    async def heartbeat_loop(self) -> None:
        """Beat the session's heartbeat and, in the same round trip, read the session's state
        (:meth:`watch`); with the heartbeat clock off, only read it every :data:`WATCH_EVERY` s."""
        s = self.settings
        assert self.sr is not None
        beating = bool(s.heartbeat_ttl and s.heartbeat_interval)
        while True:
            pipe = self.sr.pipeline(transaction=False)
            if beating:
                pipe.set(self.keys.heartbeat(self.sid), "1", px=int(s.heartbeat_ttl * 1000))
            pipe.hmget(self.keys.session(self.sid), SESSION_FIELDS)
            *beat, raw = await pipe.execute()
            if beat:
                self.gw.counters["heartbeats"] += 1
            await self.watch(session_fields(raw))
            await asyncio.sleep(s.heartbeat_interval if beating else WATCH_EVERY)

    async def watch(self, fields: dict[str, str]) -> None:
        """Tell the page the session's state, node and warnings (:data:`SESSION_FIELDS`, as the
        command-line client reads them); end the socket when it closes."""
        state, reason, node, warning, token = (
            fields[k] for k in ("state", "close_reason", "node", "warning", "token")
        )
        ended = session_end(state, reason, token, self.token_hash)
        if ended:
            await self.end_session(ended)
            raise _Closed
        now = {"state": state, "node": node}
        if now != {k: self.state.get(k) for k in now}:
            await _send_json(self.ws, {"t": "state", **now})
            if self.state.get("node") and node and node != self.state.get("node"):
                await self.request_keyframe()  # moved to another node: resume from a keyframe
        if warning and warning != self.state.get("warning"):
            await _send_json(self.ws, {"t": "warning", "warning": warning, "text": warning_message(warning)})
        self.state = {**now, "warning": warning}

    async def scan(self, after: bytes = b"0-0") -> KeyframeScan:
        """Look for the newest keyframe entry newer than ``after`` (back from the stream's end)."""
        assert self.sr is not None
        scan = KeyframeScan(after)
        assert self.mr is not None
        while not scan.feed(await self.mr.xrevrange(self.keys.video(self.sid), **scan.page())):
            pass
        return scan

    async def video_loop(self) -> None:
        """XREAD the session's video stream and forward every valid packet as a binary message,
        from the newest keyframe on; when the socket falls behind, skip to the newest keyframe
        (the decisions are :mod:`cloudq.streamread`'s, the same as the client's player)."""
        assert self.sr is not None
        key, cursor = self.keys.video(self.sid), Cursor()
        if cursor.start(await self.scan()):
            await self.request_keyframe()
        while True:
            assert cursor.last is not None
            resp = await self.mr.xread({key: cursor.last}, count=cursor.batch, block=1000)  # type: ignore[union-attr]
            if not resp:
                continue
            entries = resp[0][1]
            if cursor.behind(entries) and cursor.jump(await self.scan(after=cursor.last)):
                self.gw.counters["video_jumps"] += 1
                continue
            for entry_id, fields in entries:
                cursor.last = entry_id
                try:
                    vp = VideoPacket.unpack(fields)
                except BadWire as exc:
                    self.gw.counters["bad_video_entries"] += 1
                    log.warning("ws %s: bad video entry %s: %s", self.sid, entry_id.decode(), exc.reason)
                    continue  # the page sees the seq jump and asks for a keyframe
                if vp.has_params:
                    self.size = (vp.width or 0, vp.height or 0)
                received = time.time()
                await self.ws.send_bytes(pack_video(vp, *self.size))
                self.gw.counters["video_packets"] += 1
                self.gw.lag.append((received - vp.capture_time, time.time() - received))

    async def request_keyframe(self) -> None:
        now = time.monotonic()
        if now - self.last_keyframe_request < KEYFRAME_GAP:
            self.gw.counters["keyframe_requests_suppressed"] += 1
            return
        self.last_keyframe_request = now
        await self.send_input(InputEvent("keyframe_request", 0, time.time()))
        self.gw.counters["keyframe_requests"] += 1

    async def send_input(self, ev: InputEvent, activity: bool = False) -> None:
        """XADD ``ev`` to the input stream; with ``activity`` also refresh the activity key (real
        input, at most every quarter second), in the same round trip."""
        if self.sr is None or self.mr is None:
            return
        idle, now = self.settings.idle_timeout, time.monotonic()
        fresh = activity and idle and now - self.last_activity >= self.settings.activity_refresh
        if fresh:
            self.last_activity = now
        if self.mr is not self.sr:  # two servers: the input to the media one, activity to this one
            if fresh:
                await self.sr.set(self.keys.activity(self.sid), "1", px=int(idle * 1000))
            try:
                await self.mr.xadd(
                    self.keys.input(self.sid), ev.pack(), maxlen=INPUT_MAXLEN, approximate=True
                )
            except (RedisConnectionError, RedisTimeoutError):
                self.gw.counters["input_media_lost"] += 1  # the node cannot read it either
            return
        if not fresh:
            await self.sr.xadd(self.keys.input(self.sid), ev.pack(), maxlen=INPUT_MAXLEN, approximate=True)
            return
        pipe = self.sr.pipeline(transaction=False)
        pipe.xadd(self.keys.input(self.sid), ev.pack(), maxlen=INPUT_MAXLEN, approximate=True)
        pipe.set(self.keys.activity(self.sid), "1", px=int(idle * 1000))
        await pipe.execute()

    async def read_loop(self) -> None:
        """The page's messages; any bad one closes this socket (counted by reason)."""
        ws = self.ws
        while True:
            msg = await ws.receive()
            received = time.time()
            if msg.type == WSMsgType.TEXT:
                if not self.bucket.take():
                    await self.close(WSCloseCode.POLICY_VIOLATION, "too many messages", "rate")
                    raise _Closed
                size = len(msg.data.encode())
                big = size > self.gw.cfg.max_message  # only a clipboard message may be
                if size > CLIP_MESSAGE:
                    await self.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big", "too_big")
                    raise _Closed
                try:
                    got = parse_page_message(msg.data)
                except PageMessageError as exc:
                    if big:  # too big for anything but a clipboard message, whatever it holds
                        await self.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big", "too_big")
                        raise _Closed from None
                    log.info("ws %s: bad message: %s", self.sid or "-", exc.reason)
                    await self.close(WSCloseCode.POLICY_VIOLATION, exc.reason, exc.counted)
                    raise _Closed from None
                if big and not (isinstance(got, InputEvent) and got.type == "clipboard"):
                    await self.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big", "too_big")
                    raise _Closed
                if isinstance(got, InputEvent) and got.type == "clipboard":
                    if not self.clip_bucket.take():
                        self.gw.counters["clipboard_dropped"] += 1
                        continue
                    self.gw.counters["clipboard_in"] += 1
                if self.sr is None:
                    continue  # still queued: nothing to send input to
                if got == "keyframe":
                    await self.request_keyframe()
                else:
                    assert isinstance(got, InputEvent)
                    await self.send_input(got, activity=got.type != "resize")  # a window, not a user
                    self.gw.counters["inputs"] += 1
                    self.gw.input_lag.append((received - got.client_time, time.time() - received))
            elif msg.type == WSMsgType.BINARY:
                await self.close(WSCloseCode.POLICY_VIOLATION, "binary messages are not accepted", "binary")
                raise _Closed
            elif msg.type == WSMsgType.ERROR:
                code = getattr(msg.data, "code", None)
                self.gw.closes["too_big" if code == WSCloseCode.MESSAGE_TOO_BIG else "protocol"] += 1
                log.info("ws %s: closed on error %r", self.sid or "-", msg.data)
                raise _Closed
            else:  # CLOSE, CLOSING, CLOSED: the page went away; the heartbeat stops with us
                raise _Closed
