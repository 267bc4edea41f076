"""Every Redis key name cloudq uses, in one place.

Names start with a configurable prefix (default ``cloudq:``). Keys that belong to one
session carry the session id as a hash tag (``{sid}``) so that, on a Redis Cluster, a
session's media keys share one slot. README's key table is generated from ``TABLE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "cloudq:"

# (pattern, type, ttl, written by, meaning) — README's key table is rendered from this.
TABLE: list[tuple[str, str, str, str, str]] = [
    ("settings", "hash", "-", "central", "clocks every process agrees on (published at start)"),
    ("users", "set", "-", "cli", "all user names"),
    (
        "user:<name>",
        "hash",
        "-",
        "cli, central",
        "bcrypt hash, created, disabled, session, last_node; qtoken, qacl, queued_at while queued",
    ),
    ("user:<name>:fails", "string", "lockout window", "central", "failed logins in the window"),
    ("user:<name>:lock", "string", "lockout time", "central", "present = account locked"),
    ("user:<name>:mounted", "string", "-", "mount job", "session whose node holds the user's data"),
    (
        "user:<name>:savelock",
        "string",
        "10 s lease (`--save-lease`)",
        "save job",
        "fencing token of the running save (renewed while it runs)",
    ),
    ("user:<name>:fence", "string", "-", "save job", "last fencing token issued"),
    (
        "user:<name>:deleted",
        "string",
        "-",
        "cli",
        "when an account of this name was deleted: older versions are not mounted",
    ),
    (
        "token:<sha256>",
        "string",
        "token TTL",
        "central",
        "the user's name; the key holds only the token's hash",
    ),
    (
        "requests",
        "list",
        "-",
        "clients",
        "login, resume and logout requests, one msgpack each, in arrival order (`RPUSH`: no id a client could choose)",
    ),
    (
        "requests:taken:<replica>",
        "list",
        "-",
        "central",
        "the requests a central replica took and has not answered (back to `requests` if it dies)",
    ),
    ("centrals", "zset", "-", "central", "live central replicas, by the server time of their last beat"),
    (
        "wake",
        "channel",
        "-",
        "worker, scripts",
        "pub/sub: `free`: a close freed a node, the central servers hand it to the queue at once;"
        " `deadline`: a script set a deadline due before the sweeper's next pass",
    ),
    ("reply:<request id>", "list", "30 s", "central", "the reply to one request"),
    ("nodes", "set", "-", "nodes", "all node ids"),
    (
        "node:<id>",
        "hash",
        "-",
        "scripts, node",
        "state, host, app, session, since, gen, instance, drained; stats (JSON counters); flushed, stopped (acks to jobs)",
    ),
    ("node:<id>:alive", "string", "node TTL", "node", "liveness; value = the process's instance id"),
    ("node:<id>:control", "stream", "MAXLEN ~1000", "central, jobs", "commands to the node"),
    ("pool", "sorted set", "-", "scripts", "free nodes, score = time freed"),
    ("queue", "list", "-", "scripts", "users waiting for a node (FIFO)"),
    ("queued:<user>", "string", "queue beat TTL", "client", "the waiting client is still there"),
    (
        "queue_waits",
        "list",
        "LTRIM 1000",
        "scripts",
        "seconds each dispatched user waited (drained by metrics)",
    ),
    ("notify:<token hash>", "list", "token TTL", "central", "assignment for a queued client"),
    ("deadlines", "sorted set", "-", "central, scripts", "member `kind|id`, score = due time"),
    (
        "session:{<sid>}",
        "hash",
        "-",
        "scripts",
        "user, node, state, gen, timestamps, reason; token (hash), acl (SHA-256 of the session user's password); "
        "media (the media server of its streams, '' = this server), media_lost (when its node lost that server)",
    ),
    ("session:{<sid>}:hb", "string", "heartbeat TTL", "client kernel", "heartbeat"),
    ("session:{<sid>}:act", "string", "idle timeout", "client launcher", "user activity"),
    ("session:{<sid>}:video", "stream", "MAXLEN ~", "node", "encoded video, one packet per entry"),
    ("session:{<sid>}:input", "stream", "MAXLEN ~", "client", "input events and keyframe requests"),
    (
        "session:{<sid>}:audio",
        "stream",
        "MAXLEN ~",
        "node",
        "encoded audio (Opus), one packet per entry; none while the session sleeps",
    ),
    (
        "session:{<sid>}:clip",
        "stream",
        "MAXLEN 4",
        "node",
        "the remote clipboard's text (field `text`, UTF-8) each time a program there sets it",
    ),
    (
        "session:{<sid>}:files",
        "stream",
        "MAXLEN ~",
        "client",
        "file transfer requests and upload chunks (cloudq/transfer.py), read by the node",
    ),
    (
        "session:{<sid>}:fileout",
        "stream",
        "MAXLEN ~",
        "node",
        "file transfer replies: acks, download chunks, listings, errors",
    ),
    ("seq", "string", "-", "scripts", "session id counter"),
    ("moves", "list", "-", "scripts", "sessions whose node died, waiting for another"),
    ("sessions", "set", "-", "scripts", "ids of sessions not yet closed"),
    ("closed", "sorted set", "1 h of closes", "scripts", "ids of sessions that closed, score = when"),
    ("events", "stream", "MAXLEN ~10000", "scripts", "every state transition (t, obj, from, to, reason)"),
    (
        "sweeper",
        "hash",
        "-",
        "central",
        "last: server time of the last sweep; next: when the sweeper means to look again;"
        " run_id: the server it ran on",
    ),
    (
        "media:down",
        "set",
        "-",
        "central",
        "media servers (their public URLs) the central server cannot reach: new sessions go elsewhere",
    ),
    (
        "media:mark",
        "string",
        "-",
        "central",
        "on each media server: set by the central server; missing = a new server (session users re-created)",
    ),
    ("acl:expiry", "sorted set", "-", "central", "session/queue ACL users, score = when their token expires"),
]


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def _k(self, name: str) -> str:
        return self.prefix + name

    # global
    @property
    def settings(self) -> str:
        return self._k("settings")

    @property
    def users(self) -> str:
        return self._k("users")

    @property
    def requests(self) -> str:
        return self._k("requests")

    def requests_taken(self, replica: str) -> str:
        return self._k(f"requests:taken:{replica}")

    @property
    def centrals(self) -> str:
        return self._k("centrals")

    @property
    def wake(self) -> str:
        return self._k("wake")

    @property
    def nodes(self) -> str:
        return self._k("nodes")

    @property
    def pool(self) -> str:
        return self._k("pool")

    @property
    def queue(self) -> str:
        return self._k("queue")

    @property
    def queue_waits(self) -> str:
        return self._k("queue_waits")

    @property
    def deadlines(self) -> str:
        return self._k("deadlines")

    @property
    def sessions(self) -> str:
        return self._k("sessions")

    @property
    def closed(self) -> str:
        return self._k("closed")

    @property
    def events(self) -> str:
        return self._k("events")

    @property
    def sweeper(self) -> str:
        return self._k("sweeper")

    @property
    def media_down(self) -> str:
        return self._k("media:down")

    @property
    def media_mark(self) -> str:
        return self._k("media:mark")

    @property
    def acl_expiry(self) -> str:
        return self._k("acl:expiry")

    @property
    def moves(self) -> str:
        return self._k("moves")

    @property
    def seq(self) -> str:
        return self._k("seq")

    # users and tokens
    def user(self, name: str) -> str:
        return self._k(f"user:{name}")

    def user_fails(self, name: str) -> str:
        return self._k(f"user:{name}:fails")

    def user_lock(self, name: str) -> str:
        return self._k(f"user:{name}:lock")

    def user_mounted(self, name: str) -> str:
        return self._k(f"user:{name}:mounted")

    def save_lock(self, name: str) -> str:
        return self._k(f"user:{name}:savelock")

    def user_deleted(self, name: str) -> str:
        return self._k(f"user:{name}:deleted")

    def save_fence(self, name: str) -> str:
        return self._k(f"user:{name}:fence")

    def token(self, token_hash: str) -> str:
        return self._k(f"token:{token_hash}")

    def reply(self, request_id: str) -> str:
        return self._k(f"reply:{request_id}")

    def queued(self, user: str) -> str:
        return self._k(f"queued:{user}")

    def notify(self, token_hash: str) -> str:
        return self._k(f"notify:{token_hash}")

    # nodes
    def node(self, node_id: str) -> str:
        return self._k(f"node:{node_id}")

    def node_alive(self, node_id: str) -> str:
        return self._k(f"node:{node_id}:alive")

    def node_control(self, node_id: str) -> str:
        return self._k(f"node:{node_id}:control")

    # sessions (hash-tagged)
    def session(self, sid: str) -> str:
        return self._k(f"session:{{{sid}}}")

    def heartbeat(self, sid: str) -> str:
        return self._k(f"session:{{{sid}}}:hb")

    def activity(self, sid: str) -> str:
        return self._k(f"session:{{{sid}}}:act")

    def video(self, sid: str) -> str:
        return self._k(f"session:{{{sid}}}:video")

    def input(self, sid: str) -> str:
        return self._k(f"session:{{{sid}}}:input")

    def audio(self, sid: str) -> str:
        return self._k(f"session:{{{sid}}}:audio")

    def clip(self, sid: str) -> str:
        return self._k(f"session:{{{sid}}}:clip")

    def files(self, sid: str) -> str:
        return self._k(f"session:{{{sid}}}:files")

    def fileout(self, sid: str) -> str:
        return self._k(f"session:{{{sid}}}:fileout")

    def job_queue(self, host: str) -> str:
        """RQ queue name (not a key: RQ adds its own ``rq:queue:`` prefix)."""
        return f"{self.prefix}host:{host}"


def key_table_markdown(prefix: str = DEFAULT_PREFIX) -> str:
    rows = ["| key | type | TTL | written by | meaning |", "|---|---|---|---|---|"]
    rows += [f"| `{prefix}{p}` | {t} | {ttl} | {w} | {m} |" for p, t, ttl, w, m in TABLE]
    return "\n".join(rows)


# Members of Keys that are not key names (the Lua helpers leave them out).
_NOT_KEYS = frozenset({"job_queue"})  # an RQ queue name; RQ adds its own prefix
_LUA_P, _LUA_ARG = "\x00P\x00", "\x00A\x00"  # stand-ins traced through each Keys member


def _lua_concat(formatted: str, prefix_var: str) -> str:
    """``P .. 'node:' .. id .. ':alive'`` from a name formatted with the stand-ins."""
    pieces = []
    for part in re.split(f"({_LUA_P}|{_LUA_ARG})", formatted):
        if part == _LUA_P:
            pieces.append(prefix_var)
        elif part == _LUA_ARG:
            pieces.append("id")
        elif part:
            pieces.append("'" + part.replace("\\", "\\\\").replace("'", "\\'") + "'")
    return " .. ".join(pieces)


def lua_key_helpers(prefix_var: str = "P") -> str:
    """Lua helpers formatting every key exactly as :class:`Keys` does, generated from it:
    ``K_POOL`` for a global key, ``k_node_alive(id)`` for a key of one object. The scripts
    (``cloudq/scripts``) name keys only through these; ``prefix_var`` is the Lua variable that
    holds the prefix, declared before this text."""
    traced = Keys(_LUA_P)
    lines = ["-- key names, generated from cloudq.keys.Keys by lua_key_helpers(): do not edit"]
    for name, member in vars(Keys).items():
        if name.startswith("_") or name in _NOT_KEYS:
            continue
        if isinstance(member, property):
            expr = _lua_concat(getattr(traced, name), prefix_var)
            lines.append(f"local K_{name.upper()} = {expr}")
        elif callable(member):
            expr = _lua_concat(getattr(traced, name)(_LUA_ARG), prefix_var)
            lines.append(f"local function k_{name}(id) return {expr} end")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(key_table_markdown())
