"""Input limits: what a node accepts from its session's input stream.

A session's Redis user may XADD to its own input stream and nothing else, but it can still
write big or many entries. The node, the stream's only reader, bounds that:

- an entry over ``max_entry`` bytes is dropped (counted ``input_dropped_size``), unless it is at
  most ``clip_entry`` bytes (room for a ``clipboard`` event, the only input that big: the wire
  format refuses any other), which costs one token per ``max_entry`` bytes; the node's bounded
  reads (``workers/reader.py``) see only the size of one over ``clip_entry``. One over
  ``close_entry`` (3 times anything a client of ours writes: no accident) closes the session with
  reason ``input_flood`` at once;
- entries beyond a token bucket of ``rate`` per second (``burst`` at once) are dropped
  (counted ``input_dropped_rate``), so a flood cannot make the app or the encoder work harder;
- a session that keeps flooding (``flood_drops`` dropped entries), or whose input stream grows
  past ``max_stream_len`` entries or ``max_stream_bytes`` bytes of server memory, is closed with
  reason ``input_flood`` (its data is saved as on any close);
- the node trims what it has read (each read, ``workers/reader.py``) and the stream to about
  ``keep`` entries whatever the client asked for; once a session is closing for a flood, the
  node empties its input stream at each read (``XTRIM MAXLEN 0``) until the session's user is
  gone, and the close deletes the stream: its memory returns.

Every node's guard is independent: one user's flood costs other sessions only the Redis time
of the flooding connection (and the server-wide limits in README "Security").
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import redis

from cloudq.wire import MAX_CLIPBOARD_INPUT_BYTES


@dataclass
class InputLimits:
    max_entry: int = 64 * 1024
    clip_entry: int = MAX_CLIPBOARD_INPUT_BYTES
    close_entry: int = 3 * 1024 * 1024
    rate: float = 500.0
    burst: float = 1000.0
    flood_drops: int = 2000
    max_stream_len: int = 5000
    max_stream_bytes: int = 8 * 1024 * 1024
    keep: int = 2000


class InputGuard:
    def __init__(self, limits: InputLimits, counters: Counter[str]) -> None:
        self.limits = limits
        self.counters = counters
        self.reset()

    def reset(self) -> None:
        """A new session: a full bucket and no drops."""
        self.tokens = self.limits.burst
        self.last = time.monotonic()
        self.drops = 0

    def admit(self, size: int) -> str:
        """``""`` to accept an entry of ``size`` bytes, else why it is dropped (``size``, ``rate``)."""
        now = time.monotonic()
        self.tokens = min(self.limits.burst, self.tokens + (now - self.last) * self.limits.rate)
        self.last = now
        cost = 1 if size <= self.limits.max_entry else -(-size // self.limits.max_entry)
        if size > max(self.limits.max_entry, self.limits.clip_entry):
            why = "size"
        elif self.tokens < cost:
            why = "rate"
        else:
            self.tokens -= cost
            return ""
        self.drops += 1
        self.counters[f"input_dropped_{why}"] += 1
        return why

    @property
    def flooded(self) -> bool:
        return self.drops >= self.limits.flood_drops

    def judge(self, length: object, mem: object) -> str:
        """A reason to close a session whose input stream holds ``length`` entries and ``mem``
        bytes (either may be unknown: not an int, or -1), or ``""``."""
        if isinstance(length, int) and length > self.limits.max_stream_len:
            return f"input stream of {length} entries"
        if isinstance(mem, int) and mem > self.limits.max_stream_bytes:
            return f"input stream of {mem} bytes"
        return ""

    def check_stream(self, r: redis.Redis, key: str) -> str:
        """Measure the stream (a reason to close it, or ``""``), then trim it."""
        pipe = r.pipeline(transaction=False)
        pipe.xlen(key)
        pipe.memory_usage(key, samples=5)
        length, mem = pipe.execute(raise_on_error=False)
        reason = self.judge(length, mem)
        if isinstance(length, int) and length > self.limits.keep:
            r.xtrim(key, maxlen=self.limits.keep, approximate=True)
        return reason
