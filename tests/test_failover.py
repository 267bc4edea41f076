"""The control plane survives losing its server: a primary, a replica and three Sentinels
(:class:`cloudq.local.ha.EmbeddedHA`), every process on a ``redis+sentinel://`` URL, and
``kill -9`` of the primary while two users draw."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from helpers import ROLE_OF, Procs, session_field, start_pool, wait_for
from test_userdata import SIZE, connect, draw, flush, ink_rows

from cloudq.connection import connect as redis_connect
from cloudq.connection import parse_sentinel
from cloudq.keys import Keys
from cloudq.local.ha import EmbeddedHA

CLOCKS = dict(heartbeat_interval=0.3, heartbeat_ttl=1.0, node_ttl=1.0, idle_timeout=30, grace=30)


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    u = parse_sentinel("redis+sentinel://cloudq-node:p%40ss@10.0.0.1:26379,[::1]:26380/cloudq/2")
    assert u.hosts == [("10.0.0.1", 26379), ("::1", 26380)] and (u.service, u.db) == ("cloudq", 2)
    assert (u.username, u.password) == ("cloudq-node", "p@ss")
    with pytest.raises(ValueError, match="SERVICE"):
        parse_sentinel("redis+sentinel://127.0.0.1:26379")


@pytest.mark.slow
def test_killing_the_primary_fails_over_and_both_users_keep_their_session_node_and_data(
    tmp_path: Path, keys: Keys
) -> None:
    ha = EmbeddedHA(replicas=1, sentinels=3, keys=keys, down_after_ms=300, failover_timeout_ms=2000).start()
    urls = ha.role_urls()
    r = redis_connect(urls["admin"], socket_timeout=2, socket_connect_timeout=1)
    procs = Procs(urls["admin"], keys.prefix, str(tmp_path), {c: urls[role] for c, role in ROLE_OF.items()})
    try:
        start_pool(
            r,
            keys,
            procs,
            3,
            "paint",
            ("--size", SIZE, "--fps", "10"),
            users=("alice", "bob", "carol"),
            **CLOCKS,
        )
        _, a, hba = connect(r, keys, "alice")
        _, b, hbb = connect(r, keys, "bob")
        draw(r, keys, a.sid, y=30)
        draw(r, keys, b.sid, y=40)
        wait_for(lambda: 30 in ink_rows(flush(r, keys, a.node, a.sid, procs)), 10, what="alice drew")
        wait_for(lambda: 40 in ink_rows(flush(r, keys, b.node, b.sid, procs)), 10, what="bob drew")
        assert r.execute_command("WAIT", 1, 5000) >= 1  # everything so far is on the replica
        events_before = r.xlen(keys.events)
        videos = {s: r.xinfo_stream(keys.video(s))["last-generated-id"] for s in (a.sid, b.sid)}
        old = r.connection_pool.get_master_address()

        ha.primary.kill()  # type: ignore[union-attr]

        def new_frames(sid: str) -> bool:
            try:
                return bool(r.xrange(keys.video(sid), min=f"({videos[sid].decode()}", count=1))
            except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
                return False

        # 3.6-4.4 s on an idle machine (the target: 5 s); the bound leaves room for a loaded one
        wait_for(lambda: new_frames(a.sid) and new_frames(b.sid), 20, what="both users' video after the kill")
        assert r.connection_pool.get_master_address() != old, "the replica is the primary now"
        for t, y in ((a, 30), (b, 40)):  # same session, same node, nothing closed, the drawing there
            assert (
                session_field(r, keys, t.sid) == "active" and session_field(r, keys, t.sid, "node") == t.node
            )
            assert not session_field(r, keys, t.sid, "close_reason")
            assert y in ink_rows(flush(r, keys, t.node, t.sid, procs))
        assert r.xlen(keys.events) >= events_before, "every transition before the kill is there"
        # and a user who logs in after the failover gets a node (its session user made on the new primary)
        _, c, hbc = connect(r, keys, "carol")
        draw(r, keys, c.sid, y=50)
        wait_for(lambda: 50 in ink_rows(flush(r, keys, c.node, c.sid, procs)), 10, what="carol drew")
        hbc.stop.set()
        assert all(p.poll() is None for p in procs.procs), "no process died of the failover"
        hba.stop.set()
        hbb.stop.set()
    finally:
        procs.stop_all()
        r.close()
        ha.stop()
