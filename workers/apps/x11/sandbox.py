"""The program's sandbox: each session's program, and everything it starts, runs under bubblewrap
(``bwrap``) as a uid of its own, in namespaces of its own, in a cgroup of its own.

- **A uid nobody else has**, claimed host-wide: ``flock`` on ``<runtime>/uids/<uid>.lock`` for the
  session's life, from a range (:data:`UID_BASE`, :data:`UID_COUNT`) above the ranges that
  subordinate ids, containers and systemd's dynamic users use. As root bwrap builds the sandbox
  without a user namespace and ``setpriv`` (util-linux) drops to that uid, its own group, no
  supplementary groups, no capabilities (bounding set too) and ``no_new_privs``: the uid is real
  outside the sandbox, so the kernel's per-uid checks (signals, ``/proc``, ``RLIMIT_NPROC``) hold.
  As an unprivileged node bwrap makes a user namespace (``--unshare-user``); the program's uid is
  then the node's outside, and the cgroup and the PID namespace are what tell its processes apart.
- **Namespaces**: PID (``/proc`` shows the sandbox's processes only; when its init, bwrap, ends,
  the kernel kills everything in it, however it detached), network (loopback only, unless
  ``--program-network host``), IPC, UTS, cgroup.
- **Files**: a new root (tmpfs) with ``/usr``, ``/etc`` and the ``/bin``, ``/lib*`` links read-only,
  a private ``/tmp``, ``/dev`` (null, zero, random, pts...), the session's data directory at
  ``/home/cloudq`` (the only writable path kept after the session: HOME), the display's own socket
  and a copy of the session's X cookie. No store, no other workspace, no other display, nothing of
  the node (``/etc/cloudq`` is hidden too). ``/etc/passwd`` and ``/etc/group`` gain the session's
  user, so shells show a name.
- **Limits**: the cgroup (:mod:`.cgroup`: memory, pids, freezer) and rlimits as the floor
  (``RLIMIT_NOFILE``; ``RLIMIT_NPROC``, per uid; no core files).

:func:`preflight` proves at node start that all of it can be built (a sandbox that runs ``true``),
or raises :class:`SandboxError` naming the missing piece. :class:`Sandbox` is one session's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import resource
import secrets
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .cgroup import Cgroup, CgroupError, CgroupHost, find_cgroups
from .errors import X11Error

logger = logging.getLogger(__package__)

__all__ = [
    "HOME",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "SandboxEscape",
    "SandboxHost",
    "display_number",
    "parse_size",
    "preflight",
    "uid_processes",
    "xauth_entry",
]

UID_BASE = 2_000_000_000
"""First uid of the sessions' range: above subordinate ids (100000+), systemd-nspawn's container
ranges (up to 0x6FFF0000) and its dynamic users (61184-65519)."""
UID_COUNT = 10_000
HOME = "/home/cloudq"
"""The session's data directory inside the sandbox."""
XAUTH_PATH = "/run/cloudq/Xauthority"
PULSE_DIR = "/run/cloudq/pulse"
"""The session's sound server directory (its socket) inside the sandbox (:mod:`.audio`)."""
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
FAMILY_WILD = 0xFFFF
FAMILY_LOCAL = 256
SANDBOX_HOSTNAME = "cloudq"


class SandboxError(X11Error):
    """The sandbox cannot be built on this host (the message names the missing piece)."""


class SandboxEscape(SystemExit):  # not an Exception: no handler swallows it, the node exits 1
    """A process of a finished session survived SIGKILL: the node must not serve another user."""

    def __init__(self, message: str) -> None:
        logger.critical("%s", message)
        super().__init__(message)


def parse_size(text: str) -> int:
    """``"2G"``, ``"200M"``, ``"512k"``, ``"1048576"`` -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if t[-1:] in "KMGT" else t)
    except ValueError:
        raise ValueError(f"bad size {text!r}: expected e.g. 2G, 512M") from None
    if n <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return int(n * mult)


@dataclass(frozen=True)
class SandboxConfig:
    """How a node confines its programs (``cloudq node --program-*``, ``--unconfined``)."""

    confined: bool = True
    network: str = "none"  # "none": loopback only; "host": the host's network (a warning each start)
    memory: int = 2 * 2**30
    pids: int = 512
    nofile: int = 1024
    binds: tuple[str, ...] = ()  # more read-only paths the program needs (at the same path)
    uid_base: int = UID_BASE
    uid_count: int = UID_COUNT


def xauth_entry(display_number: str, cookie: bytes, host: str | None = None) -> bytes:
    """Xauthority entries for an MIT-MAGIC-COOKIE-1 of this display number: one for any host
    (libXau, i.e. libX11 programs) and, given ``host``, one for the local host of that name
    (python-xlib reads only those)."""

    def field(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b

    tail = field(display_number.encode()) + field(b"MIT-MAGIC-COOKIE-1") + field(cookie)
    out = struct.pack(">H", FAMILY_WILD) + field(b"") + tail
    if host is not None:
        out = struct.pack(">H", FAMILY_LOCAL) + field(host.encode()) + tail + out
    return out


def display_number(name: str) -> str:
    """``":3"`` or ``":3.0"`` -> ``"3"``."""
    return name.rpartition(":")[2].split(".")[0]


def uid_processes(uid: int) -> set[int]:
    """Live (not zombie) processes with ``uid`` as any of their real, effective, saved or
    filesystem uids: read from ``/proc/<pid>/status`` (the owner of ``/proc/<pid>`` is root for a
    process that made itself non-dumpable)."""
    found: set[int] = set()
    want = str(uid)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii", errors="replace") as fh:
                status = fh.read()
        except OSError:
            continue
        uids: list[str] = []
        zombie = False
        for line in status.splitlines():
            if line.startswith("State:"):
                zombie = "Z" in line.split()[1:2]
            elif line.startswith("Uid:"):
                uids = line.split()[1:]
                break
        if want in uids and not zombie:
            found.add(int(name))
    return found


def runtime_dir() -> Path:
    """Where uid claims and the sessions' sandbox files live: host-wide for root nodes."""
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/cloudq")
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"cloudq-{os.geteuid()}"


@dataclass
class SandboxHost:
    """What :func:`preflight` found: the tools, the cgroups, the runtime directory."""

    config: SandboxConfig
    bwrap: str
    setpriv: str | None  # root: drops to the session's uid
    cgroups: CgroupHost
    run: Path

    @property
    def root(self) -> bool:
        return self.setpriv is not None


def _userns_disabled() -> str | None:
    for path, bad in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/user/max_user_namespaces", "0"),
    ):
        try:
            if Path(path).read_text().strip() == bad:
                return f"user namespaces disabled ({path.removeprefix('/proc/sys/').replace('/', '.')}={bad})"
        except OSError:
            continue
    return None


def preflight(config: SandboxConfig) -> SandboxHost:
    """Prove that this host can build the sandbox (at node start), or raise :class:`SandboxError`."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError("bubblewrap not installed (Debian package: bubblewrap), or run with --unconfined")
    root = os.geteuid() == 0
    setpriv = shutil.which("setpriv") if root else None
    if root and setpriv is None:
        raise SandboxError("setpriv not installed (Debian package: util-linux), or run with --unconfined")
    if not root:
        why = _userns_disabled()
        if why:
            raise SandboxError(f"{why}: an unprivileged node needs them for its sandbox, or --unconfined")
    try:
        cgroups = find_cgroups()
    except CgroupError as e:
        raise SandboxError(f"{e}, or run with --unconfined") from None
    run = runtime_dir()
    try:
        (run / "uids").mkdir(parents=True, exist_ok=True)
        (run / "sessions").mkdir(parents=True, exist_ok=True)
        os.chmod(run, 0o700)
    except OSError as e:
        raise SandboxError(f"cannot make the sandbox's runtime directory {run}: {e}") from None
    host = SandboxHost(config, bwrap, setpriv, cgroups, run)
    if root:
        _remove_stale(host)
    with tempfile.TemporaryDirectory() as home:
        sb = Sandbox(host, None, Path(home))
        try:
            out = subprocess.run(
                sb.command([shutil.which("true") or "/bin/true"]),
                capture_output=True,
                text=True,
                timeout=20,
                preexec_fn=sb.preexec(),
                env={"PATH": "/usr/bin:/bin"},
            )
        finally:
            sb.close()
    if out.returncode != 0:
        hint = "user namespaces disabled?" if not root else "is this a container without CAP_SYS_ADMIN?"
        raise SandboxError(
            f"cannot build the program's sandbox ({hint}): bwrap said: {out.stderr.strip()[:300]}"
        )
    return host


def _remove_stale(host: SandboxHost) -> None:
    """Cgroups and files of sessions whose node was killed (their uid is no longer claimed)."""
    names = {p.name for parent in host.cgroups.parents.values() if parent.is_dir() for p in parent.iterdir()}
    for name in names:
        uid = name.removeprefix("cloudq-")
        if not uid.isdigit():
            continue
        fd = os.open(host.run / "uids" / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live session's
        else:
            logger.info("removing the cgroup of a dead node's session (uid %s)", uid)
            Cgroup(host.cgroups.version, {c: p / name for c, p in host.cgroups.parents.items()}).remove()
            shutil.rmtree(host.run / "sessions" / uid, ignore_errors=True)
        finally:
            os.close(fd)


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    """chown ``top`` and everything under it, never following a symlink."""
    os.chown(top, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(dirpath, n), uid, gid, follow_symlinks=False)


class Sandbox:
    """One session's sandbox: its uid (claimed), cgroup, files, and the command that runs a
    program in it. ``display`` is ``(name, cookie)`` or None (no X: the preflight's ``true``)."""

    def __init__(self, host: SandboxHost, display: tuple[str, bytes] | None, data_dir: Path) -> None:
        self.host = host
        self.config = host.config
        self.data_dir = data_dir
        self.display = display
        self.uid = self.gid = os.geteuid()
        self._lock: int | None = None
        self.cgroup: Cgroup | None = None
        self.files: Path | None = None
        self.pulse: Path | None = None  # the session's sound server directory (audio.py), bound rw
        self._owner = (os.geteuid(), os.getegid())
        try:
            if host.root:
                self.uid = self.gid = self._claim_uid()
            name = f"cloudq-{self.uid}" if host.root else f"cloudq-{os.getpid()}-{secrets.token_hex(4)}"
            self.cgroup = host.cgroups.create(name, self.config.memory, self.config.pids)
            self._make_files()
            if host.root:
                _chown_tree(data_dir, self.uid, self.gid)
        except BaseException:
            self.close()
            raise

    # -- setting up ----------------------------------------------------------------------------
    def _claim_uid(self) -> int:
        """A uid of the range no other live session on this host holds (flock, kept until close);
        whatever a dead node left of it is killed first."""
        c = self.config
        start = secrets.randbelow(c.uid_count)
        for i in range(c.uid_count):
            uid = c.uid_base + (start + i) % c.uid_count
            fd = os.open(self.host.run / "uids" / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                pwd.getpwuid(uid)
                os.close(fd)  # a real account of this host: not ours to use
                continue
            except KeyError:
                pass
            self._lock = fd
            left = uid_processes(uid)
            if left:
                logger.warning("uid %d: %d processes left by a dead node: killing them", uid, len(left))
                self.uid = uid
                self._kill_uid(uid)
            return uid
        raise SandboxError(f"all {c.uid_count} sandbox uids from {c.uid_base} are in use on this host")

    def _make_files(self) -> None:
        """passwd, group and the X cookie, in a directory of this session's (bound read-only)."""
        self.files = self.host.run / "sessions" / str(self.uid if self.host.root else os.getpid())
        shutil.rmtree(self.files, ignore_errors=True)
        self.files.mkdir(mode=0o700)
        try:
            shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
            passwd = Path("/etc/passwd").read_text(errors="replace")
            group = Path("/etc/group").read_text(errors="replace")
        except OSError:
            passwd = group = ""
        (self.files / "passwd").write_text(
            passwd.rstrip("\n") + f"\ncloudq:x:{self.uid}:{self.gid}:cloudq session:{HOME}:{shell}\n"
        )
        (self.files / "group").write_text(group.rstrip("\n") + f"\ncloudq:x:{self.gid}:\n")
        if self.display is not None:
            name, cookie = self.display
            xa = self.files / "Xauthority"
            xa.write_bytes(xauth_entry(display_number(name), cookie, SANDBOX_HOSTNAME))
            os.chmod(xa, 0o400)
            os.chown(xa, self.uid, self.gid)

    # -- running ---------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """What the sandbox changes in the program's environment."""
        env = {"HOME": HOME, "USER": "cloudq", "LOGNAME": "cloudq"}
        if self.display is not None:
            env.update(DISPLAY=self.display[0], XAUTHORITY=XAUTH_PATH)
        if self.pulse is not None:
            env["PULSE_SERVER"] = f"unix:{PULSE_DIR}/native"
            env["PULSE_COOKIE"] = f"{PULSE_DIR}/cookie"  # not in HOME: the user's saved data
        return env

    def command(self, argv: list[str]) -> list[str]:
        """``bwrap ... [setpriv ...] -- argv`` (``argv[0]`` an absolute path)."""
        c, files = self.config, self.files
        assert files is not None
        a = [self.host.bwrap, "--die-with-parent", "--new-session"]
        a += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if c.network != "host":
            a.append("--unshare-net")
        if not self.host.root:
            a += ["--unshare-user", "--uid", str(self.uid), "--gid", str(self.gid), "--cap-drop", "ALL"]
        a += ["--hostname", SANDBOX_HOSTNAME, "--ro-bind", "/usr", "/usr"]
        for link in SYSTEM_LINKS:
            if os.path.islink(link):
                a += ["--symlink", os.readlink(link), link]
            elif os.path.isdir(link):
                a += ["--ro-bind", link, link]
        a += ["--ro-bind", "/etc", "/etc"]
        if os.path.isdir("/etc/cloudq"):
            a += ["--tmpfs", "/etc/cloudq"]
        a += ["--ro-bind", str(files / "passwd"), "/etc/passwd"]
        a += ["--ro-bind", str(files / "group"), "/etc/group"]
        a += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
        a += ["--perms", "0755", "--dir", "/home", "--bind", str(self.data_dir), HOME]
        made = {"/", "/tmp", "/home", "/usr", "/etc", "/proc", "/dev"}

        def bind(path: str) -> None:  # read-only at its own path, its parents traversable
            for parent in reversed(Path(path).parents):
                if str(parent) not in made:
                    a.extend(["--perms", "0755", "--dir", str(parent)])
                    made.add(str(parent))
            a.extend(["--ro-bind", path, path])

        for extra in c.binds:
            bind(extra)
        exe = argv[0]
        if not any(
            exe == d or exe.startswith(d.rstrip("/") + "/") for d in ("/usr", *SYSTEM_LINKS, *c.binds)
        ):
            bind(exe)  # a program outside the system directories
        if self.display is not None:
            sock = f"/tmp/.X11-unix/X{display_number(self.display[0])}"
            if os.path.exists(sock):
                a += ["--perms", "0755", "--dir", os.path.dirname(sock), "--ro-bind", sock, sock]
            a += ["--perms", "0755", "--dir", os.path.dirname(XAUTH_PATH)]
            a += ["--ro-bind", str(files / "Xauthority"), XAUTH_PATH]
        if self.pulse is not None:
            a += ["--bind", str(self.pulse), PULSE_DIR]
        a += ["--chdir", HOME, "--"]
        if self.host.root:
            assert self.host.setpriv is not None
            a += [self.host.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
            a += ["--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
        return a + argv

    def preexec(self) -> Callable[[], None]:
        """What the child does between fork and exec: join the cgroup, set the rlimits."""
        cg, c = self.cgroup, self.config
        assert cg is not None
        limits = [
            (resource.RLIMIT_NOFILE, (c.nofile, c.nofile)),
            # per uid, counting threads; above the cgroup's pids limit, which must be hit first
            # (its counter is what ends the session with "pids limit")
            (resource.RLIMIT_NPROC, (c.pids + 16, c.pids + 16)),
            (resource.RLIMIT_CORE, (0, 0)),
        ]

        def run() -> None:
            cg.join()
            for what, value in limits:
                resource.setrlimit(what, value)

        return run

    def processes(self) -> set[int]:
        """Every process of the sandbox: its cgroup's, and (root) every process of its uid."""
        pids = self.cgroup.procs() if self.cgroup is not None else set()
        return pids | (uid_processes(self.uid) if self.host.root else set())

    def limit_hit(self) -> str | None:
        return self.cgroup.limit_hit() if self.cgroup is not None else None

    def freeze(self, on: bool) -> bool:
        return self.cgroup.freeze(on) if self.cgroup is not None else False

    def signal(self, sig: int, spare: Iterable[int] = ()) -> None:
        """``sig`` to every process of the sandbox but ``spare`` (bwrap's own)."""
        for p in self.processes() - set(spare):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)

    def _kill_uid(self, uid: int, rounds: int = 50) -> None:
        for _ in range(rounds):
            left = uid_processes(uid)
            if not left:
                return
            for p in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.02)
        left = uid_processes(uid)
        if left:
            raise SandboxEscape(
                f"processes {sorted(left)} of the sandbox uid {uid} survived SIGKILL: "
                "refusing to serve another user"
            )

    def kill(self, rounds: int = 50) -> None:
        """SIGKILL everything in the sandbox until nothing is left (the cgroup is empty and, as
        root, no process of the uid remains); raises :class:`SandboxEscape` if something survives
        ``rounds`` passes."""
        if self.cgroup is not None:
            self.cgroup.kill()
        for _ in range(rounds):
            left = self.processes()
            if not left:
                return
            if self.cgroup is not None:
                self.cgroup.kill()
            for p in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.02)
        if self.host.root:
            self._kill_uid(self.uid, 1)
        left = self.processes()
        if left:
            raise SandboxEscape(f"processes {sorted(left)} of a sandbox survived SIGKILL")

    def close(self) -> None:
        """Remove the cgroup and the session's files, give HOME back to the node's uid (so the
        save job reads every file), release the uid. Call once nothing runs (:meth:`kill`)."""
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        if self.files is not None:
            shutil.rmtree(self.files, ignore_errors=True)
            self.files = None
        if self._lock is not None:
            with contextlib.suppress(OSError):
                if self.data_dir.exists():
                    _chown_tree(self.data_dir, *self._owner)
            os.close(self._lock)
            self._lock = None
