"""Child ``cloudq`` processes: the one harness ``cloudq up``, the benchmarks and the tests share.

Each child runs in its own process group (so a signal reaches everything it started), gets
SIGTERM from the kernel if the harness dies in any way (even ``kill -9``: see
:func:`die_with_parent`), gets
the deployment's Redis URL (with a ``url_dir``: the path of a 0600 file holding it, so no
password is in any child's environment or command line) and prefix in its environment, and logs
to a file of its own (or inherits the parent's output). :meth:`ProcessGroup.stop_all` sends SIGTERM, waits a bounded
time, then SIGKILLs whatever is left: no child outlives its harness.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


CLIENT_COMMANDS = ("connect", "gateway")
"""Children that :meth:`ProcessGroup.stop_all` stops before the servers they talk to."""


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when its parent dies, even by SIGKILL
    (Linux ``prctl(PR_SET_PDEATHSIG)``), so a harness killed with ``kill -9`` leaves no orphans.
    SIGTERM, so the child still cleans up (a node saves its session). None where unsupported."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def cloudq_command() -> list[str]:
    """How to start another ``cloudq`` process with this interpreter.

    ``-P`` keeps the working directory off ``sys.path``: run from a source checkout, the bare
    ``cloudq/`` folder would otherwise shadow the installed package (which maps ``workers/``
    and ``client/`` into it).
    """
    return [sys.executable, "-P", "-m", "cloudq.cli"]


class ProcessGroup:
    """Starts ``cloudq`` subcommands as children and always reaps them."""

    def __init__(
        self,
        redis_url: str = "",
        prefix: str = "cloudq:",
        log_dir: str | None = None,
        env: dict[str, str] | None = None,
        global_args: tuple[str, ...] = (),
        urls: dict[str, str] | None = None,
        url_dir: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.url_dir = url_dir
        """When set, each child reads its URL from ``url_dir/<command>.url`` (mode 0600,
        ``CLOUDQ_REDIS_URL_FILE``) instead of getting it in ``CLOUDQ_REDIS_URL``."""
        # per-command Redis URL (each role's own ACL user, see cloudq.central.acl.role_urls); others get redis_url
        self.urls = dict(urls or {})
        self.prefix = prefix
        self.log_dir = log_dir
        self.extra_env = dict(env or {})
        self.global_args = global_args
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, str] = {}
        self.clients: set[int] = set()

    def url_for(self, command: str) -> str:
        """The Redis URL a ``cloudq COMMAND`` child gets."""
        return self.urls.get(command, self.redis_url)

    def url_file(self, command: str) -> str:
        """The 0600 file in :attr:`url_dir` that holds ``cloudq COMMAND``'s URL (written now)."""
        from cloudq.secretfile import write_secret

        assert self.url_dir is not None
        return write_secret(os.path.join(self.url_dir, f"{command}.url"), self.url_for(command))

    def child_env(self, command: str, **extra: str) -> dict[str, str]:
        """The environment of a ``cloudq COMMAND`` child: its URL (or, with :attr:`url_dir`, the
        file that holds it) unless ``extra`` names one itself."""
        env = self.env(**extra)
        if "CLOUDQ_REDIS_URL_FILE" in extra:
            env.pop("CLOUDQ_REDIS_URL", None)
        elif "CLOUDQ_REDIS_URL" in extra:
            env.pop("CLOUDQ_REDIS_URL_FILE", None)
        elif self.url_dir:
            env.pop("CLOUDQ_REDIS_URL", None)
            env["CLOUDQ_REDIS_URL_FILE"] = self.url_file(command)
        else:
            env.pop("CLOUDQ_REDIS_URL_FILE", None)
            env["CLOUDQ_REDIS_URL"] = self.url_for(command)
        return env

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "CLOUDQ_REDIS_URL": self.redis_url,
            "CLOUDQ_PREFIX": self.prefix,
            **self.extra_env,
            **extra,
        }

    def start(
        self, *args: str, name: str | None = None, stdin: bytes | None = None, **env: str
    ) -> subprocess.Popen[bytes]:
        """Start ``cloudq ARGS`` (logging to ``log_dir/NN-<command>.log`` when there is a log dir)."""
        log = None
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            path = os.path.join(self.log_dir, f"{len(self.procs):02d}-{name or args[0]}.log")
            log = open(path, "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            p = subprocess.Popen(
                [*cloudq_command(), *self.global_args, *args],
                env=self.child_env(args[0], **env),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        finally:
            if log:
                log.close()
        if log:
            self.logs[p.pid] = log.name
        if stdin is not None:
            assert p.stdin is not None
            p.stdin.write(stdin)
            p.stdin.close()
        self.procs.append(p)
        if args[0] in CLIENT_COMMANDS:
            self.clients.add(p.pid)
        if name:
            self.names[name] = p
        return p

    def run(
        self, *args: str, stdin: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cloudq ARGS`` to completion, capturing its output."""
        return subprocess.run(
            [*cloudq_command(), *args],
            env=self.child_env(args[0]),
            input=(stdin or b"").decode(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def output(self, p: subprocess.Popen[bytes]) -> str:
        with open(self.logs[p.pid], errors="replace") as fh:
            return fh.read()

    @staticmethod
    def kill(p: subprocess.Popen[bytes], sig: int = signal.SIGKILL, timeout: float = 10) -> None:
        """Signal the child's whole process group and wait for the child."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        p.wait(timeout)

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self.stop_all(timeout, [p])

    def stop_all(self, timeout: float = 10, which: list[subprocess.Popen[bytes]] | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Clients go first: a client told to
        stop logs out, and it can only get its answer while the central server still runs."""
        procs = self.procs if which is None else which
        clients = [p for p in procs if p.pid in self.clients]
        if clients and len(clients) < len(procs):
            self._stop(timeout, clients)
            procs = [p for p in procs if p.pid not in self.clients]
        self._stop(timeout, procs)
        self.clients -= {p.pid for p in (self.procs if which is None else which)}
        if which is None:
            self.procs.clear()
            self.names.clear()
        else:
            self.procs[:] = [p for p in self.procs if p not in which]

    @staticmethod
    def _stop(timeout: float, procs: list[subprocess.Popen[bytes]]) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout)
