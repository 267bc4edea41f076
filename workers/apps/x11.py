"""Run an ordinary X11 program as a cloudq app: a virtual display, damage-driven capture, XTEST input.

Pieces:

- :class:`DisplayManager` starts an ``Xvfb`` (free display number learnt through ``-displayfd``; the
  server is killed by the kernel if the process that started it dies) or wraps an existing display.
- :class:`X11App` runs one program on such a display for one session: its own process group,
  ``HOME`` and the XDG directories inside the user's data directory, no window manager (its
  top-level windows are moved and resized to fill the screen), capture through XDAMAGE + MIT-SHM
  (only the damaged bounding box is grabbed), input through XTEST, freeze on sleep (SIGSTOP of the
  whole process tree) and a thorough :meth:`X11App.close` that leaves a black screen behind.

Threading: an :class:`X11App` owns one python-xlib connection and one MIT-SHM grabber; neither is
thread-safe, so every method must be called from the same thread (the node loop). Another thread
that needs the display must open its own connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import pwd
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import mss
import numpy as np
from Xlib import XK, X
from Xlib import display as xdisplay
from Xlib import error as xerror
from Xlib.ext import damage as xdamage
from Xlib.ext import xtest

from cloudq.wire import InputEvent

from .base import App

logger = logging.getLogger(__name__)

__all__ = [
    "BadEventError",
    "DisplayError",
    "DisplayManager",
    "InputError",
    "LaunchError",
    "OffScreenError",
    "UnknownKeyError",
    "UnmappableKeyError",
    "X11App",
    "X11Error",
    "char_to_keysym",
    "check_point",
    "cpu_seconds",
    "parse_key",
    "process_tree",
]

# ---------------------------------------------------------------------------------------------------
# errors


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


# ---------------------------------------------------------------------------------------------------
# process helpers

_PR_SET_PDEATHSIG = 1
_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def _die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get ``sig`` when its parent dies.

    Note: PR_SET_PDEATHSIG fires when the *thread* that forked exits, so start children from a
    long-lived thread (the node loop's).
    """
    libc = _libc()  # resolved before fork: no dlopen in the child

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _read_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, utime+stime ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()  # comm may contain spaces and parentheses
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15
    return rest[0], int(rest[1]), int(rest[2]), int(rest[11]) + int(rest[12])


def _all_stats() -> dict[int, tuple[str, int, int, int]]:
    out: dict[int, tuple[str, int, int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def process_tree(pid: int, pgid: int | None = None) -> set[int]:
    """Live (non-zombie) processes that descend from ``pid`` or belong to process group ``pgid``.

    Descendants are followed through parent links, so programs that start their own session (xterm
    runs its shell in a new session) are included as long as their parent is still alive.
    """
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for p, (_, ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    found: set[int] = set()
    todo = [pid] if pid in stats else []
    if pgid is not None:
        todo += [p for p, (_, _, grp, _) in stats.items() if grp == pgid]
    while todo:
        p = todo.pop()
        if p in found:
            continue
        found.add(p)
        todo.extend(children.get(p, ()))
    return {p for p in found if stats[p][0] not in ("Z", "X")}


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by the given processes (gone ones count 0)."""
    ticks = 0
    for p in pids:
        st = _read_stat(p)
        if st is not None:
            ticks += st[3]
    return ticks / os.sysconf("SC_CLK_TCK")


def _alive(pid: int) -> bool:
    st = _read_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass; returns its last value."""
    end = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


# ---------------------------------------------------------------------------------------------------
# display manager


class DisplayManager:
    """An X display for programs to run on: our own ``Xvfb``, or an existing display.

    ``DisplayManager(1280, 720).start()`` runs ``Xvfb -displayfd FD -screen 0 1280x720x24 -nolisten tcp``
    (black root, no reset when the last client leaves) and waits until it accepts connections;
    ``DisplayManager.existing(":0")`` uses a display someone else runs (``stop`` leaves it alone).
    """

    def __init__(
        self,
        width: int,
        height: int,
        depth: int = 24,
        *,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 10.0,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"bad screen size {width}x{height}")
        self.width = width
        self.height = height
        self.depth = depth
        self._name = name
        self.owned = name is None
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @classmethod
    def existing(cls, name: str | None = None) -> DisplayManager:
        """Use a display that is already running (default ``$DISPLAY``); its size is read on start."""
        name = name or os.environ.get("DISPLAY")
        if not name:
            raise DisplayError("no display name given and DISPLAY is not set")
        return cls(1, 1, name=name)

    @property
    def name(self) -> str:
        """The display name, e.g. ``":3"`` (only known once started for an owned Xvfb)."""
        if self._name is None:
            raise DisplayError("display not started")
        return self._name

    def __enter__(self) -> DisplayManager:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def alive(self) -> bool:
        """Whether our Xvfb still runs (always True for an existing display)."""
        return not self.owned or (self.proc is not None and self.proc.poll() is None)

    def start(self) -> DisplayManager:
        """Start Xvfb (owned) or check that the existing display answers. Returns self."""
        if not self.owned:
            self._probe_existing()
            return self
        if self.proc is not None and self.proc.poll() is None:
            return self
        xvfb = shutil.which("Xvfb")
        if xvfb is None:
            raise DisplayError("Xvfb not found (Debian package: xvfb)")
        rfd, wfd = os.pipe()
        self._log = tempfile.TemporaryFile(prefix="xvfb-")  # noqa: SIM115 - lives as long as Xvfb
        argv = [
            xvfb,
            "-displayfd",
            str(wfd),
            "-screen",
            "0",
            f"{self.width}x{self.height}x{self.depth}",
            "-nolisten",
            "tcp",
            "-noreset",
            "-br",  # black root window: an empty screen is black, not the stipple pattern
            *self.extra_args,
        ]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                pass_fds=(wfd,),
                start_new_session=True,  # a Ctrl-C on the node's terminal is the node's business
                preexec_fn=_die_with_parent(os.getpid()),
            )
        finally:
            os.close(wfd)
        try:
            number = self._read_display_number(rfd)
        finally:
            os.close(rfd)
        self._name = f":{number}"
        logger.info("Xvfb %s started (pid %d, %dx%d)", self._name, self.proc.pid, self.width, self.height)
        return self

    def _read_display_number(self, rfd: int) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise DisplayError(f"Xvfb did not report a display within {self.start_timeout:.0f} s")
            ready, _, _ = select.select([rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(rfd, 64)
            if not chunk:  # Xvfb exited
                tail = self._log_tail()
                self.stop()
                raise DisplayError(f"Xvfb exited at start: {tail}")
            buf += chunk
        return int(buf.strip())

    def _log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._log.seek(0)
            return self._log.read()[-limit:].decode("utf-8", "replace").strip()
        return ""

    def _probe_existing(self) -> None:
        try:
            d = xdisplay.Display(self.name)
        except (xerror.DisplayError, xerror.ConnectionClosedError, OSError) as e:
            raise DisplayError(f"cannot open display {self.name}: {e}") from None
        try:
            screen = d.screen()
            self.width, self.height, self.depth = (
                screen.width_in_pixels,
                screen.height_in_pixels,
                screen.root_depth,
            )
        finally:
            d.close()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop our Xvfb (SIGTERM, then SIGKILL); an existing display is left running."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
            logger.info("Xvfb %s stopped", self._name)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.owned:
            self._name = None


# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# the app

DEFAULT_COMMAND = "xterm"
SETTLE_QUIET = 0.0005
SETTLE_MAX = 0.005
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def _union(a: Box | None, b: Box) -> Box:
    if a is None:
        return b
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


class X11App(App):
    """An X11 program as a cloudq app.

    ``command`` is a command line (shlex-split) or an argv. ``display`` is a :class:`DisplayManager`
    to share (one Xvfb per node, kept across sessions: :class:`X11Factory`), a display name such as
    ``":0"``, or None to start (and on close stop) our own Xvfb of ``width`` x ``height``.

    Input event types: ``key`` (press + release, ``ev.key`` as :func:`parse_key` reads it),
    ``key_down``/``key_up``, ``text`` (``ev.text``, or ``ev.key`` if that is None), ``mouse_move``,
    ``mouse_down``/``mouse_up`` (``ev.button`` 1..3, default 1, at ``ev.x``, ``ev.y``) and ``wheel``
    (``ev.dx``/``ev.dy`` in notches, positive is right/down; at ``ev.x``, ``ev.y`` if given).
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
    ) -> None:
        super().__init__(width, height)
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
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._status: tuple[str, int] | None = None
        self._frozen: set[int] = set()
        self._held_keys: list[int] = []
        self._held_buttons: set[int] = set()
        self._spare_keycodes: list[int] = []
        self._remapped: dict[int, int] = {}  # keysym -> spare keycode, oldest first
        self._fit_budget: dict[int, int] = {}
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        """The X display the program runs on (after :meth:`load`)."""
        if self._xdm is None:
            raise X11Error("not loaded")
        return self._xdm.name

    @property
    def pid(self) -> int | None:
        """The program's pid (its process group id too), or None before :meth:`load`."""
        return self._proc.pid if self._proc is not None else None

    def pids(self) -> set[int]:
        """The program's live processes: its process group and all descendants."""
        return process_tree(self._proc.pid, self._proc.pid) if self._proc is not None else set()

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
        d.sync()
        self._sct = mss.MSS(display=name)
        self._full = True

    def _spawn(self, data_dir: Path) -> None:
        assert self._xdm is not None
        xdg = {
            "XDG_CONFIG_HOME": data_dir / ".config",
            "XDG_DATA_HOME": data_dir / ".local" / "share",
            "XDG_CACHE_HOME": data_dir / ".cache",
            "XDG_STATE_HOME": data_dir / ".local" / "state",
        }
        for p in xdg.values():
            p.mkdir(parents=True, exist_ok=True)
        # a minimal environment: the node's own (service credentials and all) stays out of the program
        env = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LANGUAGE", "TZ") or k.startswith("LC_")
        }
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        try:
            pw = pwd.getpwuid(os.getuid())
            env.update(USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell or "/bin/sh")
        except KeyError:
            env["SHELL"] = "/bin/sh"
        env.update({k: str(v) for k, v in xdg.items()})
        env.update(HOME=str(data_dir), DISPLAY=self._xdm.name, **self.extra_env)
        exe = shutil.which(self.argv[0], path=env["PATH"])
        if exe is None:
            raise LaunchError(f"command not found: {self.argv[0]!r} (PATH={env['PATH']})")
        self._stderr = tempfile.TemporaryFile(prefix="x11app-")  # noqa: SIM115 - as long as the program
        try:
            self._proc = subprocess.Popen(
                [exe, *self.argv[1:]],
                cwd=data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session and process group (pgid == pid)
                preexec_fn=_die_with_parent(os.getpid()),
                close_fds=True,
            )
        except OSError as e:
            raise LaunchError(f"cannot start {self.argv[0]!r}: {e}") from None
        logger.info(
            "started %s (pid %d) on %s, HOME=%s",
            shlex.join(self.argv),
            self._proc.pid,
            self._xdm.name,
            data_dir,
        )

    def save(self, data_dir: Path) -> None:
        """Nothing to do: the program keeps its own files in ``HOME`` (the data directory)."""

    def close(self) -> None:
        """Kill the program (process group, descendants, and any other client still on the display),
        leave a black screen, disconnect; stop our Xvfb if we started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._d is not None:
            with contextlib.suppress(Exception):
                self._release_all()
        self._kill_program()
        if self._d is not None:
            try:
                if self.kill_strays:
                    self._kill_clients()
                self._clear_screen()
                if self._damage is not None:
                    self._d.damage_destroy(self._damage)
                self._d.sync()
            except (xerror.XError, xerror.ConnectionClosedError, OSError) as e:
                logger.warning("display cleanup failed: %s", e)
            with contextlib.suppress(Exception):
                self._d.close()
            self._d = None
        if self._sct is not None:
            with contextlib.suppress(Exception):
                self._sct.close()
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

    def _kill_program(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self.exit_status()  # record a natural exit before we cause one
        pids = process_tree(proc.pid, proc.pid)  # before the leader dies and orphans move to init
        if pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            _signal_all(pids, signal.SIGTERM)
            _signal_all(pids, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
            self._frozen.clear()
            if not _wait_until(
                lambda: proc.poll() is not None and not any(_alive(p) for p in pids), self.term_timeout
            ):
                left = {p for p in pids if _alive(p)}
                logger.info("program did not exit on SIGTERM: SIGKILL to %s", sorted(left))
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _signal_all(left, signal.SIGKILL)
        try:
            proc.wait(self.term_timeout)
        except subprocess.TimeoutExpired:
            logger.error("program pid %d survived SIGKILL", proc.pid)

    def _kill_clients(self) -> None:
        """XKillClient on the owner of every top-level window not ours; wait until they are gone."""
        assert self._d is not None
        info = self._d.display.info
        mine = info.resource_id_base & ~info.resource_id_mask

        def strays() -> list[Any]:
            tree = self._root.query_tree()
            return [w for w in tree.children if (w.id & ~info.resource_id_mask) != mine]

        windows = strays()
        if not windows:
            return
        for w in windows:
            w.kill_client()
        self._d.sync()
        self.counters["clients_killed"] += len({w.id & ~info.resource_id_mask for w in windows})
        if not _wait_until(lambda: not strays(), 2.0):
            logger.warning(
                "windows still on the display after XKillClient: %s", [hex(w.id) for w in strays()]
            )
        self._drain()

    def _clear_screen(self) -> None:
        assert self._d is not None
        screen = self._d.screen()
        self._root.change_attributes(background_pixel=screen.black_pixel)
        self._root.clear_area(0, 0, 0, 0, exposures=False)
        self._d.set_input_focus(X.PointerRoot, X.RevertToPointerRoot, X.CurrentTime)
        self._d.sync()
        self._full = True

    # -- sleep / exit ----------------------------------------------------------------------------
    def sleep(self, freeze: bool = False) -> None:
        """Release held keys and buttons; with ``freeze``, SIGSTOP the program's whole process tree."""
        if self._d is not None:
            with contextlib.suppress(xerror.XError, xerror.ConnectionClosedError, OSError):
                self._release_all()
                self._d.sync()
        if not freeze or self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGSTOP)
        # stopped processes cannot fork, so a few passes catch children forked meanwhile
        for _ in range(4):
            new = process_tree(self._proc.pid, self._proc.pid) - self._frozen
            if not new:
                break
            _signal_all(new, signal.SIGSTOP)
            self._frozen |= new
        logger.debug("froze %d processes", len(self._frozen))

    def wake(self) -> None:
        """SIGCONT what :meth:`sleep` stopped; the next render grabs the whole screen."""
        if self._proc is not None and self._frozen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGCONT)
            _signal_all(self._frozen | process_tree(self._proc.pid, self._proc.pid), signal.SIGCONT)
        self._frozen.clear()
        self._full = True

    def exit_status(self) -> tuple[str, int] | None:
        """None while the program runs, else ``("app_exited", 0)`` or ``("app_crashed", code)``
        (negative code: killed by that signal). An exit caused by :meth:`close` is not reported."""
        if self._status is not None or self._proc is None or self._closed:
            return self._status
        code = self._proc.poll()
        if code is None:
            return None
        self._status = ("app_exited", 0) if code == 0 else ("app_crashed", code)
        if code == 0:
            logger.info("program %s exited", self.argv[0])
        else:
            logger.warning("program %s crashed with %d: %s", self.argv[0], code, self._output_tail())
        return self._status

    def _output_tail(self, limit: int = 1000) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - limit))
            return self._stderr.read().decode("utf-8", "replace").strip()
        return ""

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    # -- events, damage, capture -----------------------------------------------------------------
    def fileno(self) -> int:
        """The X connection's socket, for a select loop (readable: call :meth:`changed`)."""
        if self._d is None:
            raise X11Error("not loaded")
        return self._d.fileno()

    def _on_x_error(self, err: xerror.XError, request: Any = None) -> None:
        # asynchronous errors (e.g. configuring a window that has just been destroyed) are normal here
        self.counters["x_errors"] += 1
        logger.debug("X error: %s", err)

    def _drain(self) -> None:
        """Handle every event already received (never blocks)."""
        d = self._d
        if d is None:
            return
        try:
            while d.pending_events():
                self._on_event(d.next_event())
        except (xerror.ConnectionClosedError, OSError) as e:
            raise DisplayError(f"lost the display: {e}") from None

    def _on_event(self, ev: Any) -> None:
        t = ev.type & 0x7F
        if t == self._damage_event:
            a = ev.area
            self._box = _union(self._box, (a.x, a.y, a.x + a.width, a.y + a.height))
            self.counters["damage_events"] += 1
        elif t == X.CreateNotify:
            if ev.parent == self._root and not ev.override:
                self._fit(ev.window)
        elif t == X.MapNotify:
            if ev.event == self._root and not ev.override:
                self._fit(ev.window)
        elif t == X.ConfigureNotify:
            fitted = (ev.x, ev.y, ev.width, ev.height) == (0, 0, self._screen_w, self._screen_h)
            if (
                ev.event == self._root
                and not ev.override
                and not fitted
                and self._fit_budget.get(ev.window.id, 0)
            ):
                self._fit_budget[ev.window.id] -= 1
                self._fit(ev.window)
        elif t == X.DestroyNotify:
            self._fit_budget.pop(ev.window.id, None)
        elif t == X.MappingNotify:
            assert self._d is not None
            self._d.refresh_keyboard_mapping(ev)

    def _fit(self, window: Any) -> None:
        """Make a top-level window fill the screen (no window manager runs); dialogs are left alone."""
        if not self.fit_windows:
            return
        try:
            if window.get_wm_transient_for() is not None:
                return
            g = window.get_geometry()
            self._fit_budget.setdefault(window.id, 3)  # programs that resize themselves get a few more fits
            if (g.x, g.y, g.width, g.height, g.border_width) != (0, 0, self._screen_w, self._screen_h, 0):
                window.configure(x=0, y=0, width=self._screen_w, height=self._screen_h, border_width=0)
                self.counters["windows_fitted"] += 1
        except xerror.XError as e:  # BadWindow: it is gone already
            logger.debug("cannot fit window %#x: %s", window.id, e)

    def top_level_windows(self) -> list[int]:
        """Ids of the mapped (viewable) top-level windows on the display."""
        if self._d is None:
            return []
        self._drain()
        out = []
        for w in self._root.query_tree().children:
            try:
                if w.get_attributes().map_state == X.IsViewable:
                    out.append(w.id)
            except xerror.XError:  # destroyed meanwhile
                continue
        return out

    def changed(self) -> bool:
        """Whether damage arrived since the last render (always True before the first render, after
        wake and after a clear)."""
        if self._d is None:
            return False
        self._drain()
        return self._full or self._box is not None

    def wait_changed(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for :meth:`changed` to become True (for tests and tools)."""
        end = time.monotonic() + timeout
        while not self.changed():
            left = end - time.monotonic()
            if left <= 0:
                return False
            assert self._d is not None
            select.select([self._d.fileno()], [], [], left)
        return True

    def render(self, t: float) -> np.ndarray:
        """The screen as RGB; only the damaged bounding box is grabbed when a previous frame exists.

        Raises :class:`DisplayError` if the X server went away."""
        if self._d is None or self._sct is None:
            return np.zeros((self.height, self.width, 3), np.uint8)
        self._drain()
        if self._box is not None and self.settle > 0:
            self._settle()
        if self._frame is None:
            self._frame = np.zeros((self.height, self.width, 3), np.uint8)
            self._full = True
        w, h = min(self.width, self._screen_w), min(self.height, self._screen_h)
        box = (0, 0, w, h) if self._full else self._box
        self._box, self._full = None, False
        if box is not None:
            # reset the damage *before* grabbing (and make sure the server has done so: the grab goes
            # over another connection), so drawing during the grab raises a fresh DamageNotify
            x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])
            try:
                self._d.damage_subtract(self._damage, X.NONE, X.NONE)
                self._d.sync()
                if x1 > x0 and y1 > y0:
                    self._grab_into(self._frame, x0, y0, x1, y1)
            except (xerror.ConnectionClosedError, OSError, mss.ScreenShotError) as e:
                self._full = True
                raise DisplayError(f"lost the display: {e}") from None
            if x1 > x0 and y1 > y0:
                self.counters["grabs"] += 1
                if (x1 - x0) * (y1 - y0) < w * h:
                    self.counters["partial_grabs"] += 1
        return self._frame.copy()

    def _settle(self) -> None:
        """Let a redraw in progress finish: wait while damage keeps coming, until the display has
        been quiet for ``settle`` s (default :data:`SETTLE_QUIET`; at most :data:`SETTLE_MAX` s), so
        one frame shows a program's whole answer to an input instead of its first rectangle."""
        assert self._d is not None
        end = time.monotonic() + SETTLE_MAX
        fd = self._d.fileno()
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([fd], [], [], min(self.settle, left))
            if not ready:
                return
            self._drain()

    def _grab_into(self, frame: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
        shot = self._sct.grab({"left": x0, "top": y0, "width": x1 - x0, "height": y1 - y0})
        bgra = np.frombuffer(shot.raw, np.uint8).reshape(y1 - y0, x1 - x0, 4)
        dst = frame[y0:y1, x0:x1]
        # three plane copies: 0.8 ms at 720p, 4x faster than one reversed-stride copy
        dst[..., 0] = bgra[..., 2]
        dst[..., 1] = bgra[..., 1]
        dst[..., 2] = bgra[..., 0]

    def grab(self) -> np.ndarray:
        """A fresh full-screen RGB grab regardless of damage (for checks; does not reset damage)."""
        if self._sct is None:
            raise X11Error("not loaded")
        out = np.zeros((self.height, self.width, 3), np.uint8)
        self._grab_into(out, 0, 0, min(self.width, self._screen_w), min(self.height, self._screen_h))
        return out

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
            for m in [*mods, sym]:
                self._press(self._keycode(m)[0])
        elif kind == "key_up":
            mods, sym = parse_key(self._need_str(ev.key, "key"))
            for m in [sym, *reversed(mods)]:
                self._release(self._keycode(m)[0])
        elif kind == "text":
            text = getattr(ev, "text", None)
            self._type(self._need_str(text if text is not None else ev.key, "text"))
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


# ---------------------------------------------------------------------------------------------------
# the node's factory


class X11Factory:
    """What ``cloudq node --app x11:COMMAND`` builds: one display for the node's life, one
    :class:`X11App` (one run of COMMAND) per session.

    The display is an Xvfb of the node's size started here (it dies with the node: PDEATHSIG), or
    the existing display ``display`` (e.g. ``":0"``; its clients other than ours are left alone).
    Everything that can be checked before a session is checked here, so a node with a command that
    does not exist or no Xvfb refuses to start with a clear message (:class:`X11Error`).
    """

    def __init__(self, command: str, width: int, height: int, display: str | None = None) -> None:
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
        self.display = DisplayManager.existing(display) if display else DisplayManager(width, height)
        self.display.start()  # raises DisplayError: no Xvfb, or the display does not answer

    def __call__(self) -> X11App:
        if not self.display.alive():
            logger.warning("Xvfb %s died: starting a new one", self.display._name)
            self.display.stop()
            self.display.start()
        return X11App(self.width, self.height, self.argv, display=self.display)

    def close(self) -> None:
        """Stop the Xvfb this factory started (an existing display is left running)."""
        self.display.stop()
