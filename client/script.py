"""Scripted input for headless sessions (``cloudq connect --script FILE``).

One event per line: seconds since the stream started (the first decoded frame), then the event::

    # draw a blue line
    0.0  key 4
    0.5  mouse_down 100 200
    0.6  mouse_move 150 200
    0.7  mouse_up 200 200

    # a real program (x11:xterm): type a command, run it, scroll, interrupt
    1.0  text echo hello-cloudq > note.txt
    1.5  key Return
    2.0  wheel 0 3
    2.5  key ctrl+c
    3.0  key_down shift
    3.1  key_up shift

``key K`` presses and releases one key, ``key_down K`` / ``key_up K`` press or release it: K is an X
keysym name (``a``, ``Return``, ``Delete``, ``F5``) or the character itself (``+``), with modifiers
(``ctrl+c``, ``shift+Tab``, ``alt+F4``). ``text STRING`` types the rest of the line as it is (a
``#`` there is typed, not a comment; surrounding spaces are dropped). ``wheel DX DY`` scrolls by
integer steps (positive DY scrolls down). The mouse events take integer frame pixels ``X Y``.
``#`` starts a comment; blank lines are skipped. Times must not go backwards.
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

from cloudq.wire import MAX_KEY_CHARS, MAX_TEXT_CHARS, MAX_WHEEL_STEPS

log = logging.getLogger(__name__)

MOUSE = ("mouse_down", "mouse_move", "mouse_up")
KEYS = ("key", "key_down", "key_up")
EVENTS = (*KEYS, "text", "wheel", *MOUSE)


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
    text: str | None = None
    dx: int | None = None
    dy: int | None = None

    def fields(self) -> dict[str, object]:
        """Keyword arguments for :meth:`InputSender.send`."""
        if self.type in KEYS:
            return {"key": self.key}
        if self.type == "text":
            return {"text": self.text}
        if self.type == "wheel":
            return {"dx": self.dx, "dy": self.dy}
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
    rest = ""
    if len(words) >= 2 and words[1] == "text":  # the rest of the line, '#' included
        full = text.split(None, 2)
        words = words[:2]
        rest = full[2].strip() if len(full) > 2 else ""
    try:
        at = float(words[0])
    except ValueError:
        raise ValueError(f"expected seconds first, got {words[0]!r}") from None
    if not math.isfinite(at) or at < 0:
        raise ValueError(f"time must be a finite number >= 0, got {words[0]!r}")
    if len(words) < 2:
        raise ValueError("missing the event after the time")
    kind, args = words[1], words[2:]
    if kind in KEYS:
        if len(args) != 1:
            raise ValueError(f"{kind} takes exactly one key name, e.g. '{kind} a' or '{kind} ctrl+c'")
        if len(args[0]) > MAX_KEY_CHARS:
            raise ValueError(f"key name longer than {MAX_KEY_CHARS} characters")
        return ScriptEvent(at, kind, key=args[0], line=line)
    if kind == "text":
        if not rest:
            raise ValueError("text takes the string to type, e.g. 'text hello'")
        if len(rest) > MAX_TEXT_CHARS:
            raise ValueError(f"text longer than {MAX_TEXT_CHARS} characters")
        return ScriptEvent(at, "text", text=rest, line=line)
    if kind == "wheel":
        try:
            dx, dy = (int(a) for a in args)
        except ValueError:
            raise ValueError(f"wheel takes integer DX DY, e.g. 'wheel 0 3', got {' '.join(args)!r}") from None
        if not (dx or dy) or max(abs(dx), abs(dy)) > MAX_WHEEL_STEPS:
            raise ValueError(f"wheel DX DY must not both be 0 and stay within +-{MAX_WHEEL_STEPS}")
        return ScriptEvent(at, "wheel", dx=dx, dy=dy, line=line)
    if kind in MOUSE:
        if len(args) != 2:
            raise ValueError(f"{kind} takes X Y, e.g. '{kind} 100 200'")
        try:
            x, y = _coord(args[0]), _coord(args[1])
        except ValueError:
            raise ValueError(f"{kind} takes integer X Y, got {' '.join(args)!r}") from None
        return ScriptEvent(at, kind, x=x, y=y, line=line)
    raise ValueError(f"unknown event {kind!r} ({', '.join(EVENTS)})")


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
