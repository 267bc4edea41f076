"""A session's sound: a PulseAudio server of its own, started with the program and ended with it.

The server has one pipe sink (``cloudq``, 48 kHz stereo, the default sink, writing s16le into a
FIFO on the server's clock) and one native-protocol socket; the program finds it through
``PULSE_SERVER``. Confined, the server runs in the session's sandbox too (a second ``bwrap`` of
:meth:`Sandbox.command`: the session's uid, namespaces and cgroup), its directory bound read-write
at :data:`~.sandbox.PULSE_DIR` in both sandboxes; on the host that directory is 0700 and owned by
the session's uid, so no other user of the host reaches the socket. The server loads no module
after start (``--disallow-module-loading``: a client cannot make it open files or sockets) and
cannot be told to exit.

The node reads that FIFO (:meth:`AudioMixin.audio_capture`) while the session is awake:
:mod:`cloudq.workers.audio` encodes and streams it; asleep nobody reads it and the server drops
what a program plays once the pipe is full (nothing at all is written while nothing plays). A null
sink's monitor read by ``parec`` was tried first: an idle null sink sleeps in 2 s blocks, so every
recorder that starts waited up to 2 s for its first byte; the pipe sink answers within 20 ms and
needs no recorder process. The FIFO is in a directory the program can write to: the node opens it
without following a symlink and refuses anything but a FIFO. Without ``pulseaudio`` on the node
(Debian package ``pulseaudio``) sessions have no sound (logged once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .sandbox import PULSE_DIR, Sandbox

logger = logging.getLogger(__package__)

__all__ = ["SINK", "AudioMixin", "PulseServer"]

SINK = "cloudq"
SOCKET = "native"
FIFO = "sound"
START_TIMEOUT = 5.0
_warned = False


class PulseServer:
    """One session's PulseAudio server (in ``sandbox`` when given, else as the node's user)."""

    def __init__(self, daemon: str, sandbox: Sandbox | None, preexec: Callable[[], None]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cloudq-pulse-"))  # 0700
        self.proc: subprocess.Popen[bytes] | None = None
        inside = PULSE_DIR if sandbox is not None else str(self.dir)
        args = [
            daemon,
            "-n",  # no default.pa: only the modules below
            "--daemonize=no",
            "--system=no",
            "--use-pid-file=no",
            "--exit-idle-time=-1",
            "--disallow-module-loading",
            "--disallow-exit",
            "--disable-shm=yes",  # the client may be in other namespaces: plain socket transfers
            "--realtime=no",
            "--high-priority=no",
            "--log-target=stderr",
            "--log-level=error",
            "-L",
            f"module-pipe-sink sink_name={SINK} file={inside}/{FIFO} format=s16le rate=48000 channels=2"
            " use_system_clock_for_timing=yes",
            "-L",
            f"module-native-protocol-unix socket={inside}/{SOCKET} auth-anonymous=1",
        ]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": inside,
            "XDG_RUNTIME_DIR": inside,
            "PULSE_RUNTIME_PATH": inside,
            "PULSE_STATE_PATH": inside,
        }
        try:
            if sandbox is not None:
                if sandbox.host.root:
                    os.chown(self.dir, sandbox.uid, sandbox.gid)
                sandbox.pulse = self.dir
                args, joins, dies = sandbox.command(args), sandbox.preexec(), preexec

                def preexec() -> None:
                    dies()
                    joins()

            self.proc = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=preexec,
                close_fds=True,
            )
            end = time.monotonic() + START_TIMEOUT
            while not ((self.dir / SOCKET).exists() and (self.dir / FIFO).exists()):
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise OSError(f"pulseaudio did not start (exit status {self.proc.poll()})")
                time.sleep(0.005)
        except BaseException:
            if sandbox is not None:
                sandbox.pulse = None
            self.stop()
            raise

    @property
    def server(self) -> str:
        """The server's address on the host (for an unconfined program)."""
        return f"unix:{self.dir / SOCKET}"

    @property
    def fifo(self) -> str:
        """Where the sink writes what the programs play (s16le, 48 kHz, stereo)."""
        return str(self.dir / FIFO)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(2)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class AudioMixin:
    """The sound side of :class:`X11App` (``self._pulse`` is set in ``X11App.__init__``)."""

    _pulse: PulseServer | None

    def _start_audio(self, sandbox: Sandbox | None, preexec: Callable[[], None]) -> dict[str, str]:
        """Start the session's sound server before its program; returns what the program's
        environment needs (unconfined: ``PULSE_SERVER``; confined, the sandbox's ``env()`` has it).
        A server that cannot start leaves the session without sound, not without its program."""
        global _warned
        daemon = shutil.which("pulseaudio")
        if daemon is None:
            if not _warned:
                _warned = True
                logger.warning(
                    "no pulseaudio on this node (Debian package pulseaudio): sessions have no sound"
                )
            return {}
        try:
            self._pulse = PulseServer(daemon, sandbox, preexec)
        except OSError as e:
            logger.warning("the session's sound server did not start: %s: no sound", e)
            return {}
        if sandbox is not None:
            return {}
        return {"PULSE_SERVER": self._pulse.server, "PULSE_COOKIE": str(self._pulse.dir / "cookie")}

    def _stop_audio(self) -> None:
        if self._pulse is not None:
            self._pulse.stop()
            self._pulse = None

    def audio_capture(self) -> str | None:
        """The FIFO the session's sound is read from (s16le, 48 kHz, stereo), or None: no sound."""
        return self._pulse.fifo if self._pulse is not None else None
