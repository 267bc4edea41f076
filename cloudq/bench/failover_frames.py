"""``cloudq bench failover --frame-runs N``: what a user sees of a failover, through real processes.

Each run: a primary, one replica and three Sentinels (embedded, Sentinel ``down-after`` 1000 ms as
``cloudq up`` uses), a ``cloudq central``, two nodes (``paint``, a small picture encoded every
frame at 10 fps), a worker, all on the ``redis+sentinel://`` URL; two users logged in through the
public login user, each then heartbeating and reading its video as its own session user. Then
``kill -9`` of the primary, and each user polls its video (every 50 ms, as itself) until a frame
newer than the last one before the kill arrives: that delay per user is the figure (p50 and max
over all runs and users). After it: how many transitions the clients were told of before the kill
are missing on the new primary (the two logins: their sessions and nodes) and how many entries of
the events stream written before the kill are gone (the transitions without a ``WAIT``).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import redis

from cloudq.central.auth import Users
from cloudq.client.kernel import Heartbeat
from cloudq.client.launcher import Launcher
from cloudq.connection import connect
from cloudq.keys import Keys
from cloudq.local.ha import EmbeddedHA
from cloudq.procs import ProcessGroup
from cloudq.settings import Settings

PREFIX = "cqf:"
CLOCKS = ("--heartbeat-interval", "0.3", "--heartbeat-ttl", "1.0", "--node-ttl", "1.0",
          "--idle-timeout", "60", "--grace", "30", "--lockout-limit", "0")  # fmt: skip
NODE = ("--app", "paint", "--size", "96x64", "--fps", "10", "--always-encode")


def _wait(cond: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > end:
            raise RuntimeError(f"bench failover: timed out waiting for {what}")
        time.sleep(0.05)
    return v


def one_run(users: int = 2) -> dict[str, Any]:
    """One failover: the delays to each user's first new frame, and what was lost."""
    keys = Keys(PREFIX)
    ha = EmbeddedHA(replicas=1, sentinels=3, keys=keys, down_after_ms=1000, failover_timeout_ms=2000).start()
    urls = ha.role_urls()
    admin = connect(urls["admin"], socket_timeout=2, socket_connect_timeout=1)
    group = ProcessGroup(
        urls["admin"],
        PREFIX,
        log_dir=tempfile.mkdtemp(prefix="cloudq-bench-failover-frames-"),
        urls={"central": urls["central"], "node": urls["node"], "worker": urls["worker"]},
    )
    beats: list[Heartbeat] = []
    try:
        Settings(heartbeat_interval=0.3, heartbeat_ttl=1.0, node_ttl=1.0, idle_timeout=60, grace=30).publish(
            admin, keys
        )
        group.start("central", *CLOCKS)
        for i in range(users):
            group.start("node", "--id", f"n{i}", "--host", "h1", *NODE, name=f"node{i}")
            Users(admin, keys, cost=4).add(f"u{i}", "pw")
        group.start("worker", "--host", "h1")
        _wait(lambda: admin.zcard(keys.pool) == users, 30, "nodes registered")
        clients = []
        for i in range(users):
            la = Launcher(connect(urls["login"], socket_timeout=2, socket_connect_timeout=1), keys)
            t = la.login(f"u{i}", "pw")
            hb = Heartbeat(la.sr, keys, t.sid, la.settings)
            hb.start()
            beats.append(hb)
            clients.append((la, t))
        for _, t in clients:
            _wait(lambda t=t: admin.xlen(keys.video(t.sid)) > 3, 30, f"{t.user}'s video")
        last = {t.sid: admin.xinfo_stream(keys.video(t.sid))["last-generated-id"] for _, t in clients}
        events_before = admin.xrange(keys.events)
        killed = time.monotonic()
        ha.primary.kill()  # type: ignore[union-attr]
        seen: dict[str, float] = {}

        def new_frames() -> bool:
            for la, t in clients:
                try:
                    if t.sid not in seen and la.sr.xrange(
                        keys.video(t.sid), min=f"({last[t.sid].decode()}", count=1
                    ):
                        seen[t.sid] = time.monotonic() - killed
                except redis.RedisError:  # no primary yet, or its session user not re-created yet
                    pass
            return len(seen) == len(clients)

        _wait(new_frames, 30, "every user's video after the kill")
        ids_after = {eid for eid, _ in admin.xrange(keys.events)}
        lost_events = sum(1 for eid, _ in events_before if eid not in ids_after)
        lost_logins = sum(
            1
            for _, t in clients
            if (admin.hget(keys.session(t.sid), "node") or b"").decode() != t.node
            or admin.hget(keys.session(t.sid), "state") in (None, b"closed")
        )
        return {
            "frame_delays_s": sorted(seen.values()),
            "lost_events": lost_events,
            "lost_logins": lost_logins,
        }
    finally:
        for hb in beats:
            hb.stop.set()
        group.stop_all()
        admin.close()
        ha.stop()


def run(runs: int = 5) -> dict[str, Any]:
    out = [one_run() for _ in range(runs)]
    delays = sorted(d for o in out for d in o["frame_delays_s"])
    return {
        "runs": runs,
        "frame_delays_s": delays,
        "frame_delay_p50_s": delays[len(delays) // 2],
        "frame_delay_max_s": delays[-1],
        "lost_logins": sum(o["lost_logins"] for o in out),
        "lost_events": [o["lost_events"] for o in out],
    }
