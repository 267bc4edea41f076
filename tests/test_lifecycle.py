"""The management method end to end, through real processes: central, nodes, RQ workers."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from conftest import FAST
from helpers import Procs, events, node_state, session_field, start_pool, wait_for

from cloudq.central.auth import token_user
from cloudq.client.kernel import Heartbeat
from cloudq.client.launcher import Launcher, Ticket
from cloudq.keys import Keys
from cloudq.settings import Settings
from cloudq.state import NODE_STATES, SESSION_STATES
from cloudq.wire import InputEvent


def setup_pool(r: redis.Redis, keys: Keys, procs: Procs, nodes: int = 1, **clocks: float):
    p = start_pool(r, keys, procs, nodes=nodes, **clocks)
    return p.central, p.nodes, p.worker


def login(r: redis.Redis, keys: Keys, user: str = "alice") -> tuple[Launcher, Ticket]:
    launcher = Launcher(r, keys)
    return launcher, launcher.login(user, "pw")


_BEATING: list[Heartbeat] = []


@pytest.fixture(autouse=True)
def _stop_heartbeats() -> Iterator[None]:
    """A test's heartbeat threads end with the test, not when the interpreter does."""
    yield
    while _BEATING:
        hb = _BEATING.pop()
        hb.stop.set()
        hb.join(5)


def beating(r: redis.Redis, keys: Keys, t: Ticket) -> Heartbeat:
    hb = Heartbeat(r, keys, t.sid, Settings.load(r, keys))
    hb.start()
    _BEATING.append(hb)
    return hb


def send_input(r: redis.Redis, keys: Keys, sid: str, seq: int = 1) -> None:
    r.xadd(keys.input(sid), InputEvent("key", seq, time.time(), key="a").pack())


def test_login_mounts_and_node_becomes_active(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    setup_pool(r, keys, procs)
    _, t = login(r, keys)
    hb = beating(r, keys, t)
    try:
        wait_for(lambda: node_state(r, keys, "n1") == "active", 15, what="node active")
        assert session_field(r, keys, t.sid) == "active"
    finally:
        hb.stop.set()


def test_idle_session_sleeps_within_ttl_plus_one_second_and_input_wakes_it(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    setup_pool(r, keys, procs, idle_timeout=1.0)
    _, t = login(r, keys)
    hb = beating(r, keys, t)
    try:
        wait_for(lambda: node_state(r, keys, "n1") == "active", 15)
        act_set = time.monotonic()
        r.set(keys.activity(t.sid), "1", px=1000)
        wait_for(lambda: node_state(r, keys, "n1") == "sleeping", 5, what="node sleeping")
        assert time.monotonic() - act_set < 1.0 + 1.0
        assert session_field(r, keys, t.sid) == "sleeping"
        send_input(r, keys, t.sid)
        wait_for(lambda: node_state(r, keys, "n1") == "active", 3, what="node awake")
        assert session_field(r, keys, t.sid) == "active"
        assert r.pttl(keys.activity(t.sid)) > 0  # the idle clock restarted
    finally:
        hb.stop.set()


def test_lost_heartbeat_disconnects_and_relogin_within_grace_gets_same_session_and_node(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    setup_pool(r, keys, procs, nodes=2, grace=30)
    _, t = login(r, keys)
    hb = beating(r, keys, t)
    wait_for(lambda: node_state(r, keys, t.node) == "active", 15)
    hb.stop.set()
    wait_for(lambda: session_field(r, keys, t.sid) == "disconnected", 5, what="disconnected")
    assert node_state(r, keys, t.node) == "sleeping"
    assert r.zscore(keys.deadlines, f"grace|{t.sid}") is not None
    _, t2 = login(r, keys)
    assert (t2.status, t2.sid, t2.node) == ("reconnect", t.sid, t.node)
    assert t2.token != t.token and token_user(r, keys, t.token) is None
    assert r.zcard(keys.pool) == 1  # the other node was not touched
    hb2 = beating(r, keys, t2)
    try:
        send_input(r, keys, t2.sid)
        wait_for(lambda: node_state(r, keys, t.node) == "active", 5)
    finally:
        hb2.stop.set()


def test_grace_lapse_closes_and_next_queued_user_gets_the_node(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    setup_pool(r, keys, procs, grace=1.0)
    _, t = login(r, keys)
    hb = beating(r, keys, t)
    wait_for(lambda: node_state(r, keys, "n1") == "active", 15)
    # bob waits in the queue; his client keeps its place by beating queued:<user>
    bob = Launcher(r, keys)
    got: list[Ticket] = []
    import threading

    th = threading.Thread(target=lambda: got.append(bob.login("bob", "pw", wait=20)))
    th.start()
    wait_for(lambda: r.lrange(keys.queue, 0, -1) == [b"bob"], 5)
    hb.stop.set()
    wait_for(lambda: session_field(r, keys, t.sid) == "closed", 10, what="closed after grace")
    th.join(20)
    assert got and got[0].node == "n1" and got[0].sid != t.sid
    assert session_field(r, keys, t.sid, "close_reason") == "grace"
    hb2 = beating(r, keys, got[0])
    try:
        wait_for(lambda: session_field(r, keys, got[0].sid) == "active", 15)
    finally:
        hb2.stop.set()


def test_logout_closes_at_once(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    setup_pool(r, keys, procs, grace=60, idle_timeout=60)
    launcher, t = login(r, keys)
    hb = beating(r, keys, t)
    wait_for(lambda: node_state(r, keys, "n1") == "active", 15)
    launcher.logout(t.token)
    hb.stop.set()
    wait_for(lambda: node_state(r, keys, "n1") == "free", 5, what="node freed")
    assert session_field(r, keys, t.sid) == "closed"
    reasons = [f[b"reason"] for _, f in r.xrange(keys.events) if f[b"obj"] == b"node:n1"]
    assert b"logout" in reasons  # active -> closing (logout) -> free


def event_times(r: redis.Redis, keys: Keys, sid: str, obj: str, **match: str) -> list[float]:
    """Seconds from session ``sid``'s login to each event about ``obj`` with the fields ``match``."""
    created = float(session_field(r, keys, sid, "created"))
    found = [e for e in events(r, keys, obj) if all(e[k] == v for k, v in match.items())]
    return [float(e["t"]) - created for e in found]


def test_an_idle_session_sleeps_then_closes_idle_close_after_its_last_input(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    setup_pool(r, keys, procs, idle_timeout=0.5, idle_close=1.5)
    _, t = login(r, keys)  # the login is the session's last input
    hb = beating(r, keys, t)  # the client stays: only the idle clocks can end the session
    try:
        wait_for(lambda: session_field(r, keys, t.sid) == "closed", 10, what="idle close")
    finally:
        hb.stop.set()
    assert session_field(r, keys, t.sid, "close_reason") == "idle"
    trans = [(e["from"], e["to"]) for e in events(r, keys, f"session:{t.sid}")]
    assert trans.index(("active", "sleeping")) < trans.index(("sleeping", "closed")), trans
    closing = event_times(r, keys, t.sid, "node:n1", to="closing")
    assert len(closing) == 1 and 1.5 - 0.01 <= closing[0] < 1.5 + 3, closing  # not before idle_close


def test_max_session_warns_then_closes(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    setup_pool(r, keys, procs, idle_timeout=0, max_session=2.0, max_warning=1.0)
    _, t = login(r, keys)
    hb = beating(r, keys, t)
    try:
        wait_for(lambda: session_field(r, keys, t.sid, "warning") == "max_session", 5, what="warning")
        assert session_field(r, keys, t.sid) != "closed"
        wait_for(lambda: session_field(r, keys, t.sid) == "closed", 5, what="max close")
        assert session_field(r, keys, t.sid, "close_reason") == "max_session"
    finally:
        hb.stop.set()
    # the warning max_warning before the end, the close at max_session (times from the login)
    warned = event_times(r, keys, t.sid, f"session:{t.sid}", reason="warning: max session length soon")
    closing = event_times(r, keys, t.sid, "node:n1", to="closing")
    assert len(warned) == len(closing) == 1, (warned, closing)
    assert 1.0 - 0.01 <= warned[0] < 1.0 + 0.6 < 2.0 - 0.01 <= closing[0], (warned, closing)


def test_clocks_set_to_zero_are_off(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    setup_pool(
        r, keys, procs, heartbeat_ttl=0, idle_timeout=0, grace=0, idle_close=0, max_session=0, autosave=0
    )
    _, t = login(r, keys)  # no heartbeat, no activity from here on
    wait_for(lambda: node_state(r, keys, "n1") == "active", 15)
    assert not r.exists(keys.heartbeat(t.sid)) and not r.exists(keys.activity(t.sid))
    kinds = {m.decode().split("|")[0] for m in r.zrange(keys.deadlines, 0, -1)}
    assert kinds <= {"alive"}
    time.sleep(3)  # several times every clock that would have fired with FAST settings
    assert session_field(r, keys, t.sid) == "active" and node_state(r, keys, "n1") == "active"


def test_node_killed_goes_offline_and_session_moves_to_another_node(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    _, nodes, _ = setup_pool(r, keys, procs, nodes=2, grace=30)
    _, t = login(r, keys)
    hb = beating(r, keys, t)
    try:
        wait_for(lambda: node_state(r, keys, t.node) == "active", 15)
        victim = nodes[int(t.node[1:]) - 1]
        Procs.kill(victim, signal.SIGKILL)
        other = "n2" if t.node == "n1" else "n1"
        wait_for(lambda: node_state(r, keys, t.node) == "offline", 5, what="offline")
        wait_for(lambda: session_field(r, keys, t.sid, "node") == other, 5, what="moved")
        wait_for(lambda: session_field(r, keys, t.sid) == "active", 10, what="active on new node")
        assert node_state(r, keys, other) == "active"
    finally:
        hb.stop.set()


def test_deadlines_that_pass_while_central_is_down_are_handled_when_it_returns(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    central, _, _ = setup_pool(r, keys, procs, idle_timeout=0.5)
    _, t = login(r, keys)
    hb = beating(r, keys, t)
    try:
        wait_for(lambda: node_state(r, keys, "n1") == "active", 15)
        Procs.kill(central, signal.SIGKILL)
        wait_for(lambda: not r.exists(keys.activity(t.sid)), 5)  # expired, its notification lost
        time.sleep(0.5)
        assert session_field(r, keys, t.sid) == "active"  # nobody noticed
        procs.central(**{**FAST, "idle_timeout": 0.5})
        wait_for(lambda: session_field(r, keys, t.sid) == "sleeping", 10, what="sleep after restart")
        assert node_state(r, keys, "n1") == "sleeping"
    finally:
        hb.stop.set()


JOB_START = re.compile(r"cloudq\.workers\.jobs\.(\w+)_job\('[^']*', '([^']+)', .*\) \(([^()\s]+)\)$")
"""The line RQ's worker logs as it starts a job: ``queue: cloudq.workers.jobs.close_job('cqt:',
's1', 1, 'grace') (cqt_close-s1-1-r1)`` -> kind, session, job id."""


def jobs_run(procs: Procs, worker: subprocess.Popen[bytes]) -> list[tuple[str, str, str]]:
    """(kind, session, job id) of every job run the worker started, in order, from its log."""
    return [m.groups() for m in map(JOB_START.search, procs.output(worker).splitlines()) if m]


def test_two_central_replicas_do_each_job_once(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    _, _, worker = setup_pool(r, keys, procs, nodes=4, grace=0.5, idle_timeout=0.5)
    procs.central(**{**FAST, "grace": 0.5, "idle_timeout": 0.5})
    tickets = [login(r, keys, u)[1] for u in ("alice", "bob", "carol")]
    # no client beats: each session starts, goes active, disconnects and closes on its own
    for t in tickets:
        wait_for(lambda t=t: session_field(r, keys, t.sid) == "closed", 15)
    for t in tickets:
        trans = [(e["from"], e["to"]) for e in events(r, keys, f"session:{t.sid}")]
        assert trans.count(("starting", "active")) == 1, trans
        assert trans.count(("disconnected", "closed")) == 1
        assert sum(1 for _, to in trans if to == "disconnected") == 1
    # executions, not transitions (the scripts would refuse a second close anyway): each job ran
    # once, and each session had one mount and one close
    runs = jobs_run(procs, worker)
    assert len({job for _, _, job in runs}) == len(runs), runs
    for t in tickets:
        kinds = [kind for kind, sid, _ in runs if sid == t.sid]
        assert (kinds.count("mount"), kinds.count("close")) == (1, 1), (t.sid, runs)
    assert node_state(r, keys, "n1") == "free"
    assert r.zcard(keys.pool) == 4


def test_status_json_has_nodes_sessions_queue(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    import json

    setup_pool(r, keys, procs, nodes=1)
    _, t = login(r, keys)
    hb = beating(r, keys, t)  # the session stays live however long `cloudq status` takes to start
    try:
        out = procs.run("status", "--json")
    finally:
        hb.stop.set()
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["nodes"][0] == {**st["nodes"][0], "id": "n1", "session": t.sid, "host": "h1"}
    assert st["nodes"][0]["state"] in ("assigned", "active")
    assert {n["state"] for n in st["nodes"]} <= set(NODE_STATES)
    assert {x["state"] for x in st["sessions"]} <= set(SESSION_STATES)
    assert st["sessions"][0]["user"] == "alice" and st["sessions"][0]["node"] == "n1"
    assert st["queue"] == []


def test_with_grace_off_an_abandoned_session_still_closes_when_idle_close_lapses(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    setup_pool(r, keys, procs, grace=0, idle_timeout=30, idle_close=1.5)
    _, t = login(r, keys)
    hb = beating(r, keys, t)
    wait_for(lambda: node_state(r, keys, "n1") == "active", 15)
    r.delete(keys.activity(t.sid))  # the launcher saw no input ...
    hb.stop.set()  # ... and the client went away
    wait_for(lambda: session_field(r, keys, t.sid) == "disconnected", 5)
    assert r.zscore(keys.deadlines, f"grace|{t.sid}") is None  # grace is off
    wait_for(lambda: session_field(r, keys, t.sid) == "closed", 10, what="idle close")
    assert session_field(r, keys, t.sid, "close_reason") == "idle"


def test_each_heartbeat_reads_the_session_back_in_the_same_round_trip(tmp_path) -> None:
    """A client learns its session's state from its heartbeats: one round trip a beat (the server's
    read events say so), not a beat plus a poll, and a close shows in the next beat's reading."""
    from cloudq.embedded import EmbeddedServer

    server = EmbeddedServer(data_dir=tmp_path / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        keys = Keys("hbtest:")
        r.hset(keys.session("s1"), mapping={"state": "active", "node": "n1", "token": "h"})
        hb = Heartbeat(r, keys, "s1", Settings(heartbeat_interval=0.2, heartbeat_ttl=0.8))
        assert hb.session() is None  # no beat yet: the caller asks the server itself
        r.ping()  # the connection is made before counting
        before = r.info("stats")["total_reads_processed"]
        for _ in range(20):
            hb.beat()
        reads = r.info("stats")["total_reads_processed"] - before - 1  # the INFO itself
        assert reads <= 21, f"{reads} reads for 20 beats"
        assert r.pttl(keys.heartbeat("s1")) > 0
        assert hb.session() == {
            "state": "active", "close_reason": "", "node": "n1", "warning": "", "token": "h", "media_lost": "",
        }  # fmt: skip
        r.hset(keys.session("s1"), mapping={"state": "closed", "close_reason": "idle"})
        hb.beat()
        assert (hb.session() or {}).get("close_reason") == "idle"
        time.sleep(0.5)  # two intervals without a beat: too old to stand for the server
        assert hb.session() is None
    finally:
        server.stop()


def test_input_refused_by_redis_pauses_the_pump_instead_of_a_login_per_event(tmp_path) -> None:
    """Once its session's Redis user is gone (the session closed), a client's input is refused:
    the pump drops what comes for ``retry_after`` without trying (the server sees one refused
    AUTH, not one per mouse move), then tries again and sends once the user is back."""
    from cloudq.client.kernel import InputPump, InputSender
    from cloudq.embedded import EmbeddedServer

    server = EmbeddedServer(data_dir=tmp_path / "redis").start()
    try:
        admin = redis.Redis.from_url(server.url)
        keys = Keys("pumptest:")
        admin.acl_setuser("s1", enabled=True, passwords=["+pw"], keys=["pumptest:*"], commands=["+@all"])
        user = redis.Redis.from_url(server.url, username="s1", password="pw")
        pump = InputPump(InputSender(user, keys, "s1"), retry_after=0.5)
        pump.start()
        try:
            pump.put("mouse_move", x=1, y=1)
            wait_for(lambda: admin.xlen(keys.input("s1")) == 1, 5, what="the first event sent")
            admin.acl_deluser("s1")  # the session closed: its user and connections are gone
            refused = admin.info("stats")["acl_access_denied_auth"]
            for i in range(20):
                pump.put("mouse_move", x=i, y=1)
            wait_for(lambda: pump.dropped == 20, 5, what="20 events dropped")
            assert admin.info("stats")["acl_access_denied_auth"] - refused <= 1, "one login tried, not 20"
            admin.acl_setuser("s1", enabled=True, passwords=["+pw"], keys=["pumptest:*"], commands=["+@all"])
            wait_for(lambda: time.monotonic() > pump._quiet_until, 2, what="the pause over")
            pump.put("mouse_move", x=2, y=2)
            wait_for(lambda: admin.xlen(keys.input("s1")) == 2, 5, what="sent again once the user is back")
            assert pump.dropped == 20 and pump.queue.empty()
        finally:
            pump.close()
    finally:
        server.stop()
