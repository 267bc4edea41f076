"""Reconnect backoff: one mechanism for every process that waits for Redis to come back.

Exponential from ``first`` to ``cap`` seconds, with full jitter between half and the whole
delay, so a fleet of clients and nodes that lost the same server does not return in lockstep.
"""

from __future__ import annotations

import random
import threading


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
