"""The node's reader thread: it reads the node's control stream and its session's input stream
and hands each batch to the node loop (``workers/node.py``) in lockstep.

Reads are bounded whatever a client wrote. A session user can XADD entries of any size (up to
the server's ``proto-max-bulk-len``) to its own input stream, and one ``XREAD COUNT 100`` of
those used to exceed the server's output limit for a client: the server cut the node's
connection, the node retried the same read and was cut again, and the node went offline (issue
20). So the reader reads with :data:`BOUNDED_READ`, a script that returns at most ``count``
entries and about ``max_bytes`` bytes, replaces an entry over ``max_entry`` bytes by a stub
(``{OVERSIZE: size}``; the read stops there), trims what the node already consumed and measures
each stream (its length; its memory too when it is long). The script is pipelined behind a
blocking ``XREAD COUNT 1``, the wake-up (one round trip per read): that carries at most one entry
per stream, each bounded by the server's ``proto-max-bulk-len`` (README "Security"), and the
script's entries are used. After a read that stopped at a bound, the script runs alone.

While entries come one at a time (a person's input), the script runs at most every
:data:`SCRIPT_EVERY` seconds or :data:`FAST_READS` reads: in between the ``XREAD`` alone is the
read, its entry stubbed like the script's when it is over ``max_entry``. ``cloudq bench reader``
measured at 30 input events a second: Valkey spends 207-208 µs per event instead of 260-285,
in 3.2 server commands instead of 11. The node's periodic stream check
(``InputGuard.check_stream``) measures and trims in between.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from cloudq.connection import read_block

MAX_BLOCK = 5.0
"""Longest single XREAD block of the reader thread (half the socket timeout, if that is shorter).
Only entries end it early; nothing else depends on it, so a sleeping node wakes this rarely."""
SCRIPT_EVERY = 0.25
"""Seconds between two bounded reads while entries come one at a time: in between the XREAD's
own entry is the read (a script run costs the server 50-80 µs: ``cloudq bench reader``)."""
FAST_READS = 16
"""At most this many reads of one entry per stream (the XREAD alone) between two bounded reads:
a client writing faster than that is read in bounded batches."""
HANDOVER_WAIT = 1.0
"""How long the reader waits for the node loop to take a batch before it checks for stop."""
OVERSIZE = b"\x00oversize"
"""The one field of a stub that stands for an entry over ``max_entry`` bytes (value: its size)."""

Entries = list[tuple[bytes, dict[bytes, bytes]]]


class Batch(list[tuple[bytes, Entries]]):
    """``(stream, entries)`` pairs as XREAD returns them; ``measured`` maps a stream read by the
    bounded script to ``(length, memory bytes or -1)`` after the read."""

    def __init__(
        self,
        items: Iterable[tuple[bytes, Entries]] = (),
        measured: dict[bytes, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(items)
        self.measured = measured or {}


@dataclass(frozen=True)
class ReadLimits:
    count: int = 100
    """Entries per read (all streams together)."""
    max_bytes: int = 1024 * 1024
    """A read stops once it holds this many bytes of entries (at most one entry more)."""
    max_entry: int = 64 * 1024
    """An entry over this is returned as a stub (``OVERSIZE``) and ends the read."""
    measure_len: int = 128
    """A stream longer than this after the read, or where the read met an oversized entry, has
    its memory measured (MEMORY USAGE)."""

    @classmethod
    def for_input(cls, guard: Any) -> ReadLimits:
        """The limits that fit a node's :class:`~cloudq.workers.guard.InputLimits` ``guard``."""
        return cls(
            max_entry=max(guard.max_entry, guard.clip_entry),
            # shorter, it cannot hold max_stream_bytes: its memory is not worth measuring
            measure_len=guard.max_stream_bytes // guard.max_entry,
        )


def stub_size(fields: dict[bytes, bytes]) -> int | None:
    """The size of the entry a bounded read's stub stands for (None: not a stub)."""
    raw = fields.get(OVERSIZE) if len(fields) == 1 else None
    return int(raw) if raw is not None and raw.isdigit() and len(raw) < 20 else None


# KEYS: the streams; ARGV: their ids, then count, max_bytes, max_entry, measure_len, stub field,
# then one flag per stream ('1': trim it). Each stream is read one entry at a time, so an
# oversized entry is measured here and never sent; in a flagged stream what precedes its id
# (consumed by the node) is trimmed first (MINID ~: whole nodes only, cheap). Returns, per
# stream, {entries, length, memory or -1, 1 if it is a stream (or none) else 0}: a closed
# flooding session's input is a string for a while (release.lua), never read.
BOUNDED_READ = """
local n = #KEYS
local count, budget = tonumber(ARGV[n + 1]), tonumber(ARGV[n + 2])
local max_entry, measure_len, stub = tonumber(ARGV[n + 3]), tonumber(ARGV[n + 4]), ARGV[n + 5]
local out, used = {}, 0
for k = 1, n do
  local key, after, got, big = KEYS[k], ARGV[k], {}, false
  local kind = redis.call('TYPE', key).ok
  local readable = kind == 'stream' or kind == 'none'
  if after ~= '$' and readable then
    if ARGV[n + 5 + k] == '1' and after ~= '0-0' then redis.call('XTRIM', key, 'MINID', '~', after) end
    while count > 0 and used < budget do
      local e = redis.call('XRANGE', key, '(' .. after, '+', 'COUNT', 1)[1]
      if not e then break end
      after = e[1]
      count = count - 1
      local size = 0
      for _, v in ipairs(e[2]) do size = size + #v end
      if size > max_entry then
        table.insert(got, {e[1], {stub, tostring(size)}})
        used, big = budget, true
        break
      end
      used = used + size
      table.insert(got, e)
    end
  end
  local len, mem = 0, -1
  if readable then len = redis.call('XLEN', key) end
  if len > measure_len or big then mem = redis.call('MEMORY', 'USAGE', key, 'SAMPLES', '0') or -1 end
  -- the read stopped at a bound (entries, bytes, an oversized entry): more may be waiting
  local stopped = (count <= 0 or used >= budget) and 1 or 0
  table.insert(out, {got, len, mem, readable and 1 or 0, stopped})
end
return out
"""


def _entries(rows: list[Any]) -> Entries:
    return [(eid, dict(zip(flat[::2], flat[1::2], strict=True))) for eid, flat in rows]


class StreamReader(threading.Thread):
    """Reads the node's streams in a thread of its own and hands each batch to the node loop.

    Lockstep: after handing over a batch the reader waits until the loop has handled it
    (``done``), so its next read uses the stream ids and the session that batch led to (a
    ``start`` control message adds the new session's input stream at once). Errors are handed
    over too: the loop raises them and applies its reconnect backoff, which paces the reader.
    """

    def __init__(
        self,
        r: redis.Redis,
        streams: Callable[[], dict[str, bytes]],
        block: float = MAX_BLOCK,
        wake: int | None = None,
        limits: ReadLimits | None = None,
        trim: Callable[[str], bool] | None = None,
        script_every: float = SCRIPT_EVERY,
        fast_reads: int = FAST_READS,
    ) -> None:
        super().__init__(name="node-reader", daemon=True)
        self.script_every, self.max_fast = script_every, fast_reads  # 0: the script on every read
        self.wake = wake  # a pipe's write end: one byte per hand-over wakes a select()ing loop
        self.r = r
        self.streams = streams
        self.limits = limits or ReadLimits()
        self.trim = trim or (lambda name: False)  # which streams lose what the node consumed
        self.block_ms = max(1, int(block * 1000))
        self.batches: queue.Queue[Batch | Exception] = queue.Queue(maxsize=1)
        self.done = threading.Event()
        self.stop = threading.Event()
        self._bounded = r.register_script(BOUNDED_READ)
        self._backlog = False  # the last read stopped at a bound: read on without blocking
        self._script_at = -float("inf")  # when the bounded read last ran (monotonic)
        self._fast = 0  # reads of the XREAD alone since then
        self.script_reads = 0  # reads through the bounded script, and through the XREAD alone
        self.fast_reads = 0

    @classmethod
    def for_node(
        cls, r: redis.Redis, streams: Callable[[], dict[str, bytes]], wake: int, limits: ReadLimits, keep: str
    ) -> StreamReader:
        """A node's reader on ``r`` (started): it blocks below the client's socket timeout, and
        every stream but ``keep`` (the control stream) loses what the node read."""
        reader = cls(
            r,
            streams,
            block=read_block(r, MAX_BLOCK),
            wake=wake,
            limits=limits,
            trim=lambda name: name != keep,  # input: what the node read is of no more use
        )
        reader.start()
        return reader

    def read(self) -> Batch | None:
        """The next entries, bounded; blocks (at most ``block``) while there are none.

        One round trip: a blocking ``XREAD COUNT 1`` and the bounded read pipelined behind it.
        The server runs the script once the XREAD returns (an entry came, or one was there, or
        the block timed out), and only the script's entries are used: the XREAD is the wake-up.
        (Reading first and blocking only when nothing was there cost two round trips per input
        event, each a wake-up of the server's loop and of this node.) After a read that stopped
        at a bound (a backlog), the next one is the script alone: a backlog is read in bounded
        batches, never an unbounded entry at a time through the XREAD. Between two script runs
        the XREAD alone is the read (:meth:`_read_fast`)."""
        streams = self.streams()
        if not streams:  # nothing to read (yet): do not spin
            self.stop.wait(self.block_ms / 1000)
            return None
        now = time.monotonic()
        if not self._backlog and self._fast < self.max_fast and now - self._script_at < self.script_every:
            return self._read_fast(streams)
        self._script_at, self._fast = now, 0
        self.script_reads += 1
        names = list(streams)
        lim = self.limits
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in streams.values()]
        args = [
            *ids,
            *(lim.count, lim.max_bytes, lim.max_entry, lim.measure_len, OVERSIZE),
            *("1" if self.trim(n) else "0" for n in names),
        ]
        pipe = self.r.pipeline(transaction=False)
        if not self._backlog:
            pipe.xread(streams, count=1, block=self.block_ms)
        # evalsha, not the Script object: a pipeline checks SCRIPT EXISTS on every execute
        pipe.evalsha(self._bounded.sha, len(names), *names, *args)
        *woken, rows = pipe.execute(raise_on_error=False)
        woke = woken[0] if woken else None
        if isinstance(rows, redis.exceptions.NoScriptError):  # a new server (restart, failover)
            self.r.script_load(BOUNDED_READ)
            return None  # read again
        if isinstance(rows, Exception):
            raise rows
        batch = Batch(measured={})
        self._backlog = any(int(row[4]) for row in rows)
        for name, (got, length, mem, readable, _) in zip(names, rows, strict=True):
            key = name.encode()
            batch.measured[key] = (int(length), int(mem))
            if got:
                batch.append((key, _entries(got)))
            if not readable:
                del streams[name]
        if isinstance(woke, Exception):
            if len(streams) == len(names):  # not explained by a stream of another type
                raise woke
            woke = None
        # a stream read from its end ("$") is not read by the script: its wake-up entry is it
        batch.extend((k, e) for k, e in woke or () if streams.get(k.decode(), b"") in ("$", b"$"))
        return batch if batch else None

    def _read_fast(self, streams: dict[str, bytes]) -> Batch | None:
        """The XREAD alone (a wake-up that carries at most one entry per stream, each bounded by
        the server's ``proto-max-bulk-len``): its entries are the read, an entry over
        ``max_entry`` becomes a stub as in the script. Anything unusual (an error, e.g. a stream
        of another type; an oversized entry) makes the next read the script, which also trims
        and measures; entries that keep coming reach it after :data:`FAST_READS` reads. Sizes
        are counted on the fields as redis-py parsed them (a repeated field name counts once:
        what the node gets is no bigger); the server's memory of such an entry is the periodic
        stream check's business."""
        try:
            woke = self.r.xread(streams, count=1, block=self.block_ms)
        except redis.ResponseError:
            self._script_at = -float("inf")  # the script sorts it out (WRONGTYPE: the stream is dropped)
            return None
        self.fast_reads += 1
        if not woke:
            return None
        self._fast += 1
        batch = Batch(measured={})
        for key, rows in woke:
            entries: Entries = list(rows)  # redis-py has made each entry's fields a dict
            for i, (eid, fields) in enumerate(entries):
                size = sum(len(v) for v in fields.values()) + sum(len(k) for k in fields)
                if size > self.limits.max_entry:
                    entries[i] = (eid, {OVERSIZE: str(size).encode()})
                    self._script_at = -float("inf")  # next: a bounded read, trimmed and measured
            batch.append((key, entries))
        return batch

    def run(self) -> None:
        while not self.stop.is_set():
            item: Batch | Exception | None
            try:
                item = self.read()
            except Exception as exc:  # handed over: the loop decides (RedisError: back off)
                item = exc
            if self.stop.is_set():
                return  # closed while the read was in flight (its connection may be gone too)
            if item is None:
                continue  # the block timed out: read again (the streams may have changed)
            self.done.clear()
            self.batches.put(item)
            if self.wake is not None:
                with contextlib.suppress(OSError):
                    os.write(self.wake, b"r")
            while not self.done.wait(HANDOVER_WAIT):
                if self.stop.is_set():
                    return

    def next(self, timeout: float) -> Batch | Exception | None:
        """The next batch, waiting at most ``timeout`` seconds on the local clock."""
        try:
            return self.batches.get(timeout=timeout) if timeout > 0 else self.batches.get_nowait()
        except queue.Empty:
            return None

    def close(self, timeout: float = 0.2) -> None:
        """Stop after the read in flight (a daemon thread: it never holds the process up)."""
        self.stop.set()
        self.done.set()
        if self.is_alive():
            self.join(timeout)
