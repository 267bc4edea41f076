"""The transition scripts, driven directly against a real server."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis
from helpers import node_state, publish, session_field, wait_for

from cloudq.keys import Keys
from cloudq.state import Action, StateMachine


def events(r: redis.Redis, keys: Keys, obj: str) -> list[tuple[str, str, str]]:
    return [
        (f[b"from"].decode(), f[b"to"].decode(), f[b"reason"].decode())
        for _, f in r.xrange(keys.events)
        if f[b"obj"].decode() == obj
    ]


def test_login_assigns_free_node_then_queues_in_fifo_order(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    sm = StateMachine(r, keys)
    assert sm.register_node("n1", "h", "paint", "i1")
    status, sid, node, gen, _ = sm.login("alice", "t1")
    assert (status, node, gen) == ("assigned", "n1", 1)
    assert node_state(r, keys, "n1") == "assigned"
    assert session_field(r, keys, sid) == "starting"
    assert sm.login("bob", "t2")[0::4] == ("queued", 1)
    assert sm.login("carol", "t3")[0::4] == ("queued", 2)
    assert sm.login("bob", "t2b")[0::4] == ("queued", 1)  # asking again keeps the place
    assert r.lrange(keys.queue, 0, -1) == [b"bob", b"carol"]
    assert events(r, keys, "node:n1") == [("", "free", "registered"), ("free", "assigned", f"session {sid}")]


def test_a_node_is_never_assigned_twice(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    sm = StateMachine(r, keys)
    sm.register_node("n1", "h", "paint", "i1")
    results = [sm.login(f"u{i}", f"t{i}") for i in range(5)]
    assert [x[0] for x in results] == ["assigned"] + ["queued"] * 4
    assert r.zcard(keys.pool) == 0


def test_release_frees_node_and_dispatch_serves_queue_head_still_waiting(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    sm = StateMachine(r, keys)
    sm.register_node("n1", "h", "paint", "i1")
    _, sid, _, gen, _ = sm.login("alice", "t1")
    sm.login("bob", "t2")
    sm.login("carol", "t3")
    r.set(keys.token("t2"), "bob")  # login() issues tokens; make sure they exist as the real path does
    r.set(keys.queued("carol"), "1", px=10_000)  # carol's client is waiting; bob's stopped beating
    assert sm.close_begin(sid, gen, "logout") == ("ok", "n1")
    assert node_state(r, keys, "n1") == "closing"
    assert sm.release(sid, gen) == "n1"
    assert session_field(r, keys, sid) == "closed"
    assert node_state(r, keys, "n1") == "free"
    [a] = sm.dispatch()
    assert (a.user, a.node) == ("carol", "n1")
    # the caller notifies carol (the central server, once her session's Redis user exists)
    assert a.token_hash == "t3" and not r.exists(keys.notify("t3"))
    assert r.llen(keys.queue) == 0


def test_stale_generation_changes_nothing(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    sm = StateMachine(r, keys)
    sm.register_node("n1", "h", "paint", "i1")
    _, sid, _, gen, _ = sm.login("alice", "t1")
    assert sm.login("alice", "t1b")[0] == "reconnect"  # bumps the generation
    assert sm.close_begin(sid, gen, "grace") == ("stale", "")
    assert sm.release(sid, gen) == ""
    assert session_field(r, keys, sid) == "starting"
    assert node_state(r, keys, "n1") == "assigned"
    assert not sm.activate("n1", sid, gen)  # the start for the old generation is stale too
    assert sm.activate("n1", sid, gen + 1)
    assert node_state(r, keys, "n1") == "active"


def test_closed_session_cannot_be_resurrected(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    sm = StateMachine(r, keys)
    sm.register_node("n1", "h", "paint", "i1")
    _, sid, _, gen, _ = sm.login("alice", "t1")
    sm.close_begin(sid, gen, "logout")
    sm.release(sid, gen)
    assert not sm.activate("n1", sid, gen)
    assert not sm.wake("n1", sid)
    assert sm.release(sid, gen) == ""
    status, sid2, _, _, _ = sm.login("alice", "t2")
    assert status == "assigned" and sid2 != sid
    assert session_field(r, keys, sid) == "closed"


def test_reconnect_revokes_the_old_token(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    sm = StateMachine(r, keys)
    sm.register_node("n1", "h", "paint", "i1")
    sm.register_node("n2", "h", "paint", "i2")
    _, sid, node, _, _ = sm.login("alice", "t1")
    assert r.exists(keys.token("t1"))
    status, sid2, node2, gen2, _ = sm.login("alice", "t2")
    assert (status, sid2, node2, gen2) == ("reconnect", sid, node, 2)
    assert not r.exists(keys.token("t1")) and r.get(keys.token("t2")) == b"alice"
    assert r.zcard(keys.pool) == 1  # never a second node


def test_second_process_with_a_live_node_id_is_refused(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    sm = StateMachine(r, keys)
    assert sm.register_node("n1", "h", "paint", "i1")
    assert not sm.register_node("n1", "h", "paint", "i2")
    assert r.get(keys.node_alive("n1")) == b"i1"


def test_concurrent_sweepers_claim_each_due_deadline_once(r: redis.Redis, keys: Keys, redis_url: str) -> None:
    publish(r, keys, heartbeat_ttl=0.3, heartbeat_interval=0.1, idle_timeout=0, grace=0.2)
    sm = StateMachine(r, keys)
    sids = []
    for i in range(40):
        sm.register_node(f"n{i}", "h", "paint", f"i{i}")
        _, sid, node, gen, _ = sm.login(f"u{i}", f"t{i}")
        assert sm.activate(node, sid, gen)
        sids.append(sid)
    # no client beats: every session's heartbeat deadline falls due, then its grace deadline
    wait_for(lambda: not any(r.exists(keys.heartbeat(s)) for s in sids), 5, what="heartbeats lapsed")
    n = 4
    claimed: list[list[Action]] = [[] for _ in range(n)]
    calls = [0] * n
    start, stop = threading.Barrier(n), threading.Event()

    def sweeper(i: int) -> None:
        conn = redis.Redis.from_url(redis_url)  # each its own connection, as replicas have
        mine = StateMachine(conn, keys)
        start.wait(5)
        while not stop.is_set():
            claimed[i].extend(mine.sweep(limit=3).actions)  # a few entries a call: the sweepers interleave
            calls[i] += 1
        conn.close()

    def all_actions() -> list[Action]:
        return [a for c in claimed for a in list(c)]

    threads = [threading.Thread(target=sweeper, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    try:
        wait_for(lambda: sum(a.action == "close" for a in all_actions()) >= len(sids), 10, what="closes")
        # every sweeper sweeps again over the same (now claimed) entries: none may act again
        after = list(calls)
        wait_for(lambda: all(c >= a + 20 for c, a in zip(calls, after, strict=True)), 5, what="more sweeps")
    finally:
        stop.set()
        for th in threads:
            th.join(5)
    assert sum(1 for c in claimed if c) >= 2, "the sweepers did not run side by side"
    acted = Counter((a.action, a.sid) for a in all_actions())
    # each heartbeat deadline claimed once (one disconnect, one save), each grace deadline once (one close)
    assert acted == Counter({(kind, s): 1 for s in sids for kind in ("save", "close")}), acted
    for s in sids:
        assert [e for e in events(r, keys, f"session:{s}") if e[1] == "disconnected"] == [
            ("active", "disconnected", "heartbeat lapsed")
        ]


def test_node_drops_garbage_control_messages_and_keeps_serving(r: redis.Redis, keys: Keys, tmp_path) -> None:
    from cloudq.messages import Control, pack_control
    from cloudq.workers.node import MediaConfig, Node

    publish(r, keys)
    node = Node(
        r, keys, "n1", host="h", app="paint", media=MediaConfig(width=64, height=48, workspace=str(tmp_path))
    )
    node.register()
    for junk in (
        {"cmd": "explode"},
        {"sid": "s1"},
        {"cmd": "start", "gen": "NaN"},
        {"cmd": "stop", "sid": "x" * 100},
    ):
        r.xadd(keys.node_control("n1"), junk)
    r.xadd(keys.node_control("n1"), pack_control(Control("sleep", "s-unknown", 1)))  # not its session
    # each step handles what the node's reader has handed over by then: step until all five are
    wait_for(lambda: (node.step(), node.counters["bad_control"] + node.counters["stale_control"] >= 5)[1], 5)
    assert node.counters["bad_control"] == 4
    assert node.counters["stale_control"] == 1
    assert node_state(r, keys, "n1") == "free"
    # and it still serves a real session afterwards
    sm = StateMachine(r, keys)
    _, sid, _, gen, _ = sm.login("alice", "t1")
    r.xadd(keys.node_control("n1"), pack_control(Control("start", sid, gen)))
    wait_for(lambda: (node.step(), node_state(r, keys, "n1") == "active")[1], 5)
    node.shutdown()


def test_transitions_for_unknown_nodes_or_sessions_change_nothing(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    sm = StateMachine(r, keys)
    sm.register_node("n1", "h", "paint", "i1")
    before = r.xlen(keys.events)
    assert not sm.activate("nope", "s1", 1)
    assert not sm.wake("nope", "s1")
    assert sm.close_begin("s404", 1, "logout") == ("gone", "")
    assert sm.release("s404", 1) == ""
    assert sm.unregister_node("nope", "i1") == "not-owner"
    assert r.xlen(keys.events) == before
    assert node_state(r, keys, "n1") == "free"


def test_login_never_reconnects_into_a_session_that_is_closing(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    sm = StateMachine(r, keys)
    sm.register_node("n1", "h", "paint", "i1")
    sm.register_node("n2", "h", "paint", "i2")
    _, sid, _, gen, _ = sm.login("alice", "t1")
    assert sm.close_begin(sid, gen, "grace")[0] == "ok"
    status, sid2, node2, _, _ = sm.login("alice", "t2")
    assert status == "assigned" and sid2 != sid and node2 == "n2"
    assert session_field(r, keys, sid, "close_reason") == "grace"


def test_resume_goes_back_into_the_tokens_session_or_says_why_it_cannot_and_never_starts_one(
    r: redis.Redis, keys: Keys
) -> None:
    """resume.lua: a client back after an outage holds its session id and token, no password."""
    publish(r, keys, token_ttl=0)
    sm = StateMachine(r, keys)
    sm.register_node("n1", "h", "paint", "i1")
    sm.register_node("n2", "h", "paint", "i2")
    _, sid, node, gen, _ = sm.login("alice", "t1")
    assert sm.resume(sid, "t1", "t2") == ("reconnect", sid, node, gen + 1, "")
    assert not r.exists(keys.token("t1")) and r.get(keys.token("t2")) == b"alice"
    assert sm.resume(sid, "t1", "t3")[0::4] == ("closed", "taken_over"), "t1 was replaced by t2"
    assert sm.resume("s999", "t2", "t4")[0::4] == ("closed", "closed"), "no such session"
    r.delete(keys.token("t2"))  # the token lapsed (token_ttl) in a live session
    assert sm.resume(sid, "t2", "t5")[0::4] == ("expired", "")
    _, sid, _, gen, _ = sm.login("alice", "t6")
    assert sm.close_begin(sid, gen, "idle")[0] == "ok"
    assert sm.resume(sid, "t6", "t7")[0::4] == ("closed", "idle"), "closing counts as over"
    sm.release(sid, gen)
    assert sm.resume(sid, "t6", "t8")[0::4] == ("closed", "idle"), "and so does closed"
    assert r.get(keys.seq) == b"1" and r.lpos(keys.queue, "alice") is None, "no session, no queue"
    assert r.zcard(keys.pool) == 2 and not r.exists(keys.token("t7")) and not r.exists(keys.token("t8"))


def _wake_messages(ps: redis.client.PubSub, within: float = 0.3) -> list[bytes]:
    """What the wake channel carried (waits ``within`` s for the first message)."""
    out, end = [], time.monotonic() + within
    while time.monotonic() < end:
        msg = ps.get_message(timeout=max(0.0, end - time.monotonic()))
        if msg is not None:
            out.append(msg["data"])
    return out


def test_a_deadline_sooner_than_the_sweepers_next_pass_wakes_it_and_a_later_one_does_not(
    r: redis.Redis, keys: Keys, role_urls: dict[str, str]
) -> None:
    """The sweeper sleeps until its first deadline (at most ``longest``): a script that adds an
    earlier one, run by a node's own Redis user, publishes on ``wake``; later ones, and the
    deadlines a sweep sets itself, do not."""
    publish(r, keys, heartbeat_ttl=3.0, idle_timeout=30.0, job_lease=60.0, node_ttl=30.0)
    sm = StateMachine(r, keys)
    as_node = StateMachine(redis.Redis.from_url(role_urls["node"]), keys)
    for n in ("n1", "n2"):
        assert as_node.register_node(n, "h", "paint", f"i-{n}")
    _, sid, _, gen, _ = sm.login("alice", "t1")
    swept = sm.sweep(longest=0.75, least=0.05)
    planned = float(r.hget(keys.sweeper, "next"))
    assert planned == pytest.approx(swept.now + 0.75, abs=0.01)  # the first deadline is 3 s away
    assert r.zrange(keys.deadlines, 0, 0, withscores=True)[0][1] > planned and swept.wait == 0.75
    ps = redis.Redis.from_url(role_urls["central"]).pubsub(ignore_subscribe_messages=True)
    ps.subscribe(keys.wake)
    ps.get_message(timeout=1.0)  # the subscription is live
    sm.login("bob", "t2")  # its deadlines (heartbeat 3 s, idle 30 s, mount lease 60 s) are later
    assert _wake_messages(ps) == []
    assert as_node.request_close(sid, gen, "flood") == "ok"  # a close due now, asked by the node
    assert _wake_messages(ps) == [b"deadline"]
    swept = sm.sweep(longest=0.75, least=0.05)  # claims it, and re-arms the close's lease itself
    assert [(a.action, a.sid) for a in swept.actions] == [("close", sid)]
    assert _wake_messages(ps) == []
    ps.close()


def test_an_idle_central_passes_at_most_about_once_per_longest_sleep_with_short_clocks(
    r: redis.Redis, keys: Keys, procs
) -> None:
    """With a 1 s idle clock the sweeper used to pass 4x a second with nothing due; now it
    sleeps until its first deadline (the nodes' liveness, 1.5 s apart), at most 0.75 s."""
    from helpers import start_pool

    start_pool(r, keys, procs, nodes=2, idle_timeout=1.0, node_ttl=1.5, heartbeat_ttl=3.0)
    # a pass is one script run (sweep.lua writes `last` on every pass)
    wait_for(lambda: r.hget(keys.sweeper, "last"), 10, what="the sweeper's first pass")
    lasts, end = set(), time.monotonic() + 3.0
    while time.monotonic() < end:
        lasts.add(r.hget(keys.sweeper, "last"))
        time.sleep(0.01)
    # 3 s at most one pass per 0.75 s is 4 (+1 at the edges), plus the nodes' liveness deadlines
    # (2 nodes, each every ~1 s of their 1.5 s TTL): well under the 12 the old 0.25 s cap made
    assert len(lasts) <= 10, f"{len(lasts)} passes in 3 s: {sorted(lasts)}"


def test_a_node_refreshes_its_liveness_and_publishes_its_counters_in_one_round_trip(
    keys: Keys, redis_url: str, tmp_path
) -> None:
    import json

    from cloudq.workers.node import MediaConfig, Node

    conn = redis.Redis.from_url(redis_url, single_connection_client=True)  # every command counted
    publish(conn, keys)
    node = Node(
        conn,
        keys,
        "n1",
        host="h",
        app="paint",
        media=MediaConfig(width=64, height=48, workspace=str(tmp_path)),
    )
    node.register()

    node.refresh_liveness()  # the first one also loads the script
    port = conn.client_info()["addr"].rpartition(":")[2]  # the node's connection, as the server sees it
    watcher = redis.Redis.from_url(redis_url)
    sent: list[str] = []
    with watcher.monitor() as m:
        node.refresh_liveness()
        redis.Redis.from_url(redis_url).echo("refresh done")  # the end of what to look at
        for c in m.listen():
            if c["command"].startswith("ECHO"):
                break
            if c.get("client_type") != "lua" and str(c.get("client_port")) == port:
                sent.append(c["command"].split()[0])
    assert sent == ["EVALSHA"], sent  # one round trip: no separate HSET of the counters
    stats = json.loads(conn.hget(keys.node("n1"), "stats"))
    assert stats["at_ms"] > 0 and "cpu_ms" in stats
    assert conn.pttl(keys.node_alive("n1")) > 0
    conn.close()
