"""The interactive program a node runs for its user, and the built-in ones.

An app renders RGB frames (numpy, H x W x 3 uint8), takes input events, says whether its picture
changed since the last render (so an idle app costs no encode), and keeps its state in the user's
data directory (``load`` on mount, ``save`` before close). Built-ins:

- ``paint``: draw with the mouse; keys pick colour and brush size; the canvas persists.
- ``probe``: shows, in blocks that survive H.264, the seq of the last input it applied and a frame
  counter; :func:`read_probe` reads them back from a decoded frame (for latency measurements).

Real programs: ``"x11:COMMAND"`` runs COMMAND (shell-split) on the node's X display, one run per
session (:mod:`cloudq.workers.apps.x11`; imported only for such specs).

Third-party apps are named ``"package.module:Class"`` and built as ``Class(width, height)``.

A node makes its apps with :func:`app_factory`: the factory is checked once when the node starts
(a bad spec fails then, not at login), makes one app per session, and owns what the apps share (the
X display) until :meth:`AppFactory.close`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .base import App
from .paint import PaintApp
from .probe import ProbeApp

__all__ = ["APPS", "App", "AppFactory", "PaintApp", "ProbeApp", "app_factory", "load_app"]

APPS: dict[str, type[App]] = {"paint": PaintApp, "probe": ProbeApp}
_REQUIRED = ("render", "handle_input", "changed", "load", "save")
X11_PREFIX = "x11:"


class AppFactory:
    """Makes one app per session for a node; ``close()`` releases what they share."""

    def __init__(self, make: Callable[[], App], close: Callable[[], None] | None = None) -> None:
        self._make = make
        self._close = close

    def __call__(self) -> App:
        return self._make()

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def app_factory(
    spec: str,
    width: int,
    height: int,
    display: str | None = None,
    sandbox: Any = None,
    max_size: tuple[int, int] | None = None,
) -> AppFactory:
    """The factory of a node's ``--app`` (``display``: an existing X display for ``x11:`` apps;
    ``sandbox``: how their programs are confined, a :class:`~.x11.sandbox.SandboxConfig`, None for
    the default sandbox; ``max_size``: the largest size an ``x11:`` session's display may be
    resized to, see :mod:`.x11.screen`; the built-in apps keep their size).

    Raises ``ValueError`` saying what is wrong (unknown spec, command not found, no Xvfb...).
    """
    if isinstance(spec, str) and spec.strip().startswith(X11_PREFIX):
        from .x11 import X11Error, X11Factory  # python-xlib and mss only for real programs

        try:
            f = X11Factory(
                spec.strip()[len(X11_PREFIX) :],
                width,
                height,
                display=display,
                sandbox=sandbox,
                max_size=max_size,
            )
        except X11Error as e:
            raise ValueError(f"app {spec!r}: {e}") from None
        return AppFactory(f, f.close)
    if display:
        raise ValueError(f"--display applies to x11:COMMAND apps only, not {spec!r}")
    load_app(spec, width, height)  # check it once now
    return AppFactory(lambda: load_app(spec, width, height))


def load_app(spec: str, width: int, height: int) -> App:
    """``"paint"``, ``"probe"`` or ``"package.module:Class"`` -> an app of that size.

    Raises ``ValueError`` saying what is wrong with an unknown or unusable spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty app spec {spec!r}")
    spec = spec.strip()
    if spec.startswith(X11_PREFIX):
        raise ValueError(f"{spec!r} needs a node's display: use app_factory()")
    if spec in APPS:
        return APPS[spec](width, height)
    if ":" not in spec:
        raise ValueError(
            f"unknown app {spec!r}: use one of {', '.join(sorted(APPS))} or 'package.module:Class'"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"bad app spec {spec!r}: expected 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"app {spec!r}: cannot import {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"app {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"app {spec!r} is not a class or factory")
    app = obj(width, height)
    missing = [m for m in _REQUIRED if not callable(getattr(app, m, None))]
    if missing:
        raise ValueError(f"app {spec!r} lacks {', '.join(missing)}")
    if getattr(app, "width", None) != width or getattr(app, "height", None) != height:
        raise ValueError(f"app {spec!r} does not report width={width}, height={height}")
    return app
