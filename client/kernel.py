"""The cloud client's kernel: heartbeats (on their own thread, so a slow decode never stops
them), the session's state, and — with the media pipeline — decoding and input."""

from __future__ import annotations

import logging
import threading

import redis

from cloudq.keys import Keys
from cloudq.settings import Settings

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Refreshes ``session:{sid}:hb`` every ``heartbeat_interval`` with TTL ``heartbeat_ttl``."""

    def __init__(self, r: redis.Redis, keys: Keys, sid: str, settings: Settings) -> None:
        super().__init__(name=f"heartbeat-{sid}", daemon=True)
        self.r = r
        self.keys = keys
        self.sid = sid
        self.settings = settings
        self.stop = threading.Event()
        self.beats = 0
        self.failures = 0

    def beat(self) -> None:
        self.r.set(self.keys.heartbeat(self.sid), "1", px=int(self.settings.heartbeat_ttl * 1000))
        self.beats += 1

    def run(self) -> None:
        if not (self.settings.heartbeat_ttl and self.settings.heartbeat_interval):
            return  # the heartbeat clock is off
        while not self.stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                self.failures += 1
                log.warning("heartbeat failed: %s", exc)
            self.stop.wait(self.settings.heartbeat_interval)


def session_state(r: redis.Redis, keys: Keys, sid: str) -> tuple[str, str]:
    """(state, close reason) of a session."""
    state, reason = r.hmget(keys.session(sid), "state", "close_reason")
    return (state or b"closed").decode(), (reason or b"").decode()
