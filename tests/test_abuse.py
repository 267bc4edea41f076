"""Red-team cases of issue 20, through real processes with ACLs on: what one account (or an
anonymous party) does to its own keys costs only itself; other users log in, get a node and
frames in the usual time, and the server's memory returns to its baseline."""

from __future__ import annotations

import threading
import time

import redis
import test_security
from helpers import Procs, events, node_state, session_field, start_pool, wait_for
from test_security import login

from cloudq.keys import Keys

MIB = 1024 * 1024
conns = test_security.conns  # fixtures, used by name
login_url = test_security.login_url


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def test_oversized_input_entries_close_only_their_session_and_release_its_memory(
    r: redis.Redis,
    keys: Keys,
    procs: Procs,
    login_url: str,
    conns: list[redis.Redis],
) -> None:
    """Issue 20 attacks 4 and 5: one account writes 4 MiB entries into its own input stream as fast
    as it can (a node's unbounded XREAD of those used to exceed the
    server's output limit, be cut and retry the same read until every node went offline). Its
    node reads in bounded batches and closes that session ``input_flood``; the node never goes
    offline, the other session keeps streaming, the stream's memory is released and the next
    user gets the freed node and frames."""
    start_pool(r, keys, procs, nodes=2, app="probe", heartbeat_ttl=30, idle_timeout=30, grace=30)
    a, ra = login(login_url, keys, "alice", conns)
    b, _ = login(login_url, keys, "bob", conns)
    wait_for(lambda: r.xlen(keys.video(b.sid)) > 0 and r.xlen(keys.video(a.sid)) > 0, 20, what="both served")
    baseline = used_memory(r)
    big = {"m": b"x" * (4 * MIB)}
    stop = threading.Event()

    def flood() -> None:  # (a session user may not MULTI: plain pipelines, as fast as it goes)
        while not stop.is_set():
            pipe = ra.pipeline(transaction=False)
            for _ in range(5):
                pipe.xadd(keys.input(a.sid), big)
            try:
                pipe.execute()
            except (redis.AuthenticationError, redis.ResponseError):
                return  # closed: its input takes no more entries (release.lua), then its user is gone
            except redis.ConnectionError:
                continue  # cut (a server limit, or its user dropped): connect again

    th = threading.Thread(target=flood, daemon=True)
    th.start()
    try:
        wait_for(lambda: session_field(r, keys, a.sid, "close_reason") == "input_flood", 10, what="A closing")
        wait_for(lambda: session_field(r, keys, a.sid) == "closed", 15, what="A closed")
        th.join(10)
    finally:
        stop.set()
    assert not th.is_alive(), "the flooder could write no more once its session closed"
    video_b = r.xinfo_stream(keys.video(b.sid))["last-generated-id"]
    wait_for(lambda: used_memory(r) < baseline + 8 * MIB, 5, what="memory back near its baseline")
    assert not r.exists(keys.input(a.sid)) or r.memory_usage(keys.input(a.sid)) < MIB
    for node in ("n1", "n2"):
        assert all(e["to"] != "offline" for e in events(r, keys, f"node:{node}")), f"{node} went offline"
    assert session_field(r, keys, b.sid, "close_reason") == "" and node_state(r, keys, b.node) == "active"
    wait_for(
        lambda: r.xinfo_stream(keys.video(b.sid))["last-generated-id"] != video_b, 5, what="B still streaming"
    )
    wait_for(lambda: node_state(r, keys, a.node) == "free", 10, what="A's node back in the pool")
    started = time.monotonic()
    c, _ = login(login_url, keys, "carol", conns)
    assert c.node == a.node
    wait_for(lambda: r.xlen(keys.video(c.sid)) > 0, 10, what="carol's first frames")
    assert time.monotonic() - started < 5


def test_a_client_that_sets_its_liveness_keys_for_hours_then_leaves_is_closed_on_the_normal_clocks(
    r: redis.Redis,
    keys: Keys,
    procs: Procs,
    login_url: str,
    conns: list[redis.Redis],
) -> None:
    """Issue 20 attack 6: a session user may SET its own heartbeat and activity keys, with any
    ``PX``. The sweeper treats a TTL above its clock (heartbeat_ttl, idle_timeout) as lapsed, so a
    client that sets both for 8 hours and leaves is disconnected after heartbeat_ttl and closed
    after grace, like any client that left."""
    start_pool(r, keys, procs, app="probe", grace=1.0)
    a, ra = login(login_url, keys, "alice", conns)
    wait_for(lambda: session_field(r, keys, a.sid) == "active", 10, what="active")
    eight_hours = 8 * 3600 * 1000
    ra.set(keys.heartbeat(a.sid), "1", px=eight_hours)
    ra.set(keys.activity(a.sid), "1", px=eight_hours)
    left = time.monotonic()
    wait_for(lambda: session_field(r, keys, a.sid) == "disconnected", 3, what="disconnected")
    wait_for(lambda: session_field(r, keys, a.sid) == "closed", 5, what="closed after grace")
    assert session_field(r, keys, a.sid, "close_reason") == "grace"
    assert time.monotonic() - left < 5
