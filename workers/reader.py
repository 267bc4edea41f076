"""The node's reader thread: ONE blocking XREAD on the node's control stream and its session's
input stream, each batch handed to the node loop (``workers/node.py``) in lockstep."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable

import redis

MAX_BLOCK = 5.0
"""Longest single XREAD block of the reader thread (half the socket timeout, if that is shorter).
Only entries end it early; nothing else depends on it, so a sleeping node wakes this rarely."""
HANDOVER_WAIT = 1.0
"""How long the reader waits for the node loop to take a batch before it checks for stop."""

Batch = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


class StreamReader(threading.Thread):
    """Blocks on the node's streams in a thread of its own and hands each batch to the node loop.

    Lockstep: after handing over a batch the reader waits until the loop has handled it
    (``done``), so its next XREAD uses the stream ids and the session that batch led to (a
    ``start`` control message adds the new session's input stream at once). Errors are handed
    over too: the loop raises them and applies its reconnect backoff, which paces the reader.
    """

    def __init__(
        self,
        r: redis.Redis,
        streams: Callable[[], dict[str, bytes]],
        block: float = MAX_BLOCK,
        wake: int | None = None,
    ) -> None:
        super().__init__(name="node-reader", daemon=True)
        self.wake = wake  # a pipe's write end: one byte per hand-over wakes a select()ing loop
        self.r = r
        self.streams = streams
        self.block_ms = max(1, int(block * 1000))
        self.batches: queue.Queue[Batch | Exception] = queue.Queue(maxsize=1)
        self.done = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            item: Batch | Exception | None
            try:
                item = self.r.xread(self.streams(), count=100, block=self.block_ms) or None
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
