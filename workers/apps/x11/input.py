"""XTEST input: key names and modifiers (:func:`parse_key`), characters (:func:`char_to_keysym`),
text, pointer and wheel checks (:func:`check_point`; they raise :class:`InputError` subclasses),
and :class:`InputMixin`, which applies events and maps missing keysyms onto spare keycodes."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

from Xlib import XK, X
from Xlib import error as xerror
from Xlib.ext import xtest

from cloudq.wire import InputEvent

from .errors import (
    BadEventError,
    DisplayError,
    InputError,
    OffScreenError,
    UnknownKeyError,
    UnmappableKeyError,
)

logger = logging.getLogger(__package__)  # cloudq.workers.apps.x11, as before the split

__all__ = ["InputMixin", "char_to_keysym", "check_point", "parse_key"]

# input validation (pure functions; they raise InputError subclasses)

MODIFIERS: dict[str, str] = {
    "shift": "Shift_L",
    "ctrl": "Control_L",
    "control": "Control_L",
    "alt": "Alt_L",
    "meta": "Meta_L",
    "super": "Super_L",
    "win": "Super_L",
    "cmd": "Super_L",
    "altgr": "ISO_Level3_Shift",
}

# browser KeyboardEvent.key names (and a few common spellings) that differ from X keysym names
KEY_ALIASES: dict[str, str] = {
    "Enter": "Return",
    "Backspace": "BackSpace",
    "Esc": "Escape",
    "Del": "Delete",
    "ArrowUp": "Up",
    "ArrowDown": "Down",
    "ArrowLeft": "Left",
    "ArrowRight": "Right",
    "PageUp": "Prior",
    "PageDown": "Next",
    "Spacebar": "space",
    "Space": "space",
    "Control": "Control_L",
    "Shift": "Shift_L",
    "Alt": "Alt_L",
    "Meta": "Super_L",
    "OS": "Super_L",
    "AltGraph": "ISO_Level3_Shift",
    "CapsLock": "Caps_Lock",
    "NumLock": "Num_Lock",
    "ScrollLock": "Scroll_Lock",
    "ContextMenu": "Menu",
}

_CONTROL_CHARS = {"\n": XK.XK_Return, "\r": XK.XK_Return, "\t": XK.XK_Tab, "\b": XK.XK_BackSpace}
MAX_TEXT_CHARS = 4096
MAX_WHEEL_CLICKS = 20
BUTTONS = (1, 2, 3)


_UNICODE_NAME = re.compile(r"U[0-9A-Fa-f]{4,6}")
_MISSING_KEYSYMS = {"EuroSign": 0x20AC}
"""Keysyms of X's keysymdef.h that python-xlib's tables lack (its ``XK`` has no currency group):
the page sends ``EuroSign`` for the euro sign, which was dropped as an unknown key."""


def char_to_keysym(ch: str) -> int:
    """The keysym that types ``ch``: Latin-1 keysyms equal the code point, others are ``0x01000000 + cp``."""
    if len(ch) != 1:
        raise UnknownKeyError(f"not a single character: {ch!r}")
    if ch in _CONTROL_CHARS:
        return _CONTROL_CHARS[ch]
    cp = ord(ch)
    if cp < 0x20 or 0x7F <= cp < 0xA0 or 0xD800 <= cp < 0xE000:
        raise UnknownKeyError(f"control or surrogate character {cp:#x} cannot be typed")
    return cp if cp <= 0xFF else 0x01000000 | cp


def _name_to_keysym(name: str) -> int:
    if len(name) == 1:
        return char_to_keysym(name)
    if _UNICODE_NAME.fullmatch(name):
        # Xlib's "U20AC" names (what the page sends for characters beyond Latin-1): python-xlib's
        # string_to_keysym does not know them
        cp = int(name[1:], 16)
        if cp > 0x10FFFF:
            raise UnknownKeyError(f"unknown key {name!r}")
        return char_to_keysym(chr(cp))
    if name in _MISSING_KEYSYMS:
        return _MISSING_KEYSYMS[name]
    sym = XK.string_to_keysym(KEY_ALIASES.get(name, name))
    if sym == X.NoSymbol:
        raise UnknownKeyError(f"unknown key {name!r}")
    return int(sym)


def parse_key(spec: str) -> tuple[list[int], int]:
    """``"ctrl+shift+Tab"`` -> (modifier keysyms, keysym). Raises :class:`UnknownKeyError`.

    The key is an X keysym name (``a``, ``A``, ``Return``, ``F5``), a single character (``+``, ``é``)
    or a browser key name (``Enter``, ``ArrowLeft``); modifiers are ``shift``, ``ctrl``, ``alt``,
    ``meta``, ``super``, ``altgr`` (any case). ``"+"`` and ``"ctrl++"`` name the plus key.
    """
    if not isinstance(spec, str) or not spec or len(spec) > 64:
        raise UnknownKeyError(f"bad key spec {spec!r}")
    if len(spec) == 1:
        return [], char_to_keysym(spec)
    if spec.endswith("++"):
        mods, key = spec[:-2].split("+"), "+"
    else:
        *mods, key = spec.split("+")
    mod_syms: list[int] = []
    for m in mods:
        name = MODIFIERS.get(m.lower())
        if name is None:
            raise UnknownKeyError(f"unknown modifier {m!r} in {spec!r}")
        mod_syms.append(int(XK.string_to_keysym(name)))
    if not key:
        raise UnknownKeyError(f"no key in {spec!r}")
    return mod_syms, _name_to_keysym(key)


def check_point(x: Any, y: Any, width: int, height: int) -> tuple[int, int]:
    """Validate pointer coordinates; raises :class:`OffScreenError` outside ``[0,w) x [0,h)``."""
    if not isinstance(x, int) or not isinstance(y, int) or isinstance(x, bool) or isinstance(y, bool):
        raise BadEventError(f"pointer coordinates must be integers, got {x!r}, {y!r}")
    if not (0 <= x < width and 0 <= y < height):
        raise OffScreenError(f"({x}, {y}) is outside the {width}x{height} screen")
    return x, y


def _check_button(button: Any) -> int:
    b = 1 if button is None else button
    if b not in BUTTONS or isinstance(b, bool):
        raise BadEventError(f"button must be one of {BUTTONS}, got {button!r}")
    return int(b)


def _check_clicks(value: Any, name: str) -> int:
    v = 0 if value is None else value
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadEventError(f"{name} must be an integer, got {value!r}")
    return max(-MAX_WHEEL_CLICKS, min(MAX_WHEEL_CLICKS, v))


class InputMixin:
    """The input side of :class:`X11App` (its state is set in ``X11App.__init__``)."""

    # -- input ---------------------------------------------------------------------------------------
    def handle_input(self, ev: InputEvent) -> None:
        """Apply one event through XTEST. Invalid events are logged, counted and dropped; only a lost
        display raises (:class:`DisplayError`)."""
        if self._d is None:
            self.counters["input_dropped"] += 1
            return
        try:
            self._drain()
            self._apply(ev)
            self._d.flush()
            self.counters["input_applied"] += 1
        except (xerror.ConnectionClosedError, OSError) as e:
            raise DisplayError(f"lost the display: {e}") from None
        except InputError as e:
            self.counters["input_dropped"] += 1
            self.counters[f"input_dropped_{type(e).__name__}"] += 1
            logger.info("dropped input %s (seq %s): %s", getattr(ev, "type", "?"), getattr(ev, "seq", "?"), e)

    def _apply(self, ev: InputEvent) -> None:
        kind = getattr(ev, "type", None)
        if kind == "key":
            mods, sym = parse_key(self._need_str(ev.key, "key"))
            self._tap(mods, sym)
        elif kind == "key_down":
            mods, sym = parse_key(self._need_str(ev.key, "key"))
            for m in mods:
                self._press(self._keycode(m)[0])
            keycode, shift = self._keycode(sym)
            if shift and not mods and not self._shift_held():
                # a character at the Shift level of the layout ("~", "|", "@" on a US one) whose
                # event came without a Shift press (other layouts, AltGr, IME, password managers):
                # add Shift for this key only, released right after it
                shift_code = self._keycode(XK.XK_Shift_L)[0]
                self._press(shift_code)
                self._press(keycode)
                self._release(shift_code)
            else:
                self._press(keycode)
        elif kind == "key_up":
            mods, sym = parse_key(self._need_str(ev.key, "key"))
            for m in [sym, *reversed(mods)]:
                self._release(self._keycode(m)[0])
        elif kind == "text":
            text = getattr(ev, "text", None)
            self._type(self._need_str(text if text is not None else ev.key, "text"))
        elif kind == "clipboard":
            self._set_clipboard(ev)  # type: ignore[attr-defined]
        elif kind == "mouse_move":
            self._move(*check_point(ev.x, ev.y, self._screen_w, self._screen_h))
        elif kind == "mouse_down":
            button = _check_button(ev.button)
            self._move(*check_point(ev.x, ev.y, self._screen_w, self._screen_h))
            xtest.fake_input(self._d, X.ButtonPress, button)
            self._held_buttons.add(button)
        elif kind == "mouse_up":
            button = _check_button(ev.button)
            try:
                self._move(*check_point(ev.x, ev.y, self._screen_w, self._screen_h))
            except OffScreenError:
                self.counters["mouse_up_off_screen"] += 1  # still release, or the button sticks
            xtest.fake_input(self._d, X.ButtonRelease, button)
            self._held_buttons.discard(button)
        elif kind == "wheel":
            dx, dy = (
                _check_clicks(getattr(ev, "dx", None), "dx"),
                _check_clicks(getattr(ev, "dy", None), "dy"),
            )
            if ev.x is not None or ev.y is not None:
                self._move(*check_point(ev.x, ev.y, self._screen_w, self._screen_h))
            for button, n in ((5 if dy > 0 else 4, abs(dy)), (7 if dx > 0 else 6, abs(dx))):
                for _ in range(n):
                    xtest.fake_input(self._d, X.ButtonPress, button)
                    xtest.fake_input(self._d, X.ButtonRelease, button)
        else:
            raise BadEventError(f"unknown input type {kind!r}")

    @staticmethod
    def _need_str(value: Any, name: str) -> str:
        if not isinstance(value, str) or not value:
            raise BadEventError(f"event without {name}")
        if len(value) > MAX_TEXT_CHARS:
            raise BadEventError(f"{name} longer than {MAX_TEXT_CHARS} characters")
        return value

    def _move(self, x: int, y: int) -> None:
        xtest.fake_input(self._d, X.MotionNotify, detail=0, root=self._root, x=x, y=y)

    def _press(self, keycode: int) -> None:
        xtest.fake_input(self._d, X.KeyPress, keycode)
        self._held_keys.append(keycode)

    def _release(self, keycode: int) -> None:
        xtest.fake_input(self._d, X.KeyRelease, keycode)
        with contextlib.suppress(ValueError):
            self._held_keys.remove(keycode)

    def _shift_held(self) -> bool:
        shifts = {self._keycode(XK.XK_Shift_L)[0], self._keycode(XK.XK_Shift_R)[0]}
        return any(kc in shifts for kc in self._held_keys)

    def _release_all(self) -> None:
        for kc in reversed(self._held_keys):
            xtest.fake_input(self._d, X.KeyRelease, kc)
        for b in self._held_buttons:
            xtest.fake_input(self._d, X.ButtonRelease, b)
        self._held_keys.clear()
        self._held_buttons.clear()

    def _tap(self, mods: list[int], sym: int) -> None:
        """Press modifiers, the key (with Shift if its keycode needs it), release in reverse order."""
        keycode, shift = self._keycode(sym)
        codes = [self._keycode(m)[0] for m in mods]
        if shift:
            shift_code = self._keycode(XK.XK_Shift_L)[0]
            if shift_code not in codes:
                codes.append(shift_code)
        for kc in codes:
            self._press(kc)
        self._press(keycode)
        self._release(keycode)
        for kc in reversed(codes):
            self._release(kc)

    def _type(self, text: str) -> None:
        typed = skipped = 0
        for ch in text:
            try:
                self._tap([], char_to_keysym(ch))
                typed += 1
            except InputError as e:
                skipped += 1
                logger.warning("cannot type %r: %s", ch, e)
        self.counters["chars_typed"] += typed
        self.counters["chars_skipped"] += skipped
        if not typed and skipped:
            raise UnmappableKeyError(f"none of the {skipped} characters could be typed")

    # -- keyboard mapping --------------------------------------------------------------------------
    def _init_keymap(self) -> None:
        assert self._d is not None
        lo, hi = self._d.display.info.min_keycode, self._d.display.info.max_keycode
        mapping = self._d.get_keyboard_mapping(lo, hi - lo + 1)
        # keycodes with no symbols at all, from the top (low ones are the "real" keys of the layout)
        self._spare_keycodes = [lo + i for i, syms in enumerate(mapping) if not any(syms)][::-1]
        self._remapped.clear()
        logger.debug("%d spare keycodes", len(self._spare_keycodes))

    def _keycode(self, keysym: int) -> tuple[int, bool]:
        """(keycode, needs Shift) for a keysym, remapping a spare keycode if the layout lacks it."""
        assert self._d is not None
        if keysym in self._remapped:
            return self._remapped[keysym], False
        best: tuple[int, int] | None = None
        for keycode, index in self._d.keysym_to_keycodes(keysym):
            if index in (0, 1) and (best is None or index < best[1]):
                best = (keycode, index)
        if best is not None:
            return best[0], best[1] == 1
        return self._remap(keysym), False

    def _remap(self, keysym: int) -> int:
        assert self._d is not None
        if not self._spare_keycodes and not self._remapped:
            raise UnmappableKeyError(f"keysym {keysym:#x} has no keycode and there is no spare keycode")
        if self._spare_keycodes:
            keycode = self._spare_keycodes.pop()
        else:  # reuse the least recently mapped spare keycode
            old = next(iter(self._remapped))
            keycode = self._remapped.pop(old)
        self._d.change_keyboard_mapping(keycode, [(keysym, keysym)])
        self._remapped[keysym] = keycode
        self.counters["keys_remapped"] += 1
        logger.debug("mapped keysym %#x onto keycode %d", keysym, keycode)
        return keycode
