"""The X display programs run on: :class:`DisplayManager` (our own ``Xvfb``, or an existing display).

Our Xvfb requires an MIT-MAGIC-COOKIE: it reads the node's own cookie from an ``-auth`` file, and
this process finds it through ``$XAUTHORITY`` (one authority file per process, see
:func:`_authorize`, which keeps the entries it inherited). A session's program gets a cookie of its
own, made and revoked through the SECURITY extension (:mod:`.process`), never this one.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from Xlib import display as xdisplay
from Xlib import error as xerror

from .errors import DisplayError
from .process import _die_with_parent
from .sandbox import xauth_entry

_COOKIES: dict[str, bytes] = {}
"""Display number -> the cookie of an Xvfb this process started."""
_AUTHORITY: dict[str, object] = {}


def _write_private(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".cloudq-xauth-", dir=os.path.dirname(path))  # 0600
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _authorize(number: str, cookie: bytes | None) -> None:
    """Add (``cookie``) or drop (None) this process's cookie for display ``number`` in its own
    authority file, which ``$XAUTHORITY`` names from then on (python-xlib and libX11 read only
    that); the entries of the file it named before (or ``~/.Xauthority``) are kept after ours."""
    if "path" not in _AUTHORITY:
        prior = os.environ.get("XAUTHORITY") or os.path.expanduser("~/.Xauthority")
        try:
            with open(prior, "rb") as fh:
                _AUTHORITY["inherited"] = fh.read()
        except OSError:
            _AUTHORITY["inherited"] = b""
        fd, path = tempfile.mkstemp(prefix="cloudq-xauth-")
        os.close(fd)
        _AUTHORITY["path"] = path
        atexit.register(_unlink, path)
    if cookie is None:
        _COOKIES.pop(number, None)
    else:
        _COOKIES[number] = cookie
    host = socket.gethostname()
    mine = b"".join(xauth_entry(n, c, host) for n, c in _COOKIES.items())
    path = str(_AUTHORITY["path"])
    _write_private(path, mine + bytes(_AUTHORITY["inherited"]))  # type: ignore[call-overload]
    os.environ["XAUTHORITY"] = path


logger = logging.getLogger(__package__)  # cloudq.workers.apps.x11, as before the split

__all__ = ["DisplayManager"]


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
        auth: bool = True,
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
        self.auth = auth  # our Xvfb requires a cookie (the node's, see _authorize)
        self._auth_file: str | None = None

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
        cookie = secrets.token_bytes(16)
        auth: list[str] = []
        if self.auth:
            fd, self._auth_file = tempfile.mkstemp(prefix="cloudq-xvfb-auth-")  # 0600, ours
            with os.fdopen(fd, "wb") as fh:
                fh.write(xauth_entry("", cookie))  # the server takes every cookie in the file
            auth = ["-auth", self._auth_file]
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
            *auth,
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
        if self.auth:
            _authorize(str(number), cookie)
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
        try:
            self._log.seek(0)
            return self._log.read()[-limit:].decode("utf-8", "replace").strip()
        except (OSError, ValueError) as e:
            logger.debug("cannot read the Xvfb log: %s", e)
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
        if self._auth_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._auth_file)
            self._auth_file = None
            if self._name is not None:
                _authorize(self._name.lstrip(":"), None)
        if self.owned:
            self._name = None
