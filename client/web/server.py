"""The web gateway (``cloudq gateway``): the cloud client's launcher and kernel, run server-side for
browser users. One asyncio process (aiohttp + ``redis.asyncio``) serves the page, relays logins to
the central servers and carries each browser's session over one WebSocket.

Stateless: everything a socket needs comes from Redis and the browser's cookie, so any number of
gateways can sit behind a load balancer and a browser that reconnects to another one (or to this one
restarted) continues its session.

HTTP
    ``GET /``              the page (``static/index.html``); files under ``/static/``
    ``POST /login``        JSON ``{"user", "password"}``: relayed to the central servers as the same
                           :class:`~cloudq.messages.Request` ``cloudq connect`` sends (the gateway never
                           sees a password hash). 200 ``{"user", "status", "position"}`` and the
                           token in the ``cloudq_token`` cookie (HttpOnly, SameSite=Strict, path /;
                           ``Secure`` behind TLS); 401 ``{"error"}`` for wrong credentials or a
                           locked account; 400 for a malformed body; 503 if no central server answers.
    ``POST /logout``       relays a logout for the cookie's token and clears the cookie.
    ``GET /session``       200 ``{"user", "sid", "state"}`` if the cookie's token is live, else 401.
    ``GET /healthz``       200 ``ok`` if Redis answers, else 503.
    ``GET /stats``         the gateway's counters (JSON): sockets, closes by reason, bad messages.

The token is never in a URL and never readable by page scripts. The WebSocket (``GET /ws``) checks
``Origin`` (same host as the request, or one of ``--allow-origin``) before the upgrade and the cookie
right after it.

WebSocket, gateway -> page
    binary: one video packet (all little-endian), then one H.264 access unit (Annex B)::

        off size field
          0  u8   type          1 = video
          1  u8   flags         bit 0 keyframe
          2  u16  width         stream size (from the last keyframe's codec parameters; 0 = unknown)
          4  u16  height
          6  u16  reserved      0
          8  u64  seq           the node's packet counter: a jump means packets were lost
         16  i64  pts           milliseconds
         24  f64  capture time  the node's time.time() when it rendered the frame
         32  ...  data

    text (JSON): ``{"t": "hello", "user", "sid", "node", "rights"}`` once the session is attached;
    ``{"t": "state", "state", "node", "position"}`` on every change (``queued`` with a position
    while waiting for a node); ``{"t": "warning", "warning"}``; ``{"t": "close", "reason"}`` just
    before the gateway closes the socket with code 4001 (the session is over: ``idle``, ``grace``,
    ``logout``, ``max_session``, ``taken_over``, ``mount…``). Code 4401: not logged in (or the
    token expired or was revoked).

WebSocket, page -> gateway (text only, JSON, at most ``MAX_MESSAGE`` bytes, at most ``RATE`` a
second sustained with bursts of ``BURST``)
    ``{"t": "input", "type", "seq", "ct", ...}`` one :class:`~cloudq.wire.InputEvent`
    (``key_down``/``key_up`` with ``key`` = X keysym name, ``text``, ``mouse_down``/``mouse_move``/
    ``mouse_up`` with ``x``, ``y`` in stream pixels and ``button`` 1-3, ``wheel`` with ``dx``, ``dy``);
    ``{"t": "keyframe"}`` (the page saw a gap; at most ``KEYFRAME_GAP`` apart are forwarded).
    Anything else (not JSON, unknown type, a field of the wrong type, binary, too big, too fast)
    is counted by reason in ``/stats`` and closes that socket only (1008, or 1009 when too big).

Heartbeat and activity: while a socket is attached the gateway refreshes the session's heartbeat
key every published ``heartbeat_interval`` (the socket *is* the heartbeat: when it drops, the
session goes ``disconnected`` and the reconnect grace runs), and refreshes the activity key on
real input (not on keyframe requests).

Redis rights: the gateway's own connection (``--redis-url``) posts login/logout requests, reads
their replies, reads the published settings and resolves a cookie's token to its session (token
key, the user's ``session`` field, the queue while waiting). Everything else a browser does goes
through :func:`open_session_redis`: a connection of its own that authenticates as the session's
Redis ACL user when the server has it, else falls back to the gateway's credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from aiohttp import WSCloseCode, WSMsgType, web
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from cloudq.keys import Keys
from cloudq.messages import USER_NAME, BadMessage, Reply, Request, unpack_reply
from cloudq.settings import Settings
from cloudq.tokens import hash_token, same_token, session_acl_password, session_acl_user
from cloudq.wire import BadMessage as BadWire
from cloudq.wire import InputEvent, VideoPacket

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "cloudq_token"

VIDEO_HEADER = struct.Struct("<BBHHHQqd")
MSG_VIDEO = 1
FLAG_KEYFRAME = 0x01

MAX_MESSAGE = 4096
RATE = 240.0  # page messages per second, sustained
BURST = 480.0
KEYFRAME_GAP = 0.25
INPUT_MAXLEN = 1000
PAGE_INPUT_TYPES = frozenset({"key_down", "key_up", "text", "mouse_down", "mouse_move", "mouse_up", "wheel"})
INPUT_FIELDS = ("key", "button", "x", "y", "text", "dx", "dy")

CLOSE_SESSION = 4001
CLOSE_UNAUTHORIZED = 4401

LOGIN_ERRORS = {
    "invalid": "wrong user name or password",
    "locked": "too many failed logins: the account is locked for a while",
}
UNREACHABLE = "the service is not answering; try again in a moment"

VIDEO_BATCH = 64
MAX_LAG = 0.5  # a batch spanning more stream time than this: skip to the newest keyframe
WATCH_EVERY = 0.2


def before(entry_id: bytes) -> bytes:
    """The stream id just before ``entry_id`` (XREAD returns entries after the id it is given)."""
    ms, _, seq = entry_id.partition(b"-")
    if int(seq or 0) > 0:
        return b"%d-%d" % (int(ms), int(seq) - 1)
    return b"%d-%d" % (int(ms) - 1, 2**64 - 1) if int(ms) > 0 else b"0-0"


def _median(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2] * 1000, 2) if values else None


def _ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def pack_video(vp: VideoPacket, width: int, height: int) -> bytes:
    """One video packet as the page's binary WebSocket message (see the module docstring)."""
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
    return aioredis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=10, **kw)


def _without_credentials(url: str) -> str:
    """``url`` without its user and password (a session user must not inherit the gateway's)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


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
            _without_credentials(url), username=session_acl_user(sid), password=session_acl_password(token)
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


@dataclass
class Who:
    """What a cookie's token stands for."""

    user: str
    sid: str  # "" while queued or when the token has no live session
    status: str  # session | queued | gone
    reason: str = ""  # for ``gone``: why (close reason, taken_over)


@dataclass
class Config:
    redis_url: str
    prefix: str = "cloudq:"
    allow_origins: frozenset[str] = frozenset()
    secure_cookie: bool = False
    session_rights: str = "auto"  # auto | session | gateway
    reply_timeout: float = 10.0
    max_message: int = MAX_MESSAGE
    rate: float = RATE
    burst: float = BURST


@dataclass
class Gateway:
    cfg: Config
    r: aioredis.Redis = field(init=False)
    keys: Keys = field(init=False)
    counters: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    rights: Counter[str] = field(default_factory=Counter)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    # (node capture -> read by the gateway, read -> handed to the socket) of the last packets, seconds
    lag: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=200))
    # (page sent an input -> the gateway read it (wall clocks), read -> XADDed), seconds
    input_lag: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=200))

    def __post_init__(self) -> None:
        self.r = _redis(self.cfg.redis_url)
        self.keys = Keys(self.cfg.prefix)

    async def settings(self) -> Settings:
        return Settings.from_hash(await self.r.hgetall(self.keys.settings))

    # -- login relay (the same request and reply as cloudq.client.launcher) -------------------
    async def relay(self, req: Request) -> Reply:
        """Post ``req`` on the requests stream and wait for the central server's reply."""
        await self.r.xadd(self.keys.requests, req.pack(), maxlen=10000, approximate=True)
        end = time.monotonic() + self.cfg.reply_timeout
        while (left := end - time.monotonic()) > 0:
            got = await self.r.blpop([self.keys.reply(req.id)], timeout=min(1.0, max(0.01, left)))
            if got is not None:
                return unpack_reply(got[1])
        raise TimeoutError("no central server answered in time")

    async def resolve(self, token: str) -> Who | None:
        """The user and session a token belongs to; None if it is unknown, expired or revoked."""
        if not token or len(token) > 128:
            return None
        th = hash_token(token)
        raw = await self.r.get(self.keys.token(th))
        if raw is None:
            return None
        user = raw.decode()
        sid, qtoken = (
            (v or b"").decode() for v in await self.r.hmget(self.keys.user(user), "session", "qtoken")
        )
        live = False
        if sid:
            state, reason, stoken = (
                (v or b"").decode()
                for v in await self.r.hmget(self.keys.session(sid), "state", "close_reason", "token")
            )
            live = bool(state) and state != "closed" and not reason
            if stoken and same_token(stoken, th):
                return Who(user, sid, "session") if live else Who(user, sid, "gone", reason or "closed")
        if qtoken and same_token(qtoken, th):
            return Who(user, "", "queued")
        # a live token with neither: another login holds the user's session, or it left the queue
        return Who(user, sid, "gone", "taken_over" if live else "closed")

    # -- HTTP ---------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            await self.r.ping()
        except RedisError:
            return web.Response(status=503, text="redis unreachable")
        return web.Response(text="ok")

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "sockets": len(self.sockets),
                "counters": dict(self.counters),
                "closes": dict(self.closes),
                "rights": dict(self.rights),
                "video_ms_p50": {
                    "capture_to_gateway": _median([a for a, _ in self.lag]),
                    "gateway_to_socket": _median([b for _, b in self.lag]),
                    "page_input_to_gateway": _median([a for a, _ in self.input_lag]),
                    "gateway_input_to_xadd": _median([b for _, b in self.input_lag]),
                },
            }
        )

    def _set_cookie(self, request: web.Request, resp: web.Response, token: str, ttl: float) -> None:
        resp.set_cookie(
            COOKIE,
            token,
            max_age=int(ttl) if ttl else None,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.cfg.secure_cookie or request.secure,
        )

    async def login(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"error": "the login request is not JSON"}, status=400)
        user, password = (body.get("user"), body.get("password")) if isinstance(body, dict) else (None, None)
        if not isinstance(user, str) or not isinstance(password, str) or len(password) > 1024:
            return web.json_response({"error": "user and password must be strings"}, status=400)
        if not USER_NAME.match(user):
            self.counters["login_invalid"] += 1
            return web.json_response({"error": LOGIN_ERRORS["invalid"]}, status=401)
        try:
            settings = await self.settings()
            reply = await self.relay(Request("login", uuid.uuid4().hex, user=user, password=password))
        except (RedisError, TimeoutError) as exc:
            log.warning("login %s: %s", user, exc)
            self.counters["login_unreachable"] += 1
            return web.json_response({"error": UNREACHABLE}, status=503)
        except BadMessage as exc:
            log.warning("login %s: unreadable reply: %s", user, exc)
            return web.json_response({"error": UNREACHABLE}, status=503)
        if not reply.ok:
            self.counters[f"login_{reply.status or 'error'}"] += 1
            return web.json_response({"error": LOGIN_ERRORS.get(reply.status, reply.error)}, status=401)
        self.counters["login_ok"] += 1
        log.info("login %s: %s %s", user, reply.status, reply.sid)
        resp = web.json_response({"user": user, "status": reply.status, "position": reply.position})
        self._set_cookie(request, resp, reply.token, settings.token_ttl)
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        token = request.cookies.get(COOKIE, "")
        resp = web.json_response({})
        resp.del_cookie(COOKIE, path="/")
        if token and len(token) <= 128:
            try:
                await self.relay(Request("logout", uuid.uuid4().hex, token=token))
                self.counters["logout"] += 1
            except (RedisError, TimeoutError, BadMessage) as exc:
                log.warning("logout: %s", exc)
                return web.json_response({"error": UNREACHABLE}, status=503)
        return resp

    async def session(self, request: web.Request) -> web.Response:
        try:
            who = await self.resolve(request.cookies.get(COOKIE, ""))
        except RedisError:
            return web.json_response({"error": UNREACHABLE}, status=503)
        if who is None or who.status == "gone":
            return web.json_response({"error": "not logged in"}, status=401)
        return web.json_response({"user": who.user, "sid": who.sid, "state": who.status})

    def origin_ok(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin", "")
        if origin.lower() in self.cfg.allow_origins:
            return True
        parts = urlsplit(origin)
        return (
            parts.scheme.lower() in ("http", "https")
            and bool(parts.netloc)
            and (parts.netloc.lower() == request.host.lower())
        )

    async def ws(self, request: web.Request) -> web.StreamResponse:
        if not self.origin_ok(request):
            self.closes["origin"] += 1
            log.warning("ws: refused origin %r for host %r", request.headers.get("Origin"), request.host)
            raise web.HTTPForbidden(text="origin not allowed")
        ws = web.WebSocketResponse(max_msg_size=self.cfg.max_message, heartbeat=10.0, compress=False)
        await ws.prepare(request)
        self.sockets.add(ws)
        self.counters["sockets_opened"] += 1
        try:
            await Socket(self, ws, request.cookies.get(COOKIE, "")).run()
        except (ConnectionResetError, RedisError) as exc:
            log.info("ws: ended: %s", exc)
        finally:
            self.sockets.discard(ws)
            if not ws.closed:
                await ws.close()
        return ws


async def _send_json(ws: web.WebSocketResponse, obj: dict[str, Any]) -> None:
    if not ws.closed:
        await ws.send_str(json.dumps(obj, separators=(",", ":")))


class _Closed(Exception):
    """This socket is done (closed by the page, by a policy, or because the session ended)."""


class Socket:
    """One browser's WebSocket: attaches to its session, then runs heartbeat, session watch, video
    and input until the first of them ends."""

    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, token: str) -> None:
        self.gw, self.ws, self.token = gw, ws, token
        self.keys = gw.keys
        self.bucket = TokenBucket(gw.cfg.rate, gw.cfg.burst)
        self.sr: aioredis.Redis | None = None
        self.sid = ""
        self.user = ""
        self.settings = Settings()
        self.last_keyframe_request = -math.inf
        self.last_activity = -math.inf
        self.size = (0, 0)
        self.state: dict[str, str] = {}

    async def close(self, code: int, reason: str, counted: str) -> None:
        self.gw.closes[counted] += 1
        log.info("ws %s: closing %d (%s)", self.sid or "-", code, reason)
        await self.ws.close(code=code, message=reason.encode()[:120])

    async def why_gone(self) -> str:
        """Why this socket's session ended for it ('' if it did not, or Redis cannot say)."""
        try:
            raw = await self.gw.r.hmget(self.keys.session(self.sid), "state", "close_reason", "token")
        except RedisError:
            return ""
        state, reason, token = ((v or b"").decode() for v in raw)
        if not state or state == "closed" or reason:
            return reason or "closed"
        if token and not same_token(token, hash_token(self.token)):
            return "taken_over"
        return ""

    async def end_session(self, reason: str) -> None:
        await _send_json(self.ws, {"t": "close", "reason": reason})
        await self.close(CLOSE_SESSION, reason, f"session_{reason.split(':')[0]}")

    async def run(self) -> None:
        try:
            who = await self.gw.resolve(self.token)
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
        try:
            if who.status == "queued":
                queued = asyncio.ensure_future(self.wait_in_queue())
                done, _ = await asyncio.wait({queued, reader}, return_when=asyncio.FIRST_COMPLETED)
                if queued not in done:
                    queued.cancel()
                    await asyncio.gather(queued, return_exceptions=True)
                    return
                self.sid = queued.result()
                if not self.sid:
                    return
            else:
                self.sid = who.sid
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
            node = (await self.sr.hget(self.keys.session(self.sid), "node") or b"").decode()
            await _send_json(
                self.ws, {"t": "hello", "user": self.user, "sid": self.sid, "node": node, "rights": rights}
            )
            await self.mark_activity()
            tasks = [
                asyncio.ensure_future(c)
                for c in (self.heartbeat_loop(), self.watch_loop(), self.video_loop())
            ]
            tasks.append(reader)
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
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
        finally:
            if not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            if self.sr is not None:
                await self.sr.aclose()

    # -- queue --------------------------------------------------------------------------------
    async def wait_in_queue(self) -> str:
        """Like the launcher: keep the queue beat alive and wait for the assignment (a session id)."""
        r, keys, th = self.gw.r, self.keys, hash_token(self.token)
        interval = self.settings.heartbeat_interval or 1.0
        ttl = self.settings.heartbeat_ttl or 3 * interval
        position = 0
        while True:
            await r.set(keys.queued(self.user), "1", px=int(ttl * 1000))
            pos = await r.lpos(keys.queue, self.user)
            if pos is not None and pos + 1 != position:
                position = pos + 1
                await _send_json(self.ws, {"t": "state", "state": "queued", "position": position})
            got = await r.blpop([keys.notify(th)], timeout=interval)
            if got is not None:
                await r.delete(keys.queued(self.user))
                return got[1].decode()
            if pos is None:
                # out of the queue without a notification for us: another socket of the same token
                # (a second tab, another gateway) took it, or the ticket ended
                who = await self.gw.resolve(self.token)
                if who is not None and who.status == "session":
                    await r.delete(keys.queued(self.user))
                    return who.sid
                if who is None or who.status == "gone":
                    await self.end_session(who.reason if who else "logout")
                    return ""

    # -- the session ---------------------------------------------------------------------------
    async def mark_activity(self) -> None:
        """The browser attached: like the launcher at start, the user is there."""
        idle = self.settings.idle_timeout
        if idle and self.sr is not None:
            self.last_activity = time.monotonic()
            await self.sr.set(self.keys.activity(self.sid), "1", px=int(idle * 1000))

    async def heartbeat_loop(self) -> None:
        s = self.settings
        if not (s.heartbeat_ttl and s.heartbeat_interval):
            await asyncio.Event().wait()  # the heartbeat clock is off: nothing to do
        assert self.sr is not None
        while True:
            await self.sr.set(self.keys.heartbeat(self.sid), "1", px=int(s.heartbeat_ttl * 1000))
            self.gw.counters["heartbeats"] += 1
            await asyncio.sleep(s.heartbeat_interval)

    async def watch_loop(self) -> None:
        """Tell the page the session's state, node and warnings; end the socket when it closes."""
        assert self.sr is not None
        th = hash_token(self.token)
        while True:
            raw = await self.sr.hmget(
                self.keys.session(self.sid), "state", "close_reason", "node", "warning", "token"
            )
            state, reason, node, warning, token = ((v or b"").decode() for v in raw)
            if not state or state == "closed" or reason:
                await self.end_session(reason or "closed")
                raise _Closed
            if token and not same_token(token, th):
                await self.end_session("taken_over")
                raise _Closed
            now = {"state": state, "node": node}
            if now != {k: self.state.get(k) for k in now}:
                await _send_json(self.ws, {"t": "state", **now})
                if self.state.get("node") and node and node != self.state.get("node"):
                    await self.request_keyframe()  # moved to another node: resume from a keyframe
            if warning and warning != self.state.get("warning"):
                await _send_json(self.ws, {"t": "warning", "warning": warning})
            self.state = {**now, "warning": warning}
            await asyncio.sleep(WATCH_EVERY)

    async def newest_keyframe(self, after: bytes = b"0-0") -> bytes | None:
        assert self.sr is not None
        key, end = self.keys.video(self.sid), b"+"
        while True:
            chunk = await self.sr.xrevrange(key, max=end, min=b"(" + after, count=32)
            for entry_id, fields in chunk:
                try:
                    if VideoPacket.unpack(fields).keyframe:
                        return entry_id
                except BadWire:
                    continue
            if len(chunk) < 32:
                return None
            end = b"(" + chunk[-1][0]

    async def video_loop(self) -> None:
        """XREAD the session's video stream and forward every valid packet as a binary message,
        from the newest keyframe on; when the socket falls behind, skip to the newest keyframe."""
        assert self.sr is not None
        key = self.keys.video(self.sid)
        kid = await self.newest_keyframe()
        if kid is not None:
            last = before(kid)
        else:
            tail = await self.sr.xrevrange(key, count=1)
            last = tail[0][0] if tail else b"0-0"
            await self.request_keyframe()
        while True:
            resp = await self.sr.xread({key: last}, count=VIDEO_BATCH, block=1000)
            if not resp:
                continue
            entries = resp[0][1]
            if len(entries) >= VIDEO_BATCH or _ms(entries[-1][0]) - _ms(entries[0][0]) > MAX_LAG * 1000:
                kid = await self.newest_keyframe(after=last)
                if kid is not None and before(kid) != last:
                    self.gw.counters["video_jumps"] += 1
                    last = before(kid)
                    continue
            for entry_id, fields in entries:
                last = entry_id
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
        if self.sr is None:
            return
        idle, now = self.settings.idle_timeout, time.monotonic()
        if not (activity and idle and now - self.last_activity >= min(0.25, idle / 10)):
            await self.sr.xadd(self.keys.input(self.sid), ev.pack(), maxlen=INPUT_MAXLEN, approximate=True)
            return
        self.last_activity = now
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
                if len(msg.data.encode()) > self.gw.cfg.max_message:
                    await self.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big", "too_big")
                    raise _Closed
                try:
                    got = parse_page_message(msg.data)
                except PageMessageError as exc:
                    log.info("ws %s: bad message: %s", self.sid or "-", exc.reason)
                    await self.close(WSCloseCode.POLICY_VIOLATION, exc.reason, exc.counted)
                    raise _Closed from None
                if self.sr is None:
                    continue  # still queued: nothing to send input to
                if got == "keyframe":
                    await self.request_keyframe()
                else:
                    assert isinstance(got, InputEvent)
                    await self.send_input(got, activity=True)
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


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    resp = await handler(request)
    if not isinstance(resp, web.WebSocketResponse):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
        resp.headers.setdefault("Cache-Control", "no-cache")
    return resp


def create_app(cfg: Config) -> web.Application:
    gw = Gateway(cfg)
    app = web.Application(middlewares=[security_headers], client_max_size=4096)
    app["gateway"] = gw
    app.router.add_get("/", gw.index)
    app.router.add_get("/healthz", gw.healthz)
    app.router.add_get("/stats", gw.stats)
    app.router.add_post("/login", gw.login)
    app.router.add_post("/logout", gw.logout)
    app.router.add_get("/session", gw.session)
    app.router.add_get("/ws", gw.ws)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)

    async def on_shutdown(app: web.Application) -> None:
        for ws in list(gw.sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")

    async def on_cleanup(app: web.Application) -> None:
        await gw.r.aclose()

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def serve(cfg: Config, host: str, port: int, metrics_port: int = 0, metrics_addr: str = "0.0.0.0") -> None:
    """Run the gateway until SIGINT/SIGTERM (and its Prometheus metrics on ``metrics_port``, 0 = off)."""
    from cloudq.client.web.metrics import gateway_registry
    from cloudq.metrics import serve as serve_metrics

    log.info("gateway on http://%s:%d (session rights: %s)", host, port, cfg.session_rights)
    access = logging.getLogger("aiohttp.access")
    app = create_app(cfg)
    serve_metrics(metrics_port, gateway_registry(app["gateway"]), metrics_addr)
    web.run_app(
        app,
        host=host,
        port=port,
        print=None,
        shutdown_timeout=2.0,
        reuse_address=True,
        access_log=access if access.isEnabledFor(logging.DEBUG) else None,  # -vv logs every request
    )
