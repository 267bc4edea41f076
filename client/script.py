"""Scripted input for headless sessions (``cloudq connect --script FILE``).

One event per line: seconds since the stream started (the first decoded frame), then the event::

    # draw a blue line
    0.0  key 4
    0.5  mouse_down 100 200
    0.6  mouse_move 150 200
    0.7  mouse_up 200 200

``key K`` takes one key name (``a``, ``+``, ``Delete``, ...); the mouse events take integer frame
pixels ``X Y``. ``#`` starts a comment; blank lines are skipped. Times must not go backwards.
:func:`parse_script` checks the whole file before anything connects and raises
:class:`ScriptError` naming the first bad line.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloudq.wire import MAX_KEY_CHARS

log = logging.getLogger(__name__)

MOUSE = ("mouse_down", "mouse_move", "mouse_up")


class ScriptError(ValueError):
    """A malformed script line; the message names the file and line."""


@dataclass(frozen=True)
class ScriptEvent:
    at: float
    type: str
    key: str | None = None
    x: int | None = None
    y: int | None = None
    line: int = 0

    def fields(self) -> dict[str, object]:
        """Keyword arguments for :meth:`InputSender.send`."""
        if self.type == "key":
            return {"key": self.key}
        return {"x": self.x, "y": self.y, "button": 1}


def _coord(word: str) -> int:
    v = int(word)
    if not -(2**31) <= v < 2**31:
        raise ValueError(f"coordinate out of range: {word}")
    return v


def parse_line(text: str, line: int = 0) -> ScriptEvent | None:
    """One line -> an event (None for a blank or comment line); raises ``ValueError`` saying why."""
    words = text.split("#", 1)[0].split()
    if not words:
        return None
    try:
        at = float(words[0])
    except ValueError:
        raise ValueError(f"expected seconds first, got {words[0]!r}") from None
    if not math.isfinite(at) or at < 0:
        raise ValueError(f"time must be a finite number >= 0, got {words[0]!r}")
    if len(words) < 2:
        raise ValueError("missing the event after the time")
    kind, args = words[1], words[2:]
    if kind == "key":
        if len(args) != 1:
            raise ValueError("key takes exactly one key name, e.g. 'key a'")
        if len(args[0]) > MAX_KEY_CHARS:
            raise ValueError(f"key name longer than {MAX_KEY_CHARS} characters")
        return ScriptEvent(at, "key", key=args[0], line=line)
    if kind in MOUSE:
        if len(args) != 2:
            raise ValueError(f"{kind} takes X Y, e.g. '{kind} 100 200'")
        try:
            x, y = _coord(args[0]), _coord(args[1])
        except ValueError:
            raise ValueError(f"{kind} takes integer X Y, got {' '.join(args)!r}") from None
        return ScriptEvent(at, kind, x=x, y=y, line=line)
    raise ValueError(f"unknown event {kind!r} (key, mouse_down, mouse_move or mouse_up)")


def parse_script(text: str, name: str = "script") -> list[ScriptEvent]:
    """The whole script, checked; raises :class:`ScriptError` at the first bad line."""
    events: list[ScriptEvent] = []
    for n, raw in enumerate(text.splitlines(), 1):
        try:
            ev = parse_line(raw, n)
        except ValueError as exc:
            raise ScriptError(f"{name} line {n}: {exc}") from None
        if ev is None:
            continue
        if events and ev.at < events[-1].at:
            raise ScriptError(f"{name} line {n}: time {ev.at:g} goes back (previous {events[-1].at:g})")
        events.append(ev)
    return events


def load_script(path: str | Path) -> list[ScriptEvent]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"cannot read script {path}: {exc}") from None
    return parse_script(text, str(path))


class ScriptPlayer(threading.Thread):
    """Sends the events at their times, counted from ``started`` being set (the first frame)."""

    def __init__(
        self,
        events: list[ScriptEvent],
        send: Callable[..., object],
        started: threading.Event,
        stop: threading.Event,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(name="script", daemon=True)
        self.events = events
        self.send = send
        self.started = started
        self.stop_event = stop
        self.clock = clock
        self.sent = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.started.wait(0.1):
            if self.stop_event.is_set():
                return
        t0 = self.clock()
        for ev in self.events:
            if self.stop_event.wait(max(0.0, t0 + ev.at - self.clock())):
                return
            self.send(ev.type, **ev.fields())
            self.sent += 1
        log.info("script: all %d events sent", self.sent)
        self.done.set()
