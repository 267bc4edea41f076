"""``cloudq status``: nodes, sessions and the queue, as read from Redis."""

from __future__ import annotations

from typing import Any

import redis

from cloudq.keys import Keys
from cloudq.tokens import session_acl_user


def _d(h: dict[bytes, bytes], k: str) -> str:
    return h.get(k.encode(), b"").decode()


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


def format_text(st: dict[str, Any]) -> str:
    lines = [f"nodes ({len(st['nodes'])}):"]
    for n in st["nodes"]:
        lines.append(
            f"  {n['id']:<12} {n['state']:<9} host={n['host']} app={n['app']} session={n['session'] or '-'}"
        )
    lines.append(f"sessions ({len(st['sessions'])}):")
    for s in st["sessions"]:
        lines.append(
            f"  {s['id']:<8} {s['state']:<12} user={s['user']} node={s['node'] or '-'} "
            f"hb_ttl={s['heartbeat_ttl_ms']}ms act_ttl={s['activity_ttl_ms']}ms"
        )
    lines.append(f"queue: {', '.join(st['queue']) or '(empty)'}")
    return "\n".join(lines)
