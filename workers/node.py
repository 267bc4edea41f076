"""``cloudq node``: one service node.

The node registers in the pool, keeps its liveness key fresh, and waits in ONE blocking
XREAD on its control stream and its session's input stream, with a timeout equal to the
time to its next duty (frame or liveness refresh): no sleep-poll loop.

Sleep: the node stops rendering and encoding and only blocks on its streams; the app stays
in memory. The first input on a sleeping node wakes it at once (no round trip through the
central server).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import redis

from cloudq.keys import Keys
from cloudq.messages import BadMessage, unpack_control
from cloudq.settings import Settings
from cloudq.state import StateMachine

log = logging.getLogger(__name__)

MAX_INPUT_ENTRY = 64 * 1024
_REFRESH_ALIVE = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
if not v and redis.call('HGET', KEYS[2], 'state') == 'offline' then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class NodeIdTaken(RuntimeError):
    """Another live process already serves this node id."""


@dataclass
class NodeSession:
    sid: str
    gen: int
    input_id: bytes = b"$"
    sleeping: bool = False


class Node:
    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        node_id: str,
        host: str | None = None,
        app: str = "paint",
    ) -> None:
        self.r = r
        self.keys = keys
        self.id = node_id
        self.host = host or socket.gethostname()
        self.app = app
        self.instance = uuid.uuid4().hex
        self.sm = StateMachine(r, keys)
        self.settings = Settings.load(r, keys)
        self.session: NodeSession | None = None
        self.control_id = b"0-0"
        self.stop = threading.Event()
        self.counters: Counter[str] = Counter()
        self._refresh = r.register_script(_REFRESH_ALIVE)
        self._next_refresh = 0.0

    # -- registration and liveness -----------------------------------------------------------
    def register(self) -> None:
        last = self.r.xrevrange(self.keys.node_control(self.id), count=1)
        self.control_id = last[0][0] if last else b"0-0"
        self.settings = Settings.load(self.r, self.keys)
        if not self.sm.register_node(self.id, self.host, self.app, self.instance):
            self.counters["id_taken"] += 1
            raise NodeIdTaken(f"node id {self.id!r} is already served by a live process")
        self.session = None
        self._next_refresh = time.monotonic() + self.settings.node_refresh
        log.info("node %s registered (host %s, app %s)", self.id, self.host, self.app)

    def refresh_liveness(self) -> None:
        ttl_ms = int((self.settings.node_ttl or 3600) * 1000)
        res = self._refresh(
            keys=[self.keys.node_alive(self.id), self.keys.node(self.id)], args=[self.instance, ttl_ms]
        )
        if res == 0:
            raise NodeIdTaken(f"node id {self.id!r} was taken over by another process")
        if res == -1:
            log.warning("node %s was declared offline; registering again", self.id)
            self.stop_session("declared offline")
            self.register()
        self._next_refresh = time.monotonic() + self.settings.node_refresh

    def shutdown(self) -> None:
        try:
            self.stop_session("node shutting down")
            self.sm.unregister_node(self.id, self.instance)
        except redis.RedisError as exc:
            log.warning("node %s: could not unregister: %s", self.id, exc)

    # -- session ----------------------------------------------------------------------------
    def start_session(self, sid: str, gen: int) -> None:
        last = self.r.xrevrange(self.keys.input(sid), count=1)
        if self.session and self.session.sid != sid:
            self.stop_session("replaced")
        self.session = NodeSession(sid, gen, input_id=last[0][0] if last else b"0-0")
        if self.sm.activate(self.id, sid, gen):
            log.info("node %s: session %s active", self.id, sid)
        else:
            log.info("node %s: start of %s gen %s is stale", self.id, sid, gen)
            self.session = None

    def stop_session(self, reason: str) -> None:
        if self.session:
            log.info("node %s: session %s stopped (%s)", self.id, self.session.sid, reason)
        self.session = None

    def sleep(self) -> None:
        if self.session and not self.session.sleeping:
            self.session.sleeping = True
            log.info("node %s: sleeping", self.id)

    def wake(self) -> None:
        if self.session and self.session.sleeping:
            self.session.sleeping = False
            self.sm.wake(self.id, self.session.sid)
            log.info("node %s: woke on input", self.id)

    # -- the loop ---------------------------------------------------------------------------
    def handle_control(self, fields: dict[bytes, bytes]) -> None:
        try:
            c = unpack_control(fields)
        except BadMessage as exc:
            self.counters["bad_control"] += 1
            log.warning("node %s: dropped control message: %s", self.id, exc)
            return
        if c.cmd == "start":
            self.start_session(c.sid, c.gen)
        elif not self.session or c.sid != self.session.sid:
            self.counters["stale_control"] += 1
        elif c.cmd == "sleep":
            self.sleep()
        elif c.cmd == "wake":
            self.wake()
        elif c.cmd == "stop":
            self.stop_session("closed")

    def handle_input(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        size = sum(len(k) + len(v) for k, v in fields.items())
        if size > MAX_INPUT_ENTRY or b"m" not in fields:
            self.counters["bad_input"] += 1
            log.warning("node %s: dropped input entry %s (%d bytes)", self.id, entry_id.decode(), size)
            return
        self.counters["input"] += 1
        if self.session and self.session.sleeping:
            self.wake()

    def next_timeout(self) -> float:
        return max(0.0, self._next_refresh - time.monotonic())

    def step(self) -> None:
        streams = {self.keys.node_control(self.id): self.control_id}
        if self.session:
            streams[self.keys.input(self.session.sid)] = self.session.input_id
        block_ms = max(1, int(min(self.next_timeout(), 1.0) * 1000))
        resp = self.r.xread(streams, count=100, block=block_ms)
        for stream, entries in resp or []:
            is_control = stream.decode() == self.keys.node_control(self.id)
            for entry_id, fields in entries:
                if is_control:
                    self.control_id = entry_id
                    self.handle_control(fields)
                elif self.session:
                    self.session.input_id = entry_id
                    self.handle_input(entry_id, fields)
        if time.monotonic() >= self._next_refresh:
            self.refresh_liveness()

    def run(self) -> None:
        self.register()
        backoff = 0.1
        try:
            while not self.stop.is_set():
                try:
                    self.step()
                    backoff = 0.1
                except redis.ConnectionError as exc:
                    log.warning("node %s: redis unreachable (%s); retrying in %.1fs", self.id, exc, backoff)
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            self.shutdown()
