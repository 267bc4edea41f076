"""The login relay and queue wait both clients share (:mod:`cloudq.loginflow`: the launcher and the
web gateway): its decisions, then a queued ``cloudq connect`` and a queued browser socket that lose
their place without a notification, through real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from typing import Any

import msgpack
import pytest
import redis
from helpers import Procs, start_pool, wait_for

from cloudq import loginflow
from cloudq.embedded import free_port
from cloudq.keys import Keys
from cloudq.loginflow import ASSIGNED, DROPPED, DROPPED_REASON, LEFT, WAIT, QueueStep, QueueWait
from cloudq.messages import REQUEST_ID, BadMessage, Reply, unpack_request
from cloudq.sessionend import close_message
from cloudq.settings import Settings


def test_requests_carry_unguessable_ids_and_pass_the_central_servers_checks(keys: Keys) -> None:
    login, logout = loginflow.login_request("bob", "pw"), loginflow.logout_request("tok")
    resume = loginflow.resume_request("tok", "s12")
    assert len({login.id, logout.id, resume.id, loginflow.login_request("bob", "pw").id}) == 4
    for req in (login, logout, resume):
        assert len(req.id) == 32 and REQUEST_ID.match(req.id)
        key, payload = loginflow.post(keys, req)
        assert key == keys.requests and unpack_request(payload) == req


def test_a_resume_names_a_session_id_central_could_have_made() -> None:
    bad = msgpack.packb({"op": "resume", "id": "a" * 32, "token": "t", "sid": "session:{s1}"})
    with pytest.raises(BadMessage, match="bad session id"):
        unpack_request(bad)


def test_a_reply_is_waited_for_in_short_blocks_until_the_timeout(r: redis.Redis, keys: Keys) -> None:
    t0 = time.monotonic()
    blocks = []
    for block in loginflow.reply_blocks(1.3):
        blocks.append(block)
        assert r.blpop([keys.reply("nobody-answers")], timeout=block) is None
    assert blocks[0] == loginflow.REPLY_BLOCK and all(0 < b <= loginflow.REPLY_BLOCK for b in blocks)
    assert 1.3 <= time.monotonic() - t0 < 2.5


def test_a_refusal_is_one_of_the_known_kinds_or_error() -> None:
    assert loginflow.refusal(Reply(ok=True, status="queued")) is None
    for status in ("invalid", "locked", "disabled"):
        assert loginflow.refusal(Reply(ok=False, status=status)) == status
    assert loginflow.refusal(Reply(ok=False, status="something new")) == "error"
    assert loginflow.refusal(Reply(ok=False)) == "error"


def test_the_queue_wait_takes_its_clocks_from_the_published_settings() -> None:
    q = QueueWait(Settings(heartbeat_interval=0.2, heartbeat_ttl=0.8, grace=2.0), position=3, wait=5.0)
    assert (q.interval, q.beat_ms, q.budget, q.position) == (0.2, 800, 2.8, 3)
    assert q.waiting()
    off = QueueWait(Settings(heartbeat_interval=0, heartbeat_ttl=0, grace=0))
    assert (off.interval, off.beat_ms, off.budget) == (1.0, 3000, 123.0)
    assert not QueueWait(Settings(), wait=0).waiting()


def test_what_a_queue_poll_means() -> None:
    q = QueueWait(Settings(), position=2)
    assert not q.moved(1) and not q.moved(None)  # LPOS is 0-based: still second; or gone
    assert q.moved(0) and q.position == 1
    assert q.after_wait(0, (b"cqt:notify:x", b"s7")) == QueueStep(ASSIGNED, sid="s7")
    assert q.after_wait(None, (b"cqt:notify:x", b"s7")) == QueueStep(ASSIGNED, sid="s7")
    assert q.after_wait(0, None) == QueueStep(WAIT)
    assert q.after_wait(None, None) == QueueStep(LEFT)  # out of the queue, nothing for us


def test_what_leaving_the_queue_without_a_notification_means() -> None:
    left = QueueWait.left
    assert left("session", "s3") == QueueStep(ASSIGNED, sid="s3")  # another tab took the notification
    assert left("queued") == QueueStep(WAIT)
    assert left("revoked") == QueueStep(DROPPED, reason="logout")
    assert left("gone", "s1", "taken_over") == QueueStep(DROPPED, reason="taken_over")
    for gone in (left("gone", "", "closed"), left("gone"), left()):  # left(): a queue user may not look
        assert gone == QueueStep(DROPPED, reason=DROPPED_REASON)
    assert close_message(DROPPED_REASON).startswith("dropped from the queue")


def test_redis_errors_are_ridden_out_for_the_budget_and_an_answer_starts_it_again() -> None:
    q = QueueWait(Settings(heartbeat_interval=0.05, heartbeat_ttl=0.1, grace=0.2))
    assert not q.unreachable()  # the first failure starts the clock
    wait_for(q.unreachable, 5, what="the budget spent")
    q.after_wait(0, None)
    assert not q.unreachable()


@pytest.mark.timeout(60)
def test_clients_and_a_browser_that_lose_their_queue_place_without_a_notification_stop_alike(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    """The central server drops a queued user whose beat lapsed (dispatch.lua: off the queue, its
    ticket's ``qtoken`` gone, no notification), then deletes its queue user (the ACL pass). A
    ``cloudq connect`` and a browser's socket must not wait for ever: each stops with the reason
    :class:`QueueWait` gives, in the same words. The central server is stopped meanwhile, so each
    client meets one sign at a time: bob and carol's entries gone (LPOS), dave's queue user gone."""
    import aiohttp

    from cloudq.central.acl import drop_user, queue_acl_user

    pool = start_pool(r, keys, procs, nodes=0, users=("bob", "carol", "dave"))  # no node: all queue
    port = free_port()
    procs.start("gateway", "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    clients = {
        u: procs.start("connect", "--user", u, "--password-stdin", "--headless", stdin=b"pw\n")
        for u in ("bob", "dave")
    }

    def drop(user: str) -> None:
        pipe = r.pipeline(transaction=True)  # what dispatch.lua does to a user it drops
        pipe.lrem(keys.queue, 0, user)
        pipe.hdel(keys.user(user), "qtoken", "qacl")
        pipe.execute()

    def left(user: str) -> bool:
        return "queued: left the queue without a node" in procs.output(clients[user])

    async def browser() -> tuple[list[dict[str, Any]], Any]:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            login = {"user": "carol", "password": "pw"}
            async with s.post(url + "/login", json=login, headers={"Origin": url}) as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "queued"
            async with s.ws_connect(url + "/ws", headers={"Origin": url}) as ws:
                got = [await asyncio.wait_for(ws.receive_json(), 10)]
                assert got[0] == {"t": "state", "state": "queued", "position": 3}, got
                assert r.exists(keys.queued("carol"))
                os.killpg(pool.central.pid, signal.SIGSTOP)  # no ACL pass, no dispatch from here
                try:
                    drop("bob")
                    drop("carol")
                    assert drop_user(r, queue_acl_user("dave"))
                    while (msg := await asyncio.wait_for(ws.receive(), 10)).type == aiohttp.WSMsgType.TEXT:
                        got.append(json.loads(msg.data))
                    await asyncio.to_thread(
                        wait_for, lambda: left("bob") and left("dave"), 10, what="clients gave up"
                    )
                finally:
                    os.killpg(pool.central.pid, signal.SIGCONT)  # it answers their logouts
                return got, (msg.type, msg.data)  # the close frame the gateway sent

    wait_for(lambda: _listening(port), 20, what="the gateway listening")
    for u in clients:
        wait_for(lambda u=u: r.exists(keys.queued(u)), 20, what=f"{u}'s client keeping its place")
    got, closed = asyncio.run(browser())
    assert closed == (aiohttp.WSMsgType.CLOSE, 4001), closed
    assert (got[-1]["t"], got[-1]["reason"]) == ("close", DROPPED_REASON), got
    for u, p in clients.items():
        assert p.wait(15) == 6, procs.output(p)  # exit 6: what a closed session gives
        out = procs.output(p)
        assert out.strip().splitlines()[-1] == f"cloudq: {close_message(DROPPED_REASON)}", (u, out)
        assert "Traceback" not in out
    # the clients gave their tickets back (logout); the browser keeps its cookie to log in again
    assert sorted(r.get(k) for k in r.scan_iter(keys.token("*"))) == [b"carol"]
    assert r.lrange(keys.queue, 0, -1) == []


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_mouse_move_flood_refreshes_the_activity_key_a_few_times_a_second_not_once_per_event(
    r: redis.Redis, keys: Keys
) -> None:
    """The Python client marks activity on every input event; at 30 mouse moves a second that was
    one SET each, as many commands as the input itself. Now at most one per
    ``Settings.activity_refresh`` (0.25 s), as the gateway does, and the key is still refreshed."""
    from cloudq.client.launcher import Launcher

    def sets() -> int:
        return int(r.info("commandstats").get("cmdstat_set", {}).get("calls", 0))

    launcher = Launcher(r, keys)
    launcher.settings = Settings(idle_timeout=30.0)
    before, t0 = sets(), time.monotonic()
    for _ in range(30):  # one second of mouse moves, as fast as the client sends them
        launcher.mark_activity("s1")
    elapsed = time.monotonic() - t0
    assert 0 < r.pttl(keys.activity("s1")) <= 30_000
    assert sets() - before <= 1 + elapsed / Settings(idle_timeout=30.0).activity_refresh
    time.sleep(0.3)  # past the refresh period (the point: time passing)
    launcher.mark_activity("s1")
    assert sets() - before >= 2, "refreshed again once the period passed"
