"""The Python client's clipboard: what a program in the session copies comes out (the session's
``clip`` stream, read as the session's own user on its media server), and the client's text goes
in as a ``clipboard`` input event (the node puts it on CLIPBOARD and PRIMARY). Text only, at most
:data:`~cloudq.wire.MAX_CLIPBOARD_BYTES`; neither side sends back what it just received. The viewer
(``client/viewer.py``) connects it to the local clipboard (Tk's)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

import redis

from cloudq.keys import Keys
from cloudq.retry import Backoff, passing
from cloudq.wire import MAX_CLIPBOARD_BYTES

log = logging.getLogger(__name__)


class Clipboard(threading.Thread):
    """Follows the session's ``clip`` stream from its end (new texts go to every listener) and
    decides what of the client's own text is worth sending (:meth:`offer`)."""

    def __init__(self, r: redis.Redis, keys: Keys, sid: str, send: Callable[[str], None]) -> None:
        super().__init__(name=f"clipboard-{sid}", daemon=True)
        self.r, self.key, self.send = r, keys.clip(sid), send
        self.listeners: list[Callable[[str], None]] = []
        self.last = ""  # the newest text either way (not sent back)
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()

    def offer(self, text: str) -> bool:
        """The client's clipboard holds ``text`` (a paste, the window focused): send it unless it
        is what the session already has or too big; True if sent."""
        if not text or text == self.last:
            return False
        if len(text.encode()) > MAX_CLIPBOARD_BYTES:
            self.counts["too_big"] += 1
            return False
        self.last = text
        self.send(text)
        self.counts["sent"] += 1
        return True

    def run(self) -> None:
        backoff = Backoff(0.1, 2.0)
        last: bytes | None = None
        while not self.stop.is_set():
            try:
                if last is None:
                    newest = self.r.xrevrange(self.key, count=1)
                    last = newest[0][0] if newest else b"0-0"
                got = self.r.xread({self.key: last}, count=4, block=1000)
                backoff.reset()
            except Exception as exc:
                if not passing(exc):
                    log.warning("clipboard: %s; not followed any more", exc)
                    return
                backoff.wait(self.stop)
                continue
            for _, entries in got or []:
                last = entries[-1][0]
                raw = entries[-1][1].get(b"text")  # only the newest matters
                if not isinstance(raw, bytes) or not raw or len(raw) > MAX_CLIPBOARD_BYTES:
                    self.counts["bad"] += 1
                    continue
                self.last = text = raw.decode(errors="replace")
                self.counts["received"] += 1
                for fn in self.listeners:
                    try:
                        fn(text)
                    except Exception:  # a failing listener (the window gone) must not stop it
                        log.exception("clipboard listener failed")

    def close(self) -> None:
        self.stop.set()
        self.join(2)
