"""The exceptions of the x11 package: :class:`X11Error` (display, program) and :class:`InputError`
(bad input events, which :meth:`X11App.handle_input` logs, counts and drops)."""

from __future__ import annotations

__all__ = [
    "BadEventError",
    "DisplayError",
    "InputError",
    "LaunchError",
    "OffScreenError",
    "UnknownKeyError",
    "UnmappableKeyError",
    "X11Error",
]


class X11Error(RuntimeError):
    """Something about the X display or the program went wrong."""


class DisplayError(X11Error):
    """The X server could not be started or reached, or lacks a needed extension."""


class LaunchError(X11Error):
    """The program could not be started (not found, not executable, bad command line)."""


class InputError(ValueError):
    """An input event that cannot be applied; :meth:`X11App.handle_input` logs, counts and drops it."""


class UnknownKeyError(InputError):
    """A key name that is not an X keysym (or a malformed ``mod+key`` combination)."""


class UnmappableKeyError(InputError):
    """A valid keysym that has no keycode and no spare keycode could be found for it."""


class OffScreenError(InputError):
    """Pointer coordinates outside the screen."""


class BadEventError(InputError):
    """An event of an unknown type or with missing or out-of-range fields."""
