"""The HTTP side of the web gateway (``cloudq gateway``): the app, its endpoints (page, login,
logout, session, health, stats), the token cookie and :func:`serve`. The protocol is the package
docstring (:mod:`cloudq.client.web`); each browser's WebSocket is :mod:`cloudq.client.web.socket`;
the per-address cap and the request-head timeout are :mod:`cloudq.client.web.guard`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from aiohttp import WSCloseCode, web
from redis.exceptions import RedisError

from cloudq import loginflow
from cloudq.client.web import files
from cloudq.client.web.clipboard import CLIP_MESSAGE
from cloudq.client.web.guard import Guard, GuardedRunner, head_clock
from cloudq.client.web.socket import BURST, MAX_MESSAGE, RATE, Socket, _redis
from cloudq.keys import Keys
from cloudq.messages import USER_NAME, BadMessage, Reply, Request, unpack_reply
from cloudq.percentile import percentile
from cloudq.sessionend import session_end
from cloudq.settings import Settings
from cloudq.state import CloseReason
from cloudq.tokens import hash_token, same_token

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "cloudq_token"
SID_COOKIE = "cloudq_sid"  # which session the token was issued for: a hint, checked against Redis
POOL_IDLE = 4  # idle connections the gateway's shared Redis pool keeps open
SID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

LOGIN_ERRORS = {
    "invalid": "wrong user name or password",
    "locked": "too many failed logins: the account is locked for a while",
}
UNREACHABLE = "the service is not answering; try again in a moment"


def _median(values: list[float]) -> float | None:
    return round(percentile(values, 50) * 1000, 2) if values else None


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
    # clocks and limits of the gateway's own connections (s; 0 = off)
    header_timeout: float = 10.0  # a request head must arrive within this (idle keep-alive included)
    body_timeout: float = 10.0  # the login body must arrive within this
    close_timeout: float = 1.0  # a closing WebSocket waits this long for the page's close frame
    ws_ping: float = 10.0  # ping every open WebSocket this often; no pong in half of it: closed
    max_per_address: int = 64  # open connections per client address (0 = no cap)


@dataclass
class Gateway:
    cfg: Config
    r: aioredis.Redis = field(init=False)
    keys: Keys = field(init=False)
    counters: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    rights: Counter[str] = field(default_factory=Counter)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    guard: Guard = field(init=False)
    # (node capture -> read by the gateway, read -> handed to the socket) of the last packets, seconds
    lag: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=200))
    # (page sent an input -> the gateway read it (wall clocks), read -> XADDed), seconds
    input_lag: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=200))

    def __post_init__(self) -> None:
        self.r = _redis(self.cfg.redis_url)
        self.keys = Keys(self.cfg.prefix)
        self.guard = Guard(self.cfg.max_per_address, self.cfg.header_timeout)

    async def trim_pool(self, every: float = 0.25) -> None:
        """Close the shared connections left idle beyond ``POOL_IDLE``: a burst of sockets or
        logins (a flood of early closes) checks out one connection each, and redis-py keeps them
        all open for good, so the gateway would hold the burst's peak against the server's
        ``maxclients`` for ever."""
        pool = self.r.connection_pool
        while True:
            await asyncio.sleep(every)
            idle = getattr(pool, "_available_connections", None)
            while isinstance(idle, list) and len(idle) > POOL_IDLE:
                conn = idle.pop(0)  # the least recently used
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                self.counters["redis_idle_closed"] += 1

    async def settings(self) -> Settings:
        return Settings.from_hash(await self.r.hgetall(self.keys.settings))

    # -- login relay (cloudq.loginflow: the same request and reply as cloudq.client.launcher) --
    async def relay(self, req: Request) -> Reply:
        """Post ``req`` on the requests stream and wait for the central server's reply."""
        await self.r.rpush(*loginflow.post(self.keys, req))
        for block in loginflow.reply_blocks(self.cfg.reply_timeout):
            got = await self.r.blpop([self.keys.reply(req.id)], timeout=block)
            if got is not None:
                return unpack_reply(got[1])
        raise TimeoutError(loginflow.NO_ANSWER)

    async def resolve(self, token: str, hints: Iterable[str] = ()) -> Who | None:
        """The user and session a token belongs to; None if it is unknown, expired or revoked.

        ``hints``: session ids the browser says it had (the ``cloudq_sid`` cookie set at login,
        the ``sid`` the page got in its last ``hello``). A hint is only a place to look: the
        session hash must name this user and hold this token's hash. The gateway does not read
        user hashes (they hold the bcrypt hash, and a Redis ACL cannot narrow a hash to fields):
        a token with no matching hint is queued when its user is in the queue, else gone."""
        if not token or len(token) > 128:
            return None
        th = hash_token(token)
        raw = await self.r.get(self.keys.token(th))
        if raw is None:
            return None
        user = raw.decode()
        live = ""
        for sid in dict.fromkeys(h for h in hints if h and SID.match(h)):
            state, reason, stoken, owner = (
                (v or b"").decode()
                for v in await self.r.hmget(self.keys.session(sid), "state", "close_reason", "token", "user")
            )
            if owner != user:
                continue  # not this user's session: the hint is ignored
            ended = session_end(state, reason)
            if stoken and same_token(stoken, th):
                return Who(user, sid, "session") if ended is None else Who(user, sid, "gone", ended)
            if ended is None:
                live = sid
        if await self.r.lpos(self.keys.queue, user) is not None:
            # a live token of a user in the queue is the queue ticket: a new login revokes the old
            return Who(user, "", "queued")
        # a live token with neither: another login holds the user's session, or it left the queue
        return Who(user, live, "gone", CloseReason.TAKEN_OVER if live else CloseReason.CLOSED)

    def hints(self, request: web.Request) -> tuple[str, ...]:
        return (request.query.get("sid", ""), request.cookies.get(SID_COOKIE, ""))

    async def logged_in(self, request: web.Request) -> bool:
        try:
            who = await self.resolve(request.cookies.get(COOKIE, ""), self.hints(request))
        except RedisError:
            return False
        return who is not None and who.status != "gone"

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
        """The counters: for a logged-in browser (a live token cookie) on the public port; on the
        admin port (:func:`create_admin_app`) for anyone who reaches it."""
        if request.app.get("public", True) and not await self.logged_in(request):
            return web.json_response({"error": "not logged in"}, status=401)
        return web.json_response(
            {
                "sockets": len(self.sockets),
                "tasks": len(asyncio.all_tasks()),
                "connections": self.guard.connections,
                "counters": dict(self.counters) | dict(self.guard.counters),
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

    def _set_cookie(
        self, request: web.Request, resp: web.Response, token: str, ttl: float, name: str = COOKIE
    ) -> None:
        resp.set_cookie(
            name,
            token,
            max_age=int(ttl) if ttl else None,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.cfg.secure_cookie or request.secure,
        )

    def cross_site(self, request: web.Request) -> str:
        """Why a state-changing POST is refused as possibly cross-site ('' = it is not).

        A browser sends ``Origin`` with every cross-site POST: one that names another site (or
        ``null``) is refused. Without ``Origin`` (curl, scripts) the request is let through: the
        login also demands ``Content-Type: application/json``, which no cross-site form can send
        and a cross-site ``fetch`` can only send after a CORS preflight this gateway never grants."""
        if "Origin" in request.headers and not self.origin_ok(request):
            return "origin"
        return ""

    async def login(self, request: web.Request) -> web.Response:
        if self.cross_site(request) or request.content_type != "application/json":
            self.counters["login_cross_site"] += 1
            log.warning(
                "login refused: Origin %r, Content-Type %r (host %r)",
                request.headers.get("Origin"),
                request.content_type,
                request.host,
            )
            return web.json_response(
                {"error": "a login must be a same-origin JSON request"},
                status=415 if not self.cross_site(request) else 403,
            )
        try:
            async with asyncio.timeout(self.cfg.body_timeout or None):
                raw = await request.read()
        except TimeoutError:
            self.counters["body_timeouts"] += 1
            return web.json_response({"error": "the request body was not sent in time"}, status=408)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "the login request is too big"}, status=413)
        try:
            body = json.loads(raw)
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
            reply = await self.relay(loginflow.login_request(user, password))
        except (RedisError, TimeoutError) as exc:
            log.warning("login %s: %s", user, exc)
            self.counters["login_unreachable"] += 1
            return web.json_response({"error": UNREACHABLE}, status=503)
        except BadMessage as exc:
            log.warning("login %s: unreadable reply: %s", user, exc)
            return web.json_response({"error": UNREACHABLE}, status=503)
        refused = loginflow.refusal(reply)
        if refused:
            self.counters[f"login_{refused}"] += 1
            return web.json_response({"error": LOGIN_ERRORS.get(refused, reply.error)}, status=401)
        self.counters["login_ok"] += 1
        log.info("login %s: %s %s", user, reply.status, reply.sid)
        resp = web.json_response(
            {"user": user, "status": reply.status, "position": reply.position, "sid": reply.sid}
        )
        self._set_cookie(request, resp, reply.token, settings.token_ttl)
        if reply.sid:
            self._set_cookie(request, resp, reply.sid, settings.token_ttl, SID_COOKIE)
        else:
            resp.del_cookie(SID_COOKIE, path="/")
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        if self.cross_site(request):
            return web.json_response({"error": "a logout must be a same-origin request"}, status=403)
        token = request.cookies.get(COOKIE, "")
        resp = web.json_response({})
        resp.del_cookie(COOKIE, path="/")
        resp.del_cookie(SID_COOKIE, path="/")
        if token and len(token) <= 128:
            try:
                await self.relay(loginflow.logout_request(token))
                self.counters["logout"] += 1
            except (RedisError, TimeoutError, BadMessage) as exc:
                log.warning("logout: %s", exc)
                return web.json_response({"error": UNREACHABLE}, status=503)
        return resp

    async def session(self, request: web.Request) -> web.Response:
        try:
            who = await self.resolve(request.cookies.get(COOKIE, ""), self.hints(request))
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
        ws = web.WebSocketResponse(
            max_msg_size=max(self.cfg.max_message, CLIP_MESSAGE),  # bigger: clipboard only (socket.py)
            heartbeat=self.cfg.ws_ping or None,
            timeout=self.cfg.close_timeout,
            compress=False,
        )
        await ws.prepare(request)
        self.sockets.add(ws)
        self.counters["sockets_opened"] += 1
        try:
            await Socket(self, ws, request.cookies.get(COOKIE, ""), self.hints(request)).run()
        except (ConnectionResetError, RedisError) as exc:
            log.info("ws: ended: %s", exc)
        finally:
            self.sockets.discard(ws)
            if not ws.closed:
                await ws.close()
        return ws


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
    app = web.Application(middlewares=[head_clock, security_headers], client_max_size=4096)
    app["gateway"] = gw
    app.router.add_get("/", gw.index)
    app.router.add_get("/healthz", gw.healthz)
    app.router.add_get("/stats", gw.stats)
    app.router.add_post("/login", gw.login)
    app.router.add_post("/logout", gw.logout)
    app.router.add_get("/session", gw.session)
    app.router.add_get("/ws", gw.ws)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    files.add_routes(app, gw)  # /files/upload, /files/download, /files/list (client/web/files.py)

    async def on_shutdown(app: web.Application) -> None:
        for ws in list(gw.sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")

    async def on_startup(app: web.Application) -> None:
        app["trim"] = asyncio.ensure_future(gw.trim_pool())

    async def on_cleanup(app: web.Application) -> None:
        if "trim" in app:
            app["trim"].cancel()
        await gw.r.aclose()

    app.on_startup.append(on_startup)

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def create_admin_app(gw: Gateway) -> web.Application:
    """The admin port's app: ``/stats`` and ``/healthz`` without a login (bind it to a private
    address: ``--admin-addr``, default 127.0.0.1)."""
    app = web.Application(client_max_size=1024)
    app["gateway"], app["public"] = gw, False
    app.router.add_get("/stats", gw.stats)
    app.router.add_get("/healthz", gw.healthz)
    return app


def serve(
    cfg: Config,
    host: str,
    port: int,
    metrics_port: int = 0,
    metrics_addr: str = "0.0.0.0",
    admin_port: int = 0,
    admin_addr: str = "127.0.0.1",
) -> None:
    """Run the gateway until SIGINT/SIGTERM (and its Prometheus metrics on ``metrics_port``, its
    admin endpoints on ``admin_port``; 0 = off)."""
    from cloudq.client.web.metrics import gateway_registry
    from cloudq.metrics import serve as serve_metrics

    log.info("gateway on http://%s:%d (session rights: %s)", host, port, cfg.session_rights)
    app = create_app(cfg)
    serve_metrics(metrics_port, gateway_registry(app["gateway"]), metrics_addr)
    asyncio.run(_serve(app, host, port, admin_port, admin_addr))


async def _serve(app: web.Application, host: str, port: int, admin_port: int, admin_addr: str) -> None:
    gw: Gateway = app["gateway"]
    access = logging.getLogger("aiohttp.access")
    runner = GuardedRunner(
        app,
        gw.guard,
        shutdown_timeout=2.0,
        access_log=access if access.isEnabledFor(logging.DEBUG) else None,  # -vv logs every request
    )
    await runner.setup()
    runners = [runner]
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        if admin_port:
            admin = web.AppRunner(create_admin_app(gw), access_log=None)
            await admin.setup()
            runners.insert(0, admin)
            await web.TCPSite(admin, admin_addr, admin_port, reuse_address=True).start()
            log.info("gateway admin (/stats, /healthz) on http://%s:%d", admin_addr, admin_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for r in runners:
            await r.cleanup()
