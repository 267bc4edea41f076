"""The program's process tree: start it (:meth:`ProcessMixin._spawn`; in its sandbox,
:mod:`.sandbox`, unless the node is unconfined), freeze and thaw it (:meth:`ProcessMixin.sleep`,
:meth:`ProcessMixin.wake`: the cgroup freezer, else SIGSTOP), kill it and every other client of the
display, clear the screen; the parent-death signal that :class:`DisplayManager` uses for Xvfb
too. The ``/proc`` helpers it re-exports (:func:`process_tree`, :func:`cpu_seconds`) are
:mod:`cloudq.procstat`'s."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from Xlib import X
from Xlib import error as xerror

from cloudq.procstat import alive, cpu_seconds, process_tree

from .errors import LaunchError
from .sandbox import HOME, Sandbox, display_number, xauth_entry

_LIMIT_CHECK = 0.2
"""Seconds between two reads of the sandbox's limit counters (the node asks every step)."""

logger = logging.getLogger(__package__)  # cloudq.workers.apps.x11, as before the split

__all__ = ["ProcessMixin", "cpu_seconds", "process_tree"]

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


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return {int(p) for p in fh.read().split()}
    except OSError:
        return set()


def _wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass; returns its last value."""
    end = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


class ProcessMixin:
    """The process side of :class:`X11App` (its state is set in ``X11App.__init__``)."""

    @property
    def pid(self) -> int | None:
        """The program's pid (its process group id too), or None before :meth:`load`."""
        return self._proc.pid if self._proc is not None else None

    def pids(self) -> set[int]:
        """The program's live processes: its process group and all descendants (sandboxed: every
        process of its sandbox, bwrap's included)."""
        if self._sandbox is not None:
            return self._sandbox.processes()
        return process_tree(self._proc.pid, self._proc.pid) if self._proc is not None else set()

    def _session_cookie(self) -> bytes:
        """A fresh MIT-MAGIC-COOKIE-1 for this session's program (SECURITY extension, trusted;
        revoked on close, which also disconnects every client that used it)."""
        assert self._d is not None
        if not self._d.has_extension("SECURITY"):
            raise LaunchError(f"display {self._xdm.name if self._xdm else ''} lacks the SECURITY extension")
        from Xlib.ext import security

        reply = self._d.security_generate_authorization(
            "MIT-MAGIC-COOKIE-1", b"", timeout=0, trust_level=security.SecurityClientTrusted
        )
        self._authid = reply.authid
        return bytes(reply.auth_data_return)

    def _revoke_cookie(self) -> None:
        if self._xauth_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._xauth_file)
            self._xauth_file = None
        if self._authid is not None and self._d is not None:
            self._d.security_revoke_authorization(self._authid)
            self._authid = None

    def _unconfined_cookie(self, env: dict[str, str]) -> None:
        """Unconfined, the program gets its session's cookie in a 0600 file of the node's (none
        from a display without the SECURITY extension: an existing display that needs none)."""
        assert self._d is not None and self._xdm is not None
        if not self._d.has_extension("SECURITY"):
            return
        fd, self._xauth_file = tempfile.mkstemp(prefix="cloudq-session-xauth-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                xauth_entry(display_number(self._xdm.name), self._session_cookie(), socket.gethostname())
            )
        env["XAUTHORITY"] = self._xauth_file

    def _spawn(self, data_dir: Path) -> None:
        assert self._xdm is not None
        home = Path(HOME) if self.sandbox is not None else data_dir
        xdg = {
            "XDG_CONFIG_HOME": Path(".config"),
            "XDG_DATA_HOME": Path(".local") / "share",
            "XDG_CACHE_HOME": Path(".cache"),
            "XDG_STATE_HOME": Path(".local") / "state",
        }
        for p in xdg.values():
            (data_dir / p).mkdir(parents=True, exist_ok=True)
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
        env.update({k: str(home / v) for k, v in xdg.items()})
        env.update(HOME=str(home), DISPLAY=self._xdm.name, **self.extra_env)
        exe = shutil.which(self.argv[0], path=env["PATH"])
        if exe is None:
            raise LaunchError(f"command not found: {self.argv[0]!r} (PATH={env['PATH']})")
        argv = [os.path.abspath(exe), *self.argv[1:]]
        preexec = _die_with_parent(os.getpid())
        if self.sandbox is not None:
            self._sandbox = Sandbox(self.sandbox, (self._xdm.name, self._session_cookie()), data_dir)
            self._start_audio(self._sandbox, preexec)  # its sound server, in the sandbox (audio.py)
            env.update(self._sandbox.env())
            argv, joins, dies = self._sandbox.command(argv), self._sandbox.preexec(), preexec

            def preexec() -> None:
                dies()
                joins()

        else:
            self._unconfined_cookie(env)
            env.update(self._start_audio(None, preexec))

        self._stderr = tempfile.TemporaryFile(prefix="x11app-")  # noqa: SIM115 - as long as the program
        started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                argv,
                cwd=data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session and process group (pgid == pid)
                preexec_fn=preexec,
                close_fds=True,
            )
        except OSError as e:
            raise LaunchError(f"cannot start {self.argv[0]!r}: {e}") from None
        logger.info(
            "started %s (pid %d) on %s, HOME=%s%s in %.1f ms",
            shlex.join(self.argv),
            self._proc.pid,
            self._xdm.name,
            data_dir,
            f" as uid {self._sandbox.uid} in its sandbox" if self._sandbox is not None else " UNCONFINED",
            (time.monotonic() - started) * 1000,
        )

    def _kill_program(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self.exit_status()  # record a natural exit before we cause one
        if self._sandbox is not None:
            self._kill_sandbox(proc, self._sandbox)
            return
        pids = process_tree(proc.pid, proc.pid)  # before the leader dies and orphans move to init
        if pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            _signal_all(pids, signal.SIGTERM)
            _signal_all(pids, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
            self._frozen.clear()
            if not _wait_until(
                lambda: proc.poll() is not None and not any(alive(p) for p in pids), self.term_timeout
            ):
                left = {p for p in pids if alive(p)}
                logger.info("program did not exit on SIGTERM: SIGKILL to %s", sorted(left))
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _signal_all(left, signal.SIGKILL)
        try:
            proc.wait(self.term_timeout)
        except subprocess.TimeoutExpired:
            logger.error("program pid %d survived SIGKILL", proc.pid)

    def _kill_sandbox(self, proc: subprocess.Popen[bytes], sb: Sandbox) -> None:
        """SIGTERM to the program's processes (not bwrap's: the sandbox ends when its program
        does), SIGKILL to everything left after ``term_timeout``; then no process of the sandbox
        remains (:class:`SandboxEscape` otherwise, which stops the node) and its files, cgroup and
        uid are released."""
        bwrap = {proc.pid} | _children(proc.pid)
        if self._frozen_cg:
            sb.freeze(False)
            self._frozen_cg = False
        sb.signal(signal.SIGTERM, spare=bwrap)
        sb.signal(signal.SIGCONT, spare=bwrap)  # stopped by hand: it handles SIGTERM once continued
        self._frozen.clear()
        if not _wait_until(lambda: proc.poll() is not None, self.term_timeout):
            logger.info("program did not exit on SIGTERM: SIGKILL to its sandbox")
        sb.kill()  # raises SandboxEscape if a process of the session survives
        try:
            proc.wait(self.term_timeout)
        except subprocess.TimeoutExpired:
            logger.error("bwrap pid %d survived SIGKILL", proc.pid)
        sb.close()
        self._sandbox = None

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
            try:
                self._release_all()
                self._d.sync()
            except (xerror.XError, xerror.ConnectionClosedError, OSError) as e:
                logger.warning("cannot release held keys and buttons before sleeping: %s", e)
        if not freeze or self._proc is None or self._proc.poll() is not None:
            return
        if self._sandbox is not None and self._sandbox.freeze(True):
            self._frozen_cg = True
            logger.debug("froze the program's sandbox (cgroup freezer)")
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
        if self._frozen_cg and self._sandbox is not None:
            self._sandbox.freeze(False)
        self._frozen_cg = False
        if self._proc is not None and self._frozen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGCONT)
            _signal_all(self._frozen | process_tree(self._proc.pid, self._proc.pid), signal.SIGCONT)
        self._frozen.clear()
        self._full = True

    def exit_status(self) -> tuple[str, int | str] | None:
        """None while the program runs, else ``("app_exited", 0)`` or ``("app_crashed", code)``
        (negative code: killed by that signal), or ``("app_crashed", "memory limit")`` (``"pids
        limit"``): its sandbox hit a limit, and the whole sandbox is killed. An exit caused by
        :meth:`close` is not reported."""
        if self._status is not None or self._proc is None or self._closed:
            return self._status
        code = self._proc.poll()
        sb = self._sandbox
        if sb is not None and (code is not None or time.monotonic() >= self._limit_checked + _LIMIT_CHECK):
            self._limit_checked = time.monotonic()
            hit = sb.limit_hit()
            if hit is not None:
                logger.warning("program %s hit its %s: killing its sandbox", self.argv[0], hit)
                self._status = ("app_crashed", hit)  # first: _kill_program asks for it again
                self._kill_program()
                return self._status
        if code is None:
            return None
        if sb is not None and code > 128 and code - 128 < signal.NSIG:
            code = 128 - code  # bwrap exits with 128 + N when its program was killed by signal N
        self._status = ("app_exited", 0) if code == 0 else ("app_crashed", code)
        if code == 0:
            logger.info("program %s exited", self.argv[0])
        else:
            logger.warning("program %s crashed with %d: %s", self.argv[0], code, self._output_tail())
        return self._status

    def _output_tail(self, limit: int = 1000) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - limit))
            return self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError) as e:
            logger.debug("cannot read the program's stderr: %s", e)
        return ""
