"""Reconnect backoff: one mechanism for every process that waits for Redis to come back.

Exponential from ``first`` to ``cap`` seconds, with full jitter between half and the whole
delay, so a fleet of clients and nodes that lost the same server does not return in lockstep.
:func:`passing` tells the Redis errors worth waiting out from the ones a process cannot survive.
"""

from __future__ import annotations

import random
import threading

import redis


class Backoff:
    """``wait(stop)`` sleeps the next delay (or until ``stop`` is set); ``reset()`` after success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0, jitter: bool = True) -> None:
        if first <= 0 or cap < first:
            raise ValueError(f"bad backoff {first}..{cap}")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.delay = first
        self.attempts = 0

    def next(self) -> float:
        """The delay to wait now; doubles the one after (up to ``cap``)."""
        d = random.uniform(self.delay / 2, self.delay) if self.jitter else self.delay
        self.delay = min(self.delay * 2, self.cap)
        self.attempts += 1
        return d

    def peek(self) -> float:
        """The upper bound of the next delay (for log lines)."""
        return self.delay

    def wait(self, stop: threading.Event) -> bool:
        """Wait the next delay; True if ``stop`` was set meanwhile."""
        return stop.wait(self.next())

    def reset(self) -> None:
        self.delay = self.first
        self.attempts = 0


PASSING_CODES = frozenset({"BUSY", "LOADING", "MASTERDOWN", "NOSCRIPT", "OOM", "READONLY", "TRYAGAIN"})
"""Error replies that pass: a script is still running (BUSY), the server is loading its data
(LOADING), failing over (READONLY, MASTERDOWN, TRYAGAIN) or out of memory until keys are deleted
(OOM: writes are refused, reads and deletes go on); NOSCRIPT after a restart or SCRIPT FLUSH
(redis-py's ``Script`` loads the script again on the next call)."""


def passing(exc: BaseException) -> bool:
    """True for a Redis error worth backing off and retrying: the server is unreachable or
    answers with one of :data:`PASSING_CODES`. Anything else (WRONGTYPE, NOPERM, a bug) is not."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return True
    if isinstance(exc, _PASSING_TYPES):  # redis-py strips these codes from the message
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
    return code in PASSING_CODES


_PASSING_TYPES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.NoScriptError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
)
