"""``cloudq status``: nodes, sessions and the queue, as read from Redis; ``--watch`` refreshes
a plain-text table (per-node fps and CPU from the counters each node publishes) every second."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from cloudq.keys import Keys
from cloudq.tokens import session_acl_user


def _d(h: dict[bytes, bytes], k: str) -> str:
    return h.get(k.encode(), b"").decode()


def _stats(raw: str) -> dict[str, int]:
    try:
        v = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


def gather(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    node_ids = sorted(n.decode() for n in r.smembers(keys.nodes))
    pipe = r.pipeline()
    for n in node_ids:
        pipe.hgetall(keys.node(n))
        pipe.pttl(keys.node_alive(n))
    raw = pipe.execute()
    nodes = []
    for i, n in enumerate(node_ids):
        h, alive = raw[2 * i], raw[2 * i + 1]
        nodes.append(
            {
                "id": n,
                "state": _d(h, "state"),
                "session": _d(h, "session"),
                "host": _d(h, "host"),
                "app": _d(h, "app"),
                "since": _d(h, "since"),
                "alive_ttl_ms": alive,
                "drained": _d(h, "drained") == "1",
                "stats": _stats(_d(h, "stats")),
            }
        )
    sids = sorted((s.decode() for s in r.smembers(keys.sessions)), key=lambda s: (len(s), s))
    pipe = r.pipeline()
    for s in sids:
        pipe.hgetall(keys.session(s))
        pipe.pttl(keys.heartbeat(s))
        pipe.pttl(keys.activity(s))
    raw = pipe.execute()
    sessions = []
    for i, s in enumerate(sids):
        h, hb, act = raw[3 * i : 3 * i + 3]
        if not h:
            continue
        sessions.append(
            {
                "id": s,
                "user": _d(h, "user"),
                "node": _d(h, "node"),
                "state": _d(h, "state"),
                "gen": int(_d(h, "gen") or 0),
                "heartbeat_ttl_ms": hb,
                "activity_ttl_ms": act,
                "closing": _d(h, "close_reason"),
                # the Redis user its client holds ("" when ACLs are off or the token was revoked)
                "acl_user": session_acl_user(s) if _d(h, "acl") else "",
            }
        )
    queue = [u.decode() for u in r.lrange(keys.queue, 0, -1)]
    return {"nodes": nodes, "sessions": sessions, "queue": queue}


def rates(prev: dict[str, Any] | None, cur: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per node: fps and CPU % between two gathers (from the counters nodes publish)."""
    out: dict[str, dict[str, float]] = {}
    before = {n["id"]: n["stats"] for n in (prev or {}).get("nodes", [])}
    for n in cur["nodes"]:
        a, b = before.get(n["id"], {}), n["stats"]
        dt = (b.get("at_ms", 0) - a.get("at_ms", 0)) / 1000
        if a and dt > 0:
            out[n["id"]] = {
                "fps": max(0, b.get("frames", 0) - a.get("frames", 0)) / dt,
                "cpu_pct": 100 * max(0, b.get("cpu_ms", 0) - a.get("cpu_ms", 0)) / 1000 / dt,
            }
    return out


def format_text(st: dict[str, Any], rate: dict[str, dict[str, float]] | None = None) -> str:
    rate = rate or {}
    lines = [f"nodes ({len(st['nodes'])}):"]
    for n in st["nodes"]:
        state = n["state"] + ("*" if n.get("drained") else "")
        perf = ""
        if n["id"] in rate:
            perf = f" fps={rate[n['id']]['fps']:.1f} cpu={rate[n['id']]['cpu_pct']:.1f}%"
        lines.append(
            f"  {n['id']:<12} {state:<10} host={n['host']} app={n['app']} session={n['session'] or '-'}{perf}"
        )
    if any(n.get("drained") for n in st["nodes"]):
        lines.append("  (* drained: takes no new session)")
    lines.append(f"sessions ({len(st['sessions'])}):")
    for s in st["sessions"]:
        lines.append(
            f"  {s['id']:<8} {s['state']:<12} user={s['user']} node={s['node'] or '-'} "
            f"hb_ttl={s['heartbeat_ttl_ms']}ms act_ttl={s['activity_ttl_ms']}ms"
            + (f" closing={s['closing']}" if s["closing"] else "")
        )
    lines.append(f"queue: {', '.join(st['queue']) or '(empty)'}")
    return "\n".join(lines)


CLEAR = "\x1b[H\x1b[2J"
"""Home the cursor and clear the screen: plain ANSI, which every terminal over SSH understands."""


def watch(
    r: redis.Redis,
    keys: Keys,
    write: Callable[[str], object],
    interval: float = 1.0,
    count: int = 0,
    clear: bool = True,
) -> None:
    """Redraw the table every ``interval`` seconds, ``count`` times (0 = until interrupted)."""
    prev: dict[str, Any] | None = None
    n = 0
    while True:
        cur = gather(r, keys)
        stamp = time.strftime("%H:%M:%S")
        write((CLEAR if clear else "") + f"cloudq status at {stamp} (every {interval:g} s, Ctrl-C to stop)\n")
        write(format_text(cur, rates(prev, cur)) + "\n")
        prev, n = cur, n + 1
        if count and n >= count:
            return
        time.sleep(interval)  # the refresh period of a display, not a synchronisation
