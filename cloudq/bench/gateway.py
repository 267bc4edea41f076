"""``cloudq bench gateway``: what sockets closed early leave behind in the browser gateway.

A real deployment on one machine (embedded Valkey with cloudq's ACL users, ``cloudq central``,
two ``paint`` nodes, a worker, ``cloudq gateway`` as its role user with an admin port), one user
logged in through ``POST /login``. Then ``--tries`` WebSockets of that user's cookie are ended
early, ``--concurrency`` at a time, in the four ways an attacker (or a flaky network) ends one:

- ``oversized``: a text frame over the gateway's message limit right after the upgrade;
- ``bad_before_hello``: a message that is not JSON before the gateway said ``hello``;
- ``close_after_hello``: a clean close frame as soon as ``hello`` arrives;
- ``reset``: a TCP reset (``SO_LINGER`` 0) once ``hello`` arrived.

None of them answers the gateway's close frame. Measured: the gateway's live sockets, its live
asyncio tasks (``/stats`` on the admin port) and the Redis connections of the gateway's and the
session's ACL users (``CLIENT LIST``) before, at the end of the attack, and how long until all
three are back to the baseline; and whether the session's heartbeat is still being beaten by a
socket that is gone.

The attack clients (:func:`early_close`, :func:`open_ws`) are raw sockets (no client library
hides what is sent) and are also what ``tests/test_abuse_gateway.py`` uses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

ATTACKS = ("oversized", "bad_before_hello", "close_after_hello", "reset")


# -- a raw WebSocket client ------------------------------------------------------------------------
def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (RFC 6455), FIN set."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame (unmasked): ``(opcode, payload)``."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


@dataclass
class RawWS:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int

    async def send_text(self, text: str | bytes) -> None:
        self.writer.write(ws_frame(0x1, text.encode() if isinstance(text, str) else text))
        await self.writer.drain()

    async def wait_text(self, t: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first JSON text message of type ``t`` (binary video and other messages skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                op, data = await read_frame(self.reader)
                if op == 0x8:
                    raise ConnectionError(
                        f"closed by the gateway before {t!r}: {data[:2].hex()} {data[2:]!r}"
                    )
                if op == 0x1:
                    msg = json.loads(data)
                    if msg.get("t") == t:
                        return msg  # type: ignore[no-any-return]

    def reset(self) -> None:
        """End the TCP connection with a reset (no FIN, no close frame)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def drop(self) -> None:
        """End the TCP connection (FIN) without answering any close frame."""
        self.writer.transport.close()


async def open_ws(host: str, port: int, cookie: str, origin: str | None = None) -> RawWS:
    """A WebSocket upgrade of ``GET /ws`` with ``cookie`` (a ``Cookie`` header's value, as
    :func:`login` returns it); status 101 or the refusal's."""
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    origin = origin if origin is not None else f"http://{host}:{port}"
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n"
            f"Cookie: {cookie}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return RawWS(reader, writer, int(head.split(b" ", 2)[1]))


async def early_close(host: str, port: int, cookie: str, kind: str, max_message: int = 4096) -> None:
    """One WebSocket ended early in the way ``kind`` names (see :data:`ATTACKS`)."""
    ws = await open_ws(host, port, cookie)
    try:
        if ws.status != 101:
            raise ConnectionError(f"upgrade refused: {ws.status}")
        if kind == "oversized":
            await ws.send_text(b"x" * (max_message * 4))
            ws.drop()
        elif kind == "bad_before_hello":
            await ws.send_text("not json")
            ws.drop()
        elif kind == "close_after_hello":
            await ws.wait_text("hello")
            ws.writer.write(ws_frame(0x8, struct.pack(">H", 1000)))
            await ws.writer.drain()
            ws.drop()
        elif kind == "reset":
            await ws.wait_text("hello")
            ws.reset()
        else:
            raise ValueError(f"unknown attack {kind!r}")
    except BaseException:
        ws.reset()
        raise


# -- the gateway's HTTP side --------------------------------------------------------------------------
def http_json(
    url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 15
) -> tuple[int, Any, Any]:
    """``(status, JSON body or text, headers)`` of a GET (or a POST of ``body``)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, hdrs = resp.read(), resp.status, resp.headers
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read(), exc.code, exc.headers
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, raw.decode(errors="replace"), hdrs


def login(base: str, user: str, password: str) -> str:
    """Log in through the gateway as a same-origin page does; the cookies it set, as a
    ``Cookie`` header's value (the token, and the session id when a node was assigned)."""
    status, body, hdrs = http_json(
        base + "/login",
        {"user": user, "password": password},
        {"Content-Type": "application/json", "Origin": base},
    )
    if status != 200:
        raise RuntimeError(f"login {user}: {status} {body}")
    return cookies(hdrs)


def cookies(headers: Any) -> str:
    """The ``Set-Cookie`` headers of a response as one ``Cookie`` header's value."""
    got = headers.get_all("Set-Cookie") if hasattr(headers, "get_all") else [headers.get("Set-Cookie", "")]
    return "; ".join(c.split(";", 1)[0] for c in got or [] if c and "=" in c.split(";", 1)[0])


@dataclass
class Census:
    """What the gateway holds at one moment."""

    sockets: int
    tasks: int
    redis: int  # connections of the session users (one per attached socket)
    shared: int  # connections of the gateway's own user (its shared pool)
    heartbeats: int

    def at_baseline(self, base: Census) -> bool:
        """Sockets, tasks and session connections back to ``base``; the shared pool back to what
        it keeps idle (:data:`cloudq.client.web.http.POOL_IDLE`) or ``base``'s, if more."""
        from cloudq.client.web.http import POOL_IDLE

        return (
            self.sockets <= base.sockets
            and self.tasks <= base.tasks
            and self.redis <= base.redis
            and self.shared <= max(base.shared, POOL_IDLE)
        )


def census(admin_base: str, admin: redis.Redis) -> Census:
    status, st, _ = http_json(admin_base + "/stats", timeout=5)
    if status != 200:
        raise RuntimeError(f"/stats: {status} {st}")
    users = [c.get("user", "") for c in admin.client_list()]
    return Census(
        st["sockets"],
        st.get("tasks", -1),
        sum(1 for u in users if u.startswith("cloudq-s-")),
        sum(1 for u in users if u == "cloudq-gateway"),
        st["counters"].get("heartbeats", 0),
    )


# -- the benchmark ------------------------------------------------------------------------------
@dataclass
class Rig:
    """A deployment with a gateway, for the benchmark."""

    prefix: str = "cqg:"
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="cloudq-bench-gw-"))

    def start(self) -> Rig:
        from cloudq.central.auth import Users
        from cloudq.embedded import EmbeddedServer, free_port
        from cloudq.keys import Keys
        from cloudq.local.cluster import setup_acl
        from cloudq.procs import ProcessGroup
        from cloudq.settings import Settings

        self.server = EmbeddedServer().start()
        self.keys = Keys(self.prefix)
        try:
            urls = setup_acl(self.server.url, self.keys)
            self.admin = redis.Redis.from_url(urls["admin"])
            clocks = Settings(heartbeat_interval=0.5, heartbeat_ttl=3, grace=60, idle_timeout=0)
            clocks.publish(self.admin, self.keys)
            self.group = ProcessGroup(
                urls["admin"],
                self.prefix,
                self.workdir,
                urls={r: urls[r] for r in ("central", "node", "worker", "gateway")},
                env={
                    "CLOUDQ_STORE": os.path.join(self.workdir, "store"),
                    "CLOUDQ_WORKSPACE": os.path.join(self.workdir, "ws"),
                    "CLOUDQ_BCRYPT_COST": "4",
                },
            )
            self.group.start(
                "central", "--heartbeat-interval", "0.5", "--heartbeat-ttl", "3", "--idle-timeout", "0"
            )
            for n in ("n1", "n2"):  # one for the attacked session, one for another user
                self.group.start("node", "--id", n, "--host", "h1", "--app", "paint")
            self.group.start("worker", "--host", "h1")
            self.port, self.admin_port = free_port(), free_port()
            self.group.start(
                "gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--admin-port",
                str(self.admin_port),
                "--max-per-address",
                "0",
            )
            self.base = f"http://127.0.0.1:{self.port}"
            self.admin_base = f"http://127.0.0.1:{self.admin_port}"
            Users(self.admin, self.keys).add("bench", "pw", cost=4)
            _wait(lambda: self.admin.zcard(self.keys.pool) == 2, 30, "the nodes registered")
            _wait(self._healthy, 30, "the gateway answering")
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            return http_json(self.admin_base + "/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.stop_all()
        self.server.stop()


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def _attack(host: str, port: int, cookie: str, kinds: list[str], concurrency: int) -> dict[str, int]:
    sem = asyncio.Semaphore(concurrency)
    errors: dict[str, int] = {}

    async def one(kind: str) -> None:
        async with sem:
            try:
                await early_close(host, port, cookie, kind)
            except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    await asyncio.gather(*(one(k) for k in kinds))
    return errors


def settle(rig_admin_base: str, admin: redis.Redis, base: Census, timeout: float) -> tuple[float, Census]:
    """Seconds until the gateway is back to ``base`` (inf if not within ``timeout``), and the census then."""
    t0 = time.monotonic()
    while True:
        now = census(rig_admin_base, admin)
        if now.at_baseline(base):
            return time.monotonic() - t0, now
        if time.monotonic() - t0 > timeout:
            return float("inf"), now
        time.sleep(0.05)


def run(tries: int = 1000, concurrency: int = 50, settle_timeout: float = 30.0) -> dict[str, Any]:
    rig = Rig().start()
    try:
        cookie = login(rig.base, "bench", "pw")
        # one socket attached and left, so the session is active and the session user exists
        asyncio.run(early_close("127.0.0.1", rig.port, cookie, "close_after_hello"))
        time.sleep(1.5)
        base = census(rig.admin_base, rig.admin)
        rows = []
        for kind in ATTACKS:
            kinds = [kind] * (tries // len(ATTACKS))
            t0 = time.monotonic()
            errors = asyncio.run(_attack("127.0.0.1", rig.port, cookie, kinds, concurrency))
            took = time.monotonic() - t0
            peak = census(rig.admin_base, rig.admin)
            back, after = settle(rig.admin_base, rig.admin, base, settle_timeout)
            time.sleep(1.0)  # is anything still beating the session's heartbeat?
            beats = census(rig.admin_base, rig.admin).heartbeats - after.heartbeats
            rows.append(
                {
                    "attack": kind,
                    "tries": len(kinds),
                    "seconds": round(took, 2),
                    "errors": errors,
                    "end": {k: v for k, v in peak.__dict__.items() if k != "heartbeats"},
                    "after": {k: v for k, v in after.__dict__.items() if k != "heartbeats"},
                    "back_s": back,
                    "beats_after": beats,
                }
            )
        # another user is unaffected: logs in and gets a hello over the same gateway
        t0 = time.monotonic()
        other = login(rig.base, "bench2", "pw") if _add_user(rig, "bench2") else ""
        hello = asyncio.run(_hello("127.0.0.1", rig.port, other))
        other_s = time.monotonic() - t0
        result = {
            "baseline": base.__dict__,
            "rows": rows,
            "other_user_hello_s": round(other_s, 2),
            "other_user_hello": hello,
            "concurrency": concurrency,
            "settle_timeout": settle_timeout,
        }
        result["table"] = table(result)
        return result
    finally:
        rig.stop()


def _add_user(rig: Rig, name: str) -> bool:
    from cloudq.central.auth import Users

    Users(rig.admin, rig.keys).add(name, "pw", cost=4)
    return True


async def _hello(host: str, port: int, cookie: str) -> bool:
    ws = await open_ws(host, port, cookie)
    try:
        return ws.status == 101 and bool(await ws.wait_text("hello", 20))
    finally:
        ws.reset()


def table(result: dict[str, Any]) -> str:
    b = result["baseline"]
    lines = [
        f"baseline: {b['sockets']} sockets, {b['tasks']} asyncio tasks, {b['redis']} session-user and "
        f"{b['shared']} gateway-user Redis connections; {result['concurrency']} attacks at a time",
        "",
        "| early close | tries | took s | at the end: sockets / tasks / session conns / gateway conns "
        "| back to baseline in | after: sockets / tasks / session / gateway | heartbeats after |",
        "|---|---:|---:|---|---:|---|---:|",
    ]
    for r in result["rows"]:
        e, a = r["end"], r["after"]
        back = (
            f"not within {result['settle_timeout']:g} s"
            if r["back_s"] == float("inf")
            else f"{r['back_s']:.2f} s"
        )
        lines.append(
            f"| {r['attack']} | {r['tries']} | {r['seconds']} "
            f"| {e['sockets']} / {e['tasks']} / {e['redis']} / {e['shared']} | {back} "
            f"| {a['sockets']} / {a['tasks']} / {a['redis']} / {a['shared']} | {r['beats_after']} |"
        )
    lines += [
        "",
        f"another user after the attacks: login + hello in {result['other_user_hello_s']} s "
        f"({'ok' if result['other_user_hello'] else 'FAILED'})",
    ]
    return "\n".join(lines)


def write_markdown(result: dict[str, Any], path: str) -> None:
    from cloudq.bench.report import machine, write_section

    body = (
        "`cloudq bench gateway` (rerun: `cloudq bench gateway --write BENCHMARKS.md`): "
        "WebSockets of one logged-in user ended early in four ways against a real `cloudq gateway` "
        "(embedded Valkey with ACLs, central, two `paint` nodes), then the gateway's live sockets, asyncio "
        "tasks and the Redis connections of the gateway's and the session's ACL users until they are "
        'back to the baseline (target: 2 s). "heartbeats after": heartbeats the gateway beat in '
        "the second after that (0: no socket that is gone still beats). Before the fix (same "
        "harness, 200 tries, 20 at a time) no row came back: 133 sockets and 229 Redis connections "
        "were still live after 5 s, each beating its session's heartbeat.\n\n"
        f"Machine: {machine()}.\n\n" + result["table"]
    )
    write_section("Gateway: sockets closed early", body, path)
