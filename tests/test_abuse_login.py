"""Red-team cases against the login path (issue: abuse), as an anonymous party holding only the
public login user: what it writes cannot stop, slow or outlive other people's logins."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
import redis
from helpers import publish, wait_for

from cloudq.central.auth import Users
from cloudq.central.server import Central
from cloudq.client.launcher import Launcher
from cloudq.keys import Keys
from cloudq.loginflow import login_request, post
from cloudq.settings import Settings
from cloudq.state import StateMachine

MAX_ID = "18446744073709551615-18446744073709551615"


@pytest.fixture
def anon(role_urls: dict[str, str]) -> Iterator[redis.Redis]:
    if "login" not in role_urls:
        pytest.skip("the test server has no ACL users (CLOUDQ_TEST_REDIS_URL)")
    c = redis.Redis.from_url(role_urls["login"])
    try:
        yield c
    finally:
        c.close()


def start_central(r: redis.Redis, keys: Keys, cost: int) -> Central:
    # node_ttl=0: the registered node is never declared offline (nothing refreshes its liveness)
    c = Central(r, keys, Settings(lockout_limit=0, node_ttl=0), notifications=False, bcrypt_cost=cost)
    c.start()
    StateMachine(r, keys).register_node("n1", "h", "paint", "i1")
    Users(r, keys).add("alice", "pw", cost=cost)
    return c


def test_an_anonymous_max_id_entry_or_oversized_garbage_cannot_stop_logins_or_keep_memory(
    r: redis.Redis, keys: Keys, anon: redis.Redis
) -> None:
    publish(r, keys, node_ttl=0)
    central = start_central(r, keys, cost=4)
    try:
        base = r.info("memory")["used_memory"]
        with pytest.raises(redis.exceptions.NoPermissionError):
            anon.xadd(keys.requests, {"m": b"x"}, id=MAX_ID)  # used to exhaust the stream's ids
        junk = [secrets.token_bytes(2 << 20) for _ in range(3)] + [b"\xc1 not msgpack"]
        anon.rpush(keys.requests, *junk)
        t0 = time.monotonic()
        ticket = Launcher(anon, keys).login("alice", "pw", wait=5)
        assert ticket.status == "assigned" and time.monotonic() - t0 < 5
        assert central.counters["bad_request"] == len(junk)
        assert r.llen(keys.requests) == 0 and r.llen(keys.requests_taken(central.name)) == 0
        # the entries are gone at once; the connections' buffers shrink on the server's cron
        wait_for(lambda: r.info("memory")["used_memory"] - base < 1 << 20, 10, what="memory back")
    finally:
        central.shutdown()


def test_a_flood_of_logins_for_unknown_names_does_not_delay_a_real_users_login(
    r: redis.Redis, keys: Keys, anon: redis.Redis
) -> None:
    """A name that does not exist costs no bcrypt (its answer is only held back as long as a
    check takes), so 100 of them queued ahead of a real login cost it nothing. At cost 10 a
    check takes ~50 ms here: checked one after another they held the real login back ~5 s."""
    publish(r, keys, node_ttl=0)
    central = start_central(r, keys, cost=10)
    try:
        flood = [login_request(f"nobody-{secrets.token_hex(4)}", "guess") for _ in range(100)]
        anon.rpush(keys.requests, *(req.pack() for req in flood))
        t0 = time.monotonic()
        ticket = Launcher(anon, keys).login("alice", "pw", wait=5)
        took = time.monotonic() - t0
        assert ticket.status == "assigned" and took < 2.0, f"the real login took {took:.2f} s"
        for req in flood:  # and every flooding request got its (refusing) answer all the same
            got = r.blpop([keys.reply(req.id)], timeout=5)
            assert got is not None and b"invalid" in got[1]
        assert post(keys, flood[0])[0] == keys.requests
    finally:
        central.shutdown()
