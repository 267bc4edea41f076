"""How requests reach the central servers, and how password checks are budgeted.

**Intake.** A client ``RPUSH``\\ es a request (one msgpack, :mod:`cloudq.loginflow`) onto the
``requests`` list; that is all the public login user may write there. A list has no entry id a
client could choose (a stream did: one ``XADD`` with the largest id stopped every later login),
and the central server drops an oversized or unreadable entry unread, so garbage costs its
sender and nothing stays. Each replica moves what it takes (``BLMOVE``) onto its own
``requests:taken:<replica>`` list and removes it there with the reply, in one transaction (the
entry may hold a password). Replicas beat in the ``centrals`` sorted set; the requests a replica
that stopped beating had taken go back to the head of ``requests`` for the others.

**Password checks** (:class:`Checks`) are a budget, not an open door: bcrypt runs on a small pool
of threads (the ``bcrypt`` module releases the GIL) with a cap on checks waiting; beyond it a
login is answered ``busy`` at once. A name that does not exist costs no bcrypt at all: its
answer is held back for as long as a real check takes (:attr:`Checks.check_time`, measured), so
the answer's timing still does not tell a guesser whether the name exists. Resumes and logouts
(tokens, no password) never wait behind password checks: the request loop answers them itself.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import bcrypt
import redis

from cloudq.keys import Keys
from cloudq.messages import MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

REPLY_TTL_MS = 30_000
TAKE_BATCH = 20
"""Requests one replica takes per round (the first blocking, the rest only if already there)."""
BEAT_EVERY = 2.0
DEAD_AFTER = 6.0
"""A replica that has not beaten for this long (s) is dead: its taken requests go back."""


_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[1])
local dead_after = tonumber(ARGV[2])
if dead_after <= 0 then return {} end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now - dead_after))
"""
"""A replica's beat (``centrals``: name -> server time) and the replicas older than ``dead_after``."""


class Intake:
    """One replica's end of the ``requests`` list: take, answer, beat, hand back the dead's."""

    def __init__(self, r: redis.Redis, keys: Keys, name: str, dead_after: float = DEAD_AFTER) -> None:
        self.r = r
        self.keys = keys
        self.name = name
        self.taken = keys.requests_taken(name)
        self.dead_after = dead_after
        self._last_beat = 0.0
        self._beat = r.register_script(_BEAT)

    def setup(self) -> None:
        """Before the first take: a ``requests`` key of another type (a stream, from a release
        before this one) is dropped, and this replica's beat is recorded."""
        kind = self.r.type(self.keys.requests)
        if kind not in (b"none", b"list", "none", "list"):
            log.warning("requests key is a %s (an older release): dropping it", kind)
            self.r.delete(self.keys.requests)
        self.beat(force=True)

    def beat(self, force: bool = False) -> list[str]:
        """Record this replica as alive (every :data:`BEAT_EVERY` s); hand back the requests of
        replicas that stopped beating. Returns the dead replicas' names."""
        now = time.monotonic()
        if not force and now - self._last_beat < BEAT_EVERY:
            return []
        self._last_beat = now
        # one round trip: the beat at the server's time, and who has not beaten since dead_after
        dead = [
            (n.decode() if isinstance(n, bytes) else n)
            for n in self._beat(keys=[self.keys.centrals], args=[self.name, self.dead_after or 0])
        ]
        for name in dead:
            moved = 0
            while (
                self.r.lmove(self.keys.requests_taken(name), self.keys.requests, "RIGHT", "LEFT") is not None
            ):
                moved += 1
            self.r.zrem(self.keys.centrals, name)
            log.info("central replica %s is gone; handed back %d request(s) it had taken", name, moved)
        return dead

    def take(self, block: float) -> list[bytes]:
        """Up to :data:`TAKE_BATCH` requests, waiting up to ``block`` s for the first."""
        first = self.r.blmove(self.keys.requests, self.taken, block, "LEFT", "RIGHT")
        if first is None:
            return []
        pipe = self.r.pipeline(transaction=False)
        for _ in range(TAKE_BATCH - 1):
            pipe.lmove(self.keys.requests, self.taken, "LEFT", "RIGHT")
        return [first, *(x for x in pipe.execute() if x is not None)]

    def take_over_own(self) -> list[bytes]:
        """Requests this replica took before a restart of its loop and never answered."""
        return self.r.lrange(self.taken, 0, -1)

    def answer(self, raw: bytes, request_id: str | None, reply: bytes | None) -> None:
        """Remove ``raw`` from this replica's taken list and push the reply, atomically."""
        pipe = self.r.pipeline(transaction=True)
        pipe.lrem(self.taken, 1, raw)
        if request_id is not None and reply is not None:
            pipe.rpush(self.keys.reply(request_id), reply)
            pipe.pexpire(self.keys.reply(request_id), REPLY_TTL_MS)
        pipe.execute()

    def leave(self) -> None:
        """A clean stop: what this replica took and did not answer goes back for the others."""
        while self.r.lmove(self.taken, self.keys.requests, "RIGHT", "LEFT") is not None:
            pass
        self.r.zrem(self.keys.centrals, self.name)

    @staticmethod
    def oversized(raw: bytes) -> bool:
        return len(raw) > MAX_REQUEST_BYTES + 64  # the msgpack framing of a request at its limit


class Checks:
    """The bcrypt budget: ``workers`` threads, at most ``waiting`` checks queued behind them,
    and replies for unknown names held back by a real check's duration (no CPU)."""

    def __init__(self, dummy: Callable[[], bytes], cost: int, workers: int = 2, waiting: int = 32) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="bcrypt")
        self.slots = threading.BoundedSemaphore(max(1, workers) + max(0, waiting))
        self._dummy = dummy
        # a first estimate without spending a real check: a cost-4 check scaled (bcrypt's work
        # doubles with each step of cost); the real checks then refine it
        probe = bcrypt.hashpw(b"probe", bcrypt.gensalt(4))
        t0 = time.perf_counter()
        bcrypt.checkpw(b"probe", probe)
        self.check_time = (time.perf_counter() - t0) * 2 ** max(0, cost - 4)
        """How long one check takes (s): the moving average of the real ones."""
        self._held: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._release_held, name="held-replies", daemon=True)
        self._thread.start()

    def check(self, password: bytes, stored: bytes | None, done: Callable[[bool], None]) -> bool:
        """Check ``password`` against ``stored`` (None: the dummy hash) on the pool, then call
        ``done(ok)`` there. False (nothing runs) when the budget is spent: answer ``busy``."""
        if not self.slots.acquire(blocking=False):
            return False

        def run() -> None:
            try:
                t0 = time.perf_counter()
                try:
                    ok = bcrypt.checkpw(password, stored or self._dummy()) and stored is not None
                except ValueError:  # over 72 bytes (bcrypt 5), or a damaged stored hash
                    ok = False
                took = time.perf_counter() - t0
                self.check_time = 0.9 * self.check_time + 0.1 * took
            finally:
                self.slots.release()
            done(ok)

        self.pool.submit(self._logged(run))
        return True

    def hold(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once a check's duration has passed, without a check (an unknown name)."""
        with self._cv:
            heapq.heappush(
                self._held, (time.monotonic() + self.check_time, next(self._seq), self._logged(fn))
            )
            self._cv.notify()

    def _release_held(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._held or self._held[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._held else max(0.0, self._held[0][0] - time.monotonic()))
                if self._stop:
                    return
                _, _, fn = heapq.heappop(self._held)
            fn()

    @staticmethod
    def _logged(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception:  # a lost answer: the client times out and tries again
                log.exception("answering a login failed")

        return run

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self.pool.shutdown(wait=False, cancel_futures=True)
