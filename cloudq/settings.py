"""Clocks and limits that every process must agree on.

The central server publishes them in the ``settings`` hash; nodes, jobs, clients and the
Lua scripts read them from there. Times are seconds (fractions allowed); 0 turns a clock off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import redis

from cloudq.keys import Keys


@dataclass
class Settings:
    heartbeat_interval: float = 1.0
    heartbeat_ttl: float = 3.0
    idle_timeout: float = 30.0
    grace: float = 120.0
    idle_close: float = 900.0
    max_session: float = 8 * 3600.0
    max_warning: float = 300.0
    node_ttl: float = 3.0
    token_ttl: float = 24 * 3600.0
    job_lease: float = 30.0
    autosave: float = 60.0
    node_forget: float = 3600.0
    lockout_limit: int = 5
    lockout_window: float = 300.0
    lockout_time: float = 300.0
    file_limit: int = 100 * 2**20
    """Largest file a user may upload into or download from the session's HOME (bytes; 0 = no
    file transfers)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value < 0:
                raise ValueError(f"{f.name} must be >= 0 (0 = off), got {value!r}")
        if self.heartbeat_ttl and self.heartbeat_interval and self.heartbeat_ttl <= self.heartbeat_interval:
            raise ValueError("heartbeat_ttl must be longer than heartbeat_interval")

    @property
    def node_refresh(self) -> float:
        """How often a node refreshes its liveness key."""
        return self.node_ttl / 3 if self.node_ttl else 1.0

    @property
    def activity_refresh(self) -> float:
        """How often at most a client refreshes its activity key while the user gives input (a
        mouse move is 30 events a second; the key's TTL is ``idle_timeout``, so this much
        precision of the idle clock is all that is given up)."""
        return min(0.25, self.idle_timeout / 10)

    def publish(self, r: redis.Redis, keys: Keys) -> None:
        r.hset(keys.settings, mapping={k: repr(v) for k, v in dataclasses.asdict(self).items()})

    @classmethod
    def load(cls, r: redis.Redis, keys: Keys) -> Settings:
        """The published settings (defaults for anything missing)."""
        return cls.from_hash(r.hgetall(keys.settings))

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> Settings:
        """Settings from the published hash's fields (what HGETALL returns; async readers too)."""
        kwargs = {}
        for f in fields(cls):
            v = raw.get(f.name.encode())
            if v is not None:
                kwargs[f.name] = int(float(v)) if f.type in ("int", int) else float(v)
        return cls(**kwargs)
