"""Abuse of the browser gateway (issue 20, items 7 and 8), through real processes: `cloudq gateway`
as its ACL role user, with central, two `paint` nodes and a worker, against the suite's Valkey.

One deployment serves the whole module (module-scoped: pytest tears it down before another
module's test runs on this worker, so their ``r`` fixture never flushes it under us; the gateway's
and the login user's ACLs allow no ``SELECT``, so it cannot have a database of its own). The
attack clients are raw sockets
(:mod:`cloudq.bench.gateway`, what ``cloudq bench gateway`` runs), so every byte sent is the
test's. The gateway runs with short clocks: a 1 s request-head timeout, a cap of 8 connections
per address, an admin port for the counters.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from helpers import Procs, start_pool, wait_for

from cloudq.bench.gateway import ATTACKS, RawWS, census, early_close, http_json, login, open_ws
from cloudq.embedded import free_port
from cloudq.keys import Keys

PREFIX = "cqt:"
CAP = 8
HEAD_TIMEOUT = 0.5


@dataclass
class Rig:
    r: redis.Redis
    keys: Keys
    port: int
    admin_port: int
    gateway_url: str  # the gateway role's Redis URL

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_base(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stats(self) -> dict:
        status, body, _ = http_json(self.admin_base + "/stats", timeout=5)
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def session_conns(self, sid: str) -> int:
        return sum(1 for c in self.r.client_list() if c.get("user") == f"cloudq-s-{sid}")


@pytest.fixture(scope="module")
def rig(role_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    if "gateway" not in role_urls:
        pytest.skip("needs the embedded server with cloudq's ACL users (not CLOUDQ_TEST_REDIS_URL)")
    urls = role_urls
    r = redis.Redis.from_url(urls["admin"])
    r.flushdb()
    keys = Keys(PREFIX)
    procs = Procs(urls["admin"], PREFIX, str(tmp_path_factory.mktemp("abuse-gw")), {
        "central": urls["central"], "node": urls["node"], "worker": urls["worker"], "gateway": urls["gateway"],
    })  # fmt: skip
    try:
        start_pool(r, keys, procs, nodes=2, users=("alice", "bob", "carol"), idle_timeout=0, grace=60)
        port, admin_port = free_port(), free_port()
        procs.start(
            "gateway", "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port),
            "--max-per-address", str(CAP), "--header-timeout", str(HEAD_TIMEOUT), "--body-timeout", "1",
        )  # fmt: skip
        rig = Rig(r, keys, port, admin_port, urls["gateway"])
        wait_for(lambda: _up(rig.admin_base + "/healthz"), 20, what="the gateway answering")
        yield rig
    finally:
        procs.stop_all()
        r.flushdb()
        r.close()


def _up(url: str) -> bool:
    try:
        return http_json(url, timeout=1)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def alice(rig: Rig) -> tuple[str, str]:
    """alice's cookies and session id, attached once (her session is active)."""
    cookie = login(rig.base, "alice", "pw")
    sid = dict(c.split("=", 1) for c in cookie.split("; "))["cloudq_sid"]

    async def attach() -> None:
        ws = await open_ws("127.0.0.1", rig.port, cookie)
        assert ws.status == 101
        await ws.wait_text("hello", 15)
        ws.reset()

    asyncio.run(attach())
    return cookie, sid


@pytest.mark.parametrize("kind", ATTACKS)
def test_early_close_leaves_no_socket_task_heartbeat_or_redis_connection(
    rig: Rig, alice: tuple[str, str], kind: str
) -> None:
    cookie, sid = alice
    wait_for(lambda: rig.stats()["sockets"] == 0 and rig.session_conns(sid) == 0, 5, what="a quiet gateway")
    base = census(rig.admin_base, rig.r)

    async def attack() -> None:
        await asyncio.gather(*(early_close("127.0.0.1", rig.port, cookie, kind) for _ in range(5)))

    asyncio.run(attack())
    t0 = time.monotonic()
    wait_for(
        lambda: census(rig.admin_base, rig.r).at_baseline(base), 3, what=f"the gateway back after {kind}"
    )
    took = time.monotonic() - t0
    assert rig.session_conns(sid) == 0
    # nothing beats the session's heartbeat for a socket that is gone
    beats = rig.stats()["counters"].get("heartbeats", 0)
    time.sleep(0.3)  # the heartbeat clock is 0.2 s
    assert rig.stats()["counters"].get("heartbeats", 0) == beats
    assert took < 1.5, f"{took:.2f} s to release the sockets of {kind}"


def test_other_user_logs_in_and_gets_frames_after_the_attacks(rig: Rig, alice: tuple[str, str]) -> None:
    async def attack_then_watch() -> float:
        await asyncio.gather(*(early_close("127.0.0.1", rig.port, alice[0], k) for k in ATTACKS))
        t0 = time.monotonic()
        cookie = await asyncio.to_thread(login, rig.base, "bob", "pw")
        ws = await open_ws("127.0.0.1", rig.port, cookie)
        try:
            assert ws.status == 101
            await ws.wait_text("hello", 15)
            await _first_video(ws)
        finally:
            ws.reset()
        return time.monotonic() - t0

    assert asyncio.run(attack_then_watch()) < 10


async def _first_video(ws: RawWS) -> None:
    from cloudq.bench.gateway import read_frame

    async with asyncio.timeout(10):
        while (await read_frame(ws.reader))[0] != 0x2:
            pass


def test_half_sent_request_is_closed_after_the_header_timeout(rig: Rig) -> None:
    with socket.create_connection(("127.0.0.1", rig.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        t0 = time.monotonic()
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        took = time.monotonic() - t0
    assert got.startswith(b"HTTP/1.1 408"), got[:80]
    assert HEAD_TIMEOUT - 0.2 < took < HEAD_TIMEOUT + 1.5


def test_connections_over_the_per_address_cap_get_429(rig: Rig) -> None:
    held = [socket.create_connection(("127.0.0.1", rig.port), timeout=5) for _ in range(CAP)]
    try:
        wait_for(lambda: rig.stats()["connections"] >= CAP, 1, what="the connections counted")
        with socket.create_connection(("127.0.0.1", rig.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            got = s.recv(4096)
        assert got.startswith(b"HTTP/1.1 429"), got[:80]
        assert b"Retry-After" in got
    finally:
        for s in held:
            s.close()
    wait_for(lambda: rig.stats()["connections"] == 0, 3, what="the held connections released")
    assert http_json(rig.base + "/healthz", timeout=5)[0] == 200


def test_cross_site_text_plain_login_is_refused_and_same_origin_json_works(rig: Rig) -> None:
    form = b'{"user": "carol", "password": "pw"}'  # what a cross-site text/plain form can post
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    status, _, hdrs = http_json(rig.base + "/login", form, evil)
    assert status == 403 and not hdrs.get("Set-Cookie")
    # the same body without Origin, or JSON from another site: refused too
    assert http_json(rig.base + "/login", form, {"Content-Type": "text/plain"})[0] == 415
    assert http_json(rig.base + "/login", form, {**evil, "Content-Type": "application/json"})[0] == 403
    assert http_json(rig.base + "/login", form, {**evil, "Origin": "null"})[0] == 403
    # a same-origin JSON login works (carol has no free node: queued)
    assert "cloudq_token=" in login(rig.base, "carol", "pw")


def test_stats_need_a_login_on_the_public_port(rig: Rig, alice: tuple[str, str]) -> None:
    status, body, _ = http_json(rig.base + "/stats")
    assert status == 401 and "sockets" not in body
    status, body, _ = http_json(rig.base + "/stats", headers={"Cookie": "cloudq_token=forged"})
    assert status == 401
    status, body, _ = http_json(rig.base + "/stats", headers={"Cookie": alice[0]})
    assert status == 200 and "sockets" in body
    assert http_json(rig.admin_base + "/stats")[0] == 200


def test_gateway_role_cannot_read_a_password_hash(rig: Rig) -> None:
    assert rig.r.hget(rig.keys.user("alice"), "hash", )  # fmt: skip
    gw = redis.Redis.from_url(rig.gateway_url)
    try:
        for read in (
            lambda: gw.hget(rig.keys.user("alice"), "hash"),
            lambda: gw.hmget(rig.keys.user("alice"), "hash", "session"),
            lambda: gw.hgetall(rig.keys.user("alice")),
            lambda: gw.eval("return redis.call('HGET', KEYS[1], 'hash')", 1, rig.keys.user("alice")),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                read()
    finally:
        gw.close()
