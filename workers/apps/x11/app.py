"""The app: :class:`X11App` ties a display, the program's process tree, capture and input together;
:class:`X11Factory` is what a node builds for ``--app x11:COMMAND``."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mss
import numpy as np
from Xlib import X
from Xlib import display as xdisplay
from Xlib import error as xerror
from Xlib.ext import damage as xdamage

from ..base import App
from .audio import AudioMixin, PulseServer
from .capture import SETTLE_QUIET, Box, CaptureMixin
from .clipboard import ClipboardMixin
from .display import DisplayManager
from .errors import DisplayError, LaunchError, X11Error
from .input import InputMixin
from .process import ProcessMixin
from .sandbox import Sandbox, SandboxConfig, SandboxHost, preflight
from .screen import ScreenMixin, set_screen_size

logger = logging.getLogger(__package__)  # cloudq.workers.apps.x11, as before the split

__all__ = ["DEFAULT_COMMAND", "X11App", "X11Factory"]

DEFAULT_COMMAND = "xterm"


def _cleanup(what: str, step: Callable[[], object]) -> None:
    """One step of :meth:`X11App.close`: closing goes on if it fails (the display may be gone)."""
    try:
        step()
    except Exception as e:
        logger.debug("%s on close failed: %s", what, e)


class X11App(ClipboardMixin, CaptureMixin, InputMixin, ProcessMixin, AudioMixin, ScreenMixin, App):
    """An X11 program as a cloudq app.

    ``command`` is a command line (shlex-split) or an argv. ``display`` is a :class:`DisplayManager`
    to share (one Xvfb per node, kept across sessions: :class:`X11Factory`), a display name such as
    ``":0"``, or None to start (and on close stop) our own Xvfb of ``width`` x ``height``.

    Input event types: ``key`` (press + release, ``ev.key`` as :func:`parse_key` reads it),
    ``key_down``/``key_up``, ``text`` (``ev.text``, or ``ev.key`` if that is None), ``mouse_move``,
    ``mouse_down``/``mouse_up`` (``ev.button`` 1..3, default 1, at ``ev.x``, ``ev.y``) and ``wheel``
    (``ev.dx``/``ev.dy`` in notches, positive is right/down; at ``ev.x``, ``ev.y`` if given);
    ``clipboard`` (``ev.text`` becomes CLIPBOARD and PRIMARY: :mod:`.clipboard`). :meth:`resize`
    changes the size of a display it started (:mod:`.screen`); each session starts at
    ``width`` x ``height``.

    ``sandbox`` (what :func:`~.sandbox.preflight` found) runs the program in a sandbox of its own
    (:mod:`.sandbox`); None runs it as this process's user, as a library caller may want.
    """

    def __init__(
        self,
        width: int,
        height: int,
        command: str | Sequence[str] | None = None,
        *,
        display: DisplayManager | str | None = None,
        fit_windows: bool = True,
        kill_strays: bool | None = None,
        env: dict[str, str] | None = None,
        term_timeout: float = 2.0,
        settle: float = SETTLE_QUIET,
        sandbox: SandboxHost | None = None,
    ) -> None:
        super().__init__(width, height)
        self.sandbox = sandbox
        self.settle = settle
        command = command if command is not None else DEFAULT_COMMAND
        try:
            self.argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        except ValueError as e:
            raise LaunchError(f"bad command line {command!r}: {e}") from None
        if not self.argv:
            raise LaunchError("empty command")
        if isinstance(display, str):
            display = DisplayManager.existing(display)
        self._xdm = display
        self._owns_xdm = display is None
        # killing every client of a display we did not start could take down someone's desktop
        self.kill_strays = kill_strays if kill_strays is not None else (display is None or display.owned)
        self.fit_windows = fit_windows
        self.extra_env = dict(env or {})
        self.term_timeout = term_timeout
        self.counters: Counter[str] = Counter()

        self._d: xdisplay.Display | None = None
        self._root: Any = None
        self._damage: int | None = None
        self._damage_event = -1
        self._sct: Any = None
        self._screen_w = self._screen_h = 0
        self._frame: np.ndarray | None = None
        self._box: Box | None = None
        self._full = True
        self._damaged: Box | None = None  # what the last render grabbed (None: all of it)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._status: tuple[str, int] | None = None
        self._frozen: set[int] = set()
        self._frozen_cg = False  # the sandbox's cgroup is frozen
        self._sandbox: Sandbox | None = None
        self._pulse: PulseServer | None = None  # the session's sound server (audio.py)
        self._authid: int | None = None  # the session's X cookie (SECURITY extension)
        self._xauth_file: str | None = None  # unconfined: the program's copy of it
        self._limit_checked = 0.0
        self._held_keys: list[int] = []
        self._held_buttons: set[int] = set()
        self._spare_keycodes: list[int] = []
        self._remapped: dict[int, int] = {}  # keysym -> spare keycode, oldest first
        self._fit_budget: dict[int, int] = {}
        self._closed = False
        self._init_clipboard()

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        """The X display the program runs on (after :meth:`load`)."""
        if self._xdm is None:
            raise X11Error("not loaded")
        return self._xdm.name

    def load(self, data_dir: Path) -> None:
        """Connect to (or start) the display, clear it and start the program with ``HOME=data_dir``.

        Raises :class:`LaunchError` if the program cannot be started, :class:`DisplayError` if the
        display cannot be used; either way nothing is left running.
        """
        if self._closed:
            raise X11Error("app already closed")
        if self._proc is not None:
            raise X11Error("already loaded")
        data_dir = Path(data_dir).resolve()
        try:
            self._connect()
            if self.kill_strays:
                self._kill_clients()  # leftovers of a session that was not closed
            self._clear_screen()
            self._spawn(data_dir)
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        if self._xdm is None:
            self._xdm = DisplayManager(self.width, self.height)
        self._xdm.start()
        name = self._xdm.name
        try:
            d = xdisplay.Display(name)
        except (xerror.DisplayError, xerror.ConnectionClosedError, OSError) as e:
            raise DisplayError(f"cannot open display {name}: {e}") from None
        self._d = d
        d.set_error_handler(self._on_x_error)
        for ext in ("DAMAGE", "XTEST"):
            if not d.has_extension(ext):
                raise DisplayError(f"display {name} lacks the {ext} extension")
        d.damage_query_version()  # must precede any other DAMAGE request
        self._damage_event = d.query_extension("DAMAGE").first_event + xdamage.DamageNotifyCode
        screen = d.screen()
        self._root = screen.root
        self._screen_w, self._screen_h = screen.width_in_pixels, screen.height_in_pixels
        if self.resizable and (self._screen_w, self._screen_h) != (self.width, self.height):
            try:  # a session starts at the node's size, whatever the last one left
                self._screen_w, self._screen_h = set_screen_size(d, self._root, self.width, self.height)
            except (xerror.XError, DisplayError) as e:
                logger.warning("cannot set display %s to %dx%d: %s", name, self.width, self.height, e)
        if (self._screen_w, self._screen_h) != (self.width, self.height):
            logger.warning(
                "display %s is %dx%d, frames are %dx%d: cropping/padding",
                name,
                self._screen_w,
                self._screen_h,
                self.width,
                self.height,
            )
        self._root.change_attributes(event_mask=X.SubstructureNotifyMask)
        self._damage = self._root.damage_create(xdamage.DamageReportBoundingBox)
        d.set_input_focus(X.PointerRoot, X.RevertToPointerRoot, X.CurrentTime)
        self._init_keymap()
        self._watch_clipboard()
        d.sync()
        self._sct = mss.MSS(display=name)
        self._full = True

    def save(self, data_dir: Path) -> None:
        """Nothing to do: the program keeps its own files in ``HOME`` (the data directory)."""

    def close(self) -> None:
        """Kill the program (process group, descendants, and any other client still on the display),
        leave a black screen, disconnect; stop our Xvfb if we started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._d is not None:
            _cleanup("releasing held keys and buttons", self._release_all)
        self._kill_program()
        _cleanup("stopping the clipboard's owners", self._stop_clip_owners)
        _cleanup("stopping the sound server", self._stop_audio)
        if self._d is not None:
            try:
                self._revoke_cookie()
                if self.kill_strays:
                    self._kill_clients()
                self._clear_screen()
                if self._damage is not None:
                    self._d.damage_destroy(self._damage)
                self._d.sync()
            except (xerror.XError, xerror.ConnectionClosedError, OSError) as e:
                logger.warning("display cleanup failed: %s", e)
            _cleanup("closing the X connection", self._d.close)
            self._d = None
        if self._sct is not None:
            _cleanup("closing the screen grabber", self._sct.close)
            self._sct = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._owns_xdm and self._xdm is not None:
            self._xdm.stop()
        self._frame = None

    def __enter__(self) -> X11App:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        return dict(self.counters)


# ---------------------------------------------------------------------------------------------------
# the node's factory


class X11Factory:
    """What ``cloudq node --app x11:COMMAND`` builds: one display for the node's life, one
    :class:`X11App` (one run of COMMAND) per session.

    The display is an Xvfb of the node's size started here (it dies with the node: PDEATHSIG), or
    the existing display ``display`` (e.g. ``":0"``; its clients other than ours are left alone).
    ``max_size`` is the largest size a session may resize the display to (default: the size).
    Everything that can be checked before a session is checked here, so a node with a command that
    does not exist or no Xvfb refuses to start with a clear message (:class:`X11Error`).
    """

    def __init__(
        self,
        command: str,
        width: int,
        height: int,
        display: str | None = None,
        sandbox: SandboxConfig | None = None,
        max_size: tuple[int, int] | None = None,
    ) -> None:
        try:
            self.argv = shlex.split(command)
        except ValueError as e:
            raise LaunchError(f"bad command line {command!r}: {e}") from None
        if not self.argv:
            raise LaunchError("x11: needs a command, e.g. x11:xterm or x11:'xclock -update 1'")
        if shutil.which(self.argv[0]) is None:
            raise LaunchError(f"command not found: {self.argv[0]!r} (PATH={os.environ.get('PATH', '')})")
        self.width = width
        self.height = height
        self.config = sandbox or SandboxConfig()
        # raises SandboxError naming what is missing (bubblewrap, user namespaces, cgroups)
        self.sandbox = preflight(self.config) if self.config.confined else None
        if self.sandbox is not None and self.config.network == "host":
            logger.warning(
                "--program-network host: the programs share the host's network: they can reach "
                "Redis and every service listening on this host"
            )
        # our Xvfb is as big as a session may make it (RandR sizes down from there: .screen)
        max_w, max_h = max_size or (width, height)
        max_w, max_h = max(max_w, width), max(max_h, height)
        self.display = DisplayManager.existing(display) if display else DisplayManager(max_w, max_h)
        self.display.start()  # raises DisplayError: no Xvfb, or the display does not answer

    def __call__(self) -> X11App:
        if not self.display.alive():
            logger.warning("Xvfb %s died: starting a new one", self.display._name)
            self.display.stop()
            self.display.start()
        if self.sandbox is None:  # at each session's start (--unconfined)
            logger.warning(
                "UNCONFINED: %s runs as the node's own user with the node's view of the host "
                "(--unconfined): it can read the node's files and reach Redis",
                shlex.join(self.argv),
            )
        return X11App(self.width, self.height, self.argv, display=self.display, sandbox=self.sandbox)

    def close(self) -> None:
        """Stop the Xvfb this factory started (an existing display is left running)."""
        self.display.stop()
