"""The state machine: one Lua script per atomic transition (see ``cloudq/scripts/*.lua``).

Each script checks the state (and generation) it expects before it changes anything and
appends every transition to the ``events`` stream, so racing actors (two central replicas,
a retried job, a node) cannot double-assign a node or resurrect a closed session.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any

import redis

from cloudq.keys import Keys, lua_key_helpers

_NAMES = [
    "login",
    "resume",
    "dispatch",
    "sweep",
    "register_node",
    "unregister_node",
    "rejoin_node",
    "lost_session",
    "logout",
    "app_error",
    "forget_node",
    "delete_user",
    "activate",
    "wake",
    "close_begin",
    "release",
    "release_streams",
    "drain",
    "admin_close",
    "user_disable",
    "app_exit",
    "request_close",
]


class NodeState(StrEnum):
    """A node hash's ``state`` (see the diagram in DESIGN.md)."""

    FREE = "free"
    ASSIGNED = "assigned"
    ACTIVE = "active"
    SLEEPING = "sleeping"
    CLOSING = "closing"
    OFFLINE = "offline"


class SessionState(StrEnum):
    """A session hash's ``state`` (``queued`` is where a user waits before there is a session).
    A session whose ``close_reason`` is set is closing whatever its state: see
    :func:`cloudq.sessionend.session_end`."""

    QUEUED = "queued"
    STARTING = "starting"
    ACTIVE = "active"
    SLEEPING = "sleeping"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


class CloseReason(StrEnum):
    """Why a session ended: a session hash's ``close_reason`` (written by the scripts and jobs),
    and what a client concludes by itself (``taken_over``; ``closed`` when none was recorded).
    Four carry a detail after a colon: ``mount_failed: <error>``, ``app_error: <error>``,
    ``app_crashed: exit status N`` and ``admin: <the operator's reason>``. Each has its words in
    :data:`cloudq.sessionend.REASONS`."""

    GRACE = "grace"
    IDLE = "idle"
    MAX_SESSION = "max_session"
    LOGOUT = "logout"
    USER_DELETED = "user_deleted"
    DISABLED = "disabled"
    SERVER_RESTARTED = "server_restarted"
    MOUNT_FAILED = "mount_failed"
    APP_ERROR = "app_error"
    APP_EXITED = "app_exited"
    APP_CRASHED = "app_crashed"
    INPUT_FLOOD = "input_flood"
    ADMIN = "admin"
    TAKEN_OVER = "taken_over"
    CLOSED = "closed"
    QUEUE_DROPPED = "queue_dropped"  # a queued client lost its place before a node (cloudq.loginflow)


def with_detail(reason: CloseReason, detail: str) -> str:
    """A close reason with its detail, as recorded: ``with_detail(CloseReason.ADMIN, "maintenance")``
    is ``"admin: maintenance"``."""
    return f"{reason.value}: {detail}"


class JobResult(StrEnum):
    """What the RQ job bodies (``workers/jobs.py``, ``workers/data.py``) return, the ``result``
    label of ``cloudq_jobs_total`` (spaces as underscores); a save that wrote a version returns
    ``version N`` instead (counted as ``saved``)."""

    STARTED = "started"
    FAILED = "failed"
    STALE = "stale"
    CLOSED = "closed"
    GONE = "gone"
    NOT_LIVE = "not live"
    NO_NODE = "no node"
    NO_USER = "no user"
    NOT_MOUNTED = "not mounted by this session"
    UNCHANGED = "unchanged"
    NODE_DID_NOT_ANSWER = "node did not answer"
    ANOTHER_SAVE_IS_RUNNING = "another save is running"


NODE_STATES = tuple(NodeState)
SESSION_STATES = tuple(SessionState)


# Every script starts with the key prefix (``StateMachine._run`` passes it as ARGV[1]), the key
# helpers generated from ``Keys`` (``K_POOL``, ``k_session(sid)``, ...), then ``_lib.lua``.
LUA_PRELUDE = "local P = ARGV[1]\n" + lua_key_helpers("P")


def _source(name: str) -> str:
    files = resources.files("cloudq") / "scripts"
    return "\n".join((LUA_PRELUDE, (files / "_lib.lua").read_text(), (files / f"{name}.lua").read_text()))


@dataclass
class Assignment:
    sid: str
    node: str
    gen: int
    user: str = ""
    token_hash: str = ""


@dataclass
class Action:
    """Something the sweep decided that needs a job: ``close`` or ``mount``."""

    action: str
    sid: str
    gen: int
    reason: str
    node: str
    host: str
    issue: int = 0
    """How many times the sweep issued this job (re-issues get their own job id)."""


@dataclass
class Sweep:
    """One sweep pass: the actions it decided, and what the sweeper plans its next pass from."""

    actions: list[Action]
    now: float
    """Server time of the pass (s)."""
    wait: float
    """Until the first deadline, within the ``longest`` and ``least`` the pass was given (s)."""
    free: int
    """Free nodes in the pool."""
    queued: int
    moves: int
    """Sessions waiting for another node (theirs went offline)."""
    acl_first: float | None = None
    """The first token expiry of a Redis user (ACLs on)."""
    closed_first: float | None = None
    """The first close after the ACL pass's mark (ACLs on)."""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _f(v: str) -> float | None:
    return float(v) if v else None


class StateMachine:
    """Typed wrappers around the transition scripts."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self._scripts = {name: r.register_script(_source(name)) for name in _NAMES}

    def _run(self, name: str, *args: Any) -> Any:
        return self._scripts[name](keys=[], args=[self.keys.prefix, *args])

    def login(self, user: str, token_hash: str, acl_hash: str = "") -> tuple[str, str, str, int, int]:
        status, sid, node, gen, pos = self._run("login", user, token_hash, acl_hash)
        return _s(status), _s(sid), _s(node), int(gen), int(pos)

    def resume(
        self, sid: str, old_token_hash: str, token_hash: str, acl_hash: str = ""
    ) -> tuple[str, str, str, int, str]:
        """A client back after an outage, into ``sid`` only (``resume.lua``): ``(status, sid, node,
        gen, reason)``, status as :meth:`login` or ``closed`` (``reason`` says why) or ``expired``."""
        status, sid, node, gen, reason = self._run("resume", sid, old_token_hash, token_hash, acl_hash)
        status = _s(status)
        return status, _s(sid), _s(node), int(gen), _s(reason) if status == "closed" else ""

    def dispatch(self, limit: int = 100) -> list[Assignment]:
        flat = [_s(x) for x in self._run("dispatch", limit)]
        return [
            Assignment(flat[i], flat[i + 1], int(flat[i + 2]), flat[i + 3], flat[i + 4])
            for i in range(0, len(flat), 5)
        ]

    def sweep(
        self,
        limit: int = 500,
        run_id: str = "",
        longest: float = 1.0,
        least: float = 0.0,
        closed_after: str = "",
    ) -> Sweep:
        """Claim due deadlines; ``run_id`` (the server's) lets the script see a restart. The
        sweeper means to look again at the first deadline, at most ``longest`` and at least
        ``least`` s from now (a script adding an earlier one wakes it); ``closed_after`` (the ACL
        pass's lower bound of closes still to handle, '' without ACLs) also reports the first ACL
        expiry and the first such close."""
        when, flat = self._run("sweep", limit, run_id, repr(longest), repr(least), closed_after)
        flat = [_s(x) for x in flat]
        now, wait, free, queued, moves, acl_first, closed_first = (_s(x) for x in when)
        return Sweep(
            [
                Action(
                    flat[i],
                    flat[i + 1],
                    int(flat[i + 2] or 0),
                    flat[i + 3],
                    flat[i + 4],
                    flat[i + 5],
                    int(flat[i + 6]),
                )
                for i in range(0, len(flat), 7)
            ],
            float(now),
            float(wait),
            int(free),
            int(queued),
            int(moves),
            _f(acl_first),
            _f(closed_first),
        )

    def register_node(self, node: str, host: str, app: str, instance: str) -> bool:
        return _s(self._run("register_node", node, host, app, instance)) == "ok"

    def unregister_node(self, node: str, instance: str) -> str:
        return _s(self._run("unregister_node", node, instance))

    def rejoin_node(self, node: str, instance: str, sid: str) -> str:
        """A node declared offline takes its session back if nobody took it (see the script)."""
        return _s(self._run("rejoin_node", node, instance, sid))

    def lost_session(self, sid: str, user: str, node: str) -> str:
        """Record a session whose keys a server restart lost as closed (``server_restarted``)."""
        return _s(self._run("lost_session", sid, user, node))

    def logout(self, user: str, token_hash: str) -> tuple[str, int, str]:
        """Revoke the token, mark its session closing (re-issued until closed); (sid, gen, node)."""
        sid, gen, node = self._run("logout", user, token_hash)
        return _s(sid), int(gen), _s(node)

    def app_error(self, node: str, sid: str, detail: str) -> str:
        """The node's app raised: close the session with reason ``app_error``."""
        return _s(self._run("app_error", node, sid, detail))

    def forget_node(self, node: str) -> str:
        """Remove an offline node's records now (``cloudq node forget``)."""
        return _s(self._run("forget_node", node))

    def delete_user(self, name: str) -> tuple[str, str]:
        """Delete an account: tokens revoked, live session closing (``user_deleted``)."""
        status, sid = self._run("delete_user", name)
        return _s(status), _s(sid)

    def activate(self, node: str, sid: str, gen: int) -> bool:
        return _s(self._run("activate", node, sid, gen)) == "ok"

    def wake(self, node: str, sid: str) -> bool:
        return _s(self._run("wake", node, sid)) == "ok"

    def close_begin(self, sid: str, gen: int, reason: str) -> tuple[str, str]:
        status, node = self._run("close_begin", sid, gen, reason)
        return _s(status), _s(node)

    def app_exit(self, node: str, sid: str, gen: int, reason: str) -> str:
        """The node's app ended on its own: close ``sid`` with ``reason`` (see ``app_exit.lua``)."""
        return _s(self._run("app_exit", node, sid, gen, reason))

    def request_close(self, sid: str, gen: int, reason: str) -> str:
        return _s(self._run("request_close", sid, gen, reason))

    def release(self, sid: str, gen: int) -> str:
        return _s(self._run("release", sid, gen))

    def release_streams(self, sid: str, reason: str) -> None:
        """A closed session's streams (on the server this machine talks to: its media server,
        or the control server): video kept a minute for a late reader, input emptied, transfers
        gone (``release_streams.lua``)."""
        self._run("release_streams", sid, reason)

    def drain(self, node: str, on: bool, who: str, why: str = "") -> bool:
        """Take a node out of rotation (it finishes its session) or put it back; False if unknown."""
        return _s(self._run("drain", node, "1" if on else "0", who, why)) == "ok"

    def admin_close(self, sid: str, reason: str, who: str) -> str:
        """Ask for a session to be closed (saved, node freed): ``ok``, ``gone`` or ``closing``."""
        return _s(self._run("admin_close", sid, reason, who))

    def user_disable(self, user: str, on: bool, who: str, why: str = "") -> str | None:
        """Disable (closing the live session) or enable a user; the session being closed, or None
        for an unknown user."""
        res = _s(self._run("user_disable", user, "1" if on else "0", who, why))
        return None if res == "unknown" else res
