"""Reading a session's video stream (``session:{sid}:video``): where a reader starts, when it has
fallen behind, and which keyframe it jumps to. Written once for both readers of the stream: the
client's player (:mod:`cloudq.client.player`: sync, decodes) and the gateway's socket
(:mod:`cloudq.client.web.socket`: asyncio, relays packets to a page).

No I/O here: a reader does the ``XREAD``/``XREVRANGE`` calls these objects ask for and hands them
what came back, so the same decisions serve ``redis`` and ``redis.asyncio``::

    scan = KeyframeScan()
    while not scan.feed(r.xrevrange(key, **scan.page())):   # or: await r.xrevrange(...)
        pass
    ask_for_keyframe = cursor.start(scan)
    ...
    entries = r.xread({key: cursor.last}, count=cursor.batch, ...)[0][1]
    if cursor.behind(entries) and cursor.jump(<a KeyframeScan(after=cursor.last), fed>):
        ...  # skip these entries: read again from just before the newest keyframe
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cloudq.wire import BadMessage, VideoPacket

Entry = tuple[bytes, dict[bytes, bytes]]

MAX_LAG = 0.5
"""A batch spanning more stream time than this (seconds): the reader is behind."""
BATCH = 64
"""Entries per ``XREAD``; a full batch means more are waiting: the reader is behind."""
SCAN_PAGE = 32
"""Entries per ``XREVRANGE`` while looking for a keyframe from the stream's end."""


def entry_ms(entry_id: bytes) -> int:
    """The millisecond part of a stream entry id (the server's clock when it was added)."""
    return int(entry_id.split(b"-", 1)[0])


def before(entry_id: bytes) -> bytes:
    """The stream id just before ``entry_id`` (XREAD returns entries after the id it is given)."""
    ms, _, seq = entry_id.partition(b"-")
    if int(seq or 0) > 0:
        return b"%d-%d" % (int(ms), int(seq) - 1)
    return b"%d-%d" % (int(ms) - 1, 2**64 - 1) if int(ms) > 0 else b"0-0"


def is_keyframe(fields: dict[bytes, bytes]) -> bool:
    """Whether an entry is a valid video packet that is a keyframe (a bad entry is not)."""
    try:
        return VideoPacket.unpack(fields).keyframe
    except BadMessage:
        return False


class KeyframeScan:
    """The newest keyframe entry newer than ``after``, looked for one ``XREVRANGE`` page at a time
    from the stream's end: call ``xrevrange(key, **scan.page())`` and :meth:`feed` the chunk until
    it returns True; then :attr:`found` is the keyframe's id (None: there is none)."""

    def __init__(self, after: bytes = b"0-0", page: int = SCAN_PAGE) -> None:
        self.after = after
        self.count = page
        self.found: bytes | None = None
        self.newest: bytes | None = None
        """The newest entry seen: the stream's last entry (None: nothing newer than ``after``)."""
        self._max = b"+"

    def page(self) -> dict[str, Any]:
        """The next ``XREVRANGE`` arguments (``max``, ``min``, ``count``)."""
        return {"max": self._max, "min": b"(" + self.after, "count": self.count}

    def feed(self, chunk: Sequence[Entry]) -> bool:
        """One page, newest first, as ``XREVRANGE`` returned it; True when the scan is over."""
        if chunk and self.newest is None:
            self.newest = chunk[0][0]
        for entry_id, fields in chunk:
            if is_keyframe(fields):
                self.found = entry_id
                return True
        if len(chunk) < self.count:
            return True
        self._max = b"(" + chunk[-1][0]
        return False


class Cursor:
    """Where one reader stands in a video stream: :attr:`last` is the id its next ``XREAD`` reads
    after (None: not placed yet), and the decisions to start and to catch up."""

    def __init__(self, max_lag: float = MAX_LAG, batch: int = BATCH) -> None:
        self.max_lag = max_lag
        self.batch = batch
        self.last: bytes | None = None

    def start(self, scan: KeyframeScan) -> bool:
        """Place the cursor from a finished scan of the whole stream (``after`` 0-0): just before
        the newest keyframe (the last picture shows at once), else at the stream's end.

        Returns True when the stream has entries but no keyframe: what follows cannot be decoded
        until the next keyframe, so the reader should ask the node for one."""
        if scan.found is not None:
            self.last = before(scan.found)
            return False
        self.last = scan.newest or b"0-0"
        return scan.newest is not None

    def behind(self, entries: Sequence[Entry]) -> bool:
        """Whether a batch ``XREAD`` returned shows the reader behind: a full batch (more wait), or
        one spanning more than ``max_lag`` seconds of stream time."""
        if not entries:
            return False
        span = entry_ms(entries[-1][0]) - entry_ms(entries[0][0])
        return len(entries) >= self.batch or span > self.max_lag * 1000

    def jump(self, scan: KeyframeScan) -> bool:
        """Skip to the newest keyframe a finished scan (``after`` = :attr:`last`) found; False (and
        the cursor stays) when there is none ahead: decoding through is the way to catch up."""
        if scan.found is None or before(scan.found) == self.last:
            return False
        self.last = before(scan.found)
        return True
