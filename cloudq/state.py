"""The state machine: one Lua script per atomic transition (see ``cloudq/scripts/*.lua``).

Each script checks the state (and generation) it expects before it changes anything and
appends every transition to the ``events`` stream, so racing actors (two central replicas,
a retried job, a node) cannot double-assign a node or resurrect a closed session.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from cloudq.keys import Keys

_NAMES = [
    "login",
    "dispatch",
    "sweep",
    "register_node",
    "unregister_node",
    "activate",
    "wake",
    "close_begin",
    "release",
    "request_close",
]

NODE_STATES = ("free", "assigned", "active", "sleeping", "closing", "offline")
SESSION_STATES = ("queued", "starting", "active", "sleeping", "disconnected", "closed")


def _source(name: str) -> str:
    files = resources.files("cloudq") / "scripts"
    return (files / "_lib.lua").read_text() + "\n" + (files / f"{name}.lua").read_text()


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


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


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

    def dispatch(self, limit: int = 100) -> list[Assignment]:
        flat = [_s(x) for x in self._run("dispatch", limit)]
        return [
            Assignment(flat[i], flat[i + 1], int(flat[i + 2]), flat[i + 3], flat[i + 4])
            for i in range(0, len(flat), 5)
        ]

    def sweep(self, limit: int = 500) -> list[Action]:
        flat = [_s(x) for x in self._run("sweep", limit)]
        return [
            Action(flat[i], flat[i + 1], int(flat[i + 2] or 0), flat[i + 3], flat[i + 4], flat[i + 5])
            for i in range(0, len(flat), 6)
        ]

    def register_node(self, node: str, host: str, app: str, instance: str) -> bool:
        return _s(self._run("register_node", node, host, app, instance)) == "ok"

    def unregister_node(self, node: str, instance: str) -> str:
        return _s(self._run("unregister_node", node, instance))

    def activate(self, node: str, sid: str, gen: int) -> bool:
        return _s(self._run("activate", node, sid, gen)) == "ok"

    def wake(self, node: str, sid: str) -> bool:
        return _s(self._run("wake", node, sid)) == "ok"

    def close_begin(self, sid: str, gen: int, reason: str) -> tuple[str, str]:
        status, node = self._run("close_begin", sid, gen, reason)
        return _s(status), _s(node)

    def request_close(self, sid: str, gen: int, reason: str) -> str:
        return _s(self._run("request_close", sid, gen, reason))

    def release(self, sid: str, gen: int) -> str:
        return _s(self._run("release", sid, gen))
