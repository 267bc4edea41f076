"""One session's control group: the program's memory and process limits, its freezer, and the
list of its processes that no ``setsid`` or double fork leaves.

:func:`find_cgroups` picks what the host offers, once, at node start:

- **cgroup v2** where the node's own cgroup delegates the ``memory`` and ``pids`` controllers
  (``cgroup.controllers`` lists them and ``cgroup.subtree_control`` can enable them: root, or a
  systemd unit with ``Delegate=yes``). A v2 cgroup with processes in it cannot enable controllers
  for children, so the node first moves itself into a leaf ``node`` beside the sessions'.
- **cgroup v1** otherwise, with the ``memory``, ``pids`` and ``freezer`` hierarchies mounted
  (Debian hosts without systemd, many containers).

Each session's cgroup is ``cloudq-<uid>`` under the node's own (the uid is claimed host-wide,
:mod:`.sandbox`), so a node that died leaves at most a cgroup that the next claim of that uid
empties and removes. A limit hit is read from the kernel's counters: ``oom_kill`` (v1
``memory.oom_control``, v2 ``memory.events``) and ``max`` (``pids.events``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__package__)

__all__ = ["Cgroup", "CgroupError", "CgroupHost", "find_cgroups"]

V1_CONTROLLERS = ("memory", "pids", "freezer")


class CgroupError(Exception):
    """No cgroup can be made for the program's limits; the message says why."""


def _read(path: Path) -> str:
    with open(path, encoding="ascii", errors="replace") as fh:
        return fh.read()


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _counter(text: str, name: str) -> int:
    """``name N`` in a flat keyed file (``memory.events``, ``pids.events``, ``memory.oom_control``)."""
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == name and v.strip().isdigit():
            return int(v)
    return 0


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fstype, super options) of every mount (``/proc/self/mountinfo``)."""
    out = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) >= 5 and len(r) >= 3:
            out.append((f[3], f[4], r[0], r[2]))
    return out


def _own_cgroups() -> dict[str, str]:
    """The node's cgroup per v1 controller (and ``""`` for v2), from ``/proc/self/cgroup``."""
    own: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            own[c] = path
    return own


@dataclass
class CgroupHost:
    """Where this node makes its sessions' cgroups: ``version`` 1 or 2, and the parent directory of
    each (v1: one per controller; v2: one)."""

    version: int
    parents: dict[str, Path]

    def create(self, name: str, memory: int, pids: int) -> Cgroup:
        """A new (emptied if stale) cgroup ``name`` with these limits; raises :class:`CgroupError`."""
        cg = Cgroup(self.version, {c: p / name for c, p in self.parents.items()})
        cg.remove()  # a stale one of a node that died with this uid claimed
        try:
            for p in cg.paths.values():
                p.mkdir()
            cg.set_limits(memory, pids)
        except OSError as e:
            cg.remove()
            raise CgroupError(f"cannot create a cgroup for the program's limits ({e})") from None
        return cg


def _v2(own: dict[str, str], mounts: list[tuple[str, str, str, str]]) -> CgroupHost | None:
    mount = next((m for root, m, fs, _ in mounts if fs == "cgroup2" and root == "/"), None)
    if mount is None or "" not in own:
        return None
    mine = Path(mount) / own[""].lstrip("/")
    try:
        available = set(_read(mine / "cgroup.controllers").split())
        if not {"memory", "pids"} <= available:
            return None
        enabled = set(_read(mine / "cgroup.subtree_control").split())
        if not {"memory", "pids"} <= enabled:
            try:
                _write(mine / "cgroup.subtree_control", "+memory +pids")
            except OSError as e:
                if e.errno != errno.EBUSY:
                    return None
                # processes in our cgroup: move the node into a leaf of its own, then enable
                leaf = mine / "node"
                leaf.mkdir(exist_ok=True)
                _write(leaf / "cgroup.procs", str(os.getpid()))
                _write(mine / "cgroup.subtree_control", "+memory +pids")
    except OSError as e:
        logger.debug("cgroup v2 at %s not usable: %s", mine, e)
        return None
    return CgroupHost(2, {"": mine})


def _v1(own: dict[str, str], mounts: list[tuple[str, str, str, str]]) -> CgroupHost:
    parents: dict[str, Path] = {}
    for c in V1_CONTROLLERS:
        mount = next(
            (m for root, m, fs, opts in mounts if fs == "cgroup" and c in opts.split(",") and root == "/"),
            None,
        )
        if mount is None or c not in own:
            raise CgroupError(
                f"cannot create a cgroup for the program's limits: no cgroup v2 with the memory and "
                f"pids controllers delegated to this node, and no cgroup v1 {c} hierarchy mounted"
            )
        parents[c] = Path(mount) / own[c].lstrip("/")
    return CgroupHost(1, parents)


def find_cgroups() -> CgroupHost:
    """What this host offers (v2 if delegated, else v1), proven by making and removing a cgroup;
    raises :class:`CgroupError` naming the missing piece."""
    own, mounts = _own_cgroups(), _mounts()
    host = _v2(own, mounts) or _v1(own, mounts)
    probe = host.create(f"cloudq-probe-{os.getpid()}", 64 * 2**20, 8)
    probe.remove()
    return host


class Cgroup:
    """One session's cgroup (v1: one directory per controller; v2: one directory)."""

    def __init__(self, version: int, paths: dict[str, Path]) -> None:
        self.version = version
        self.paths = paths
        # what a child writes into cgroup.procs between fork and exec (no allocation there)
        self.procs_files = [str(p / "cgroup.procs") for p in paths.values()]

    def _file(self, controller: str, name: str) -> Path:
        return self.paths["" if self.version == 2 else controller] / name

    def set_limits(self, memory: int, pids: int) -> None:
        if self.version == 2:
            _write(self._file("memory", "memory.max"), str(memory))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                _write(self._file("memory", "memory.swap.max"), "0")
        else:
            _write(self._file("memory", "memory.limit_in_bytes"), str(memory))
            with contextlib.suppress(OSError):  # swap accounting off (no memsw files)
                _write(self._file("memory", "memory.memsw.limit_in_bytes"), str(memory))
        _write(self._file("pids", "pids.max"), str(pids))

    def join(self) -> None:
        """Put the calling process in the cgroup (a ``preexec_fn``: between fork and exec)."""
        pid = str(os.getpid()).encode()
        for f in self.procs_files:
            fd = os.open(f, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def procs(self) -> set[int]:
        """The processes in the cgroup (empty once it is removed)."""
        pids: set[int] = set()
        for p in self.paths.values():
            with contextlib.suppress(OSError):
                pids |= {int(x) for x in _read(p / "cgroup.procs").split()}
        return pids

    def limit_hit(self) -> str | None:
        """``"memory limit"`` once the kernel killed a process of the cgroup for its memory,
        ``"pids limit"`` once a fork failed on its process limit, else None."""
        try:
            if self.version == 2:
                mem = _counter(_read(self._file("memory", "memory.events")), "oom_kill")
            else:
                mem = _counter(_read(self._file("memory", "memory.oom_control")), "oom_kill")
            if mem:
                return "memory limit"
            if _counter(_read(self._file("pids", "pids.events")), "max"):
                return "pids limit"
        except OSError:
            return None
        return None

    def freeze(self, on: bool) -> bool:
        """Freeze (or thaw) every process of the cgroup; True when the kernel says it is done."""
        try:
            if self.version == 2:
                _write(self._file("", "cgroup.freeze"), "1" if on else "0")
                state = lambda: _counter(_read(self._file("", "cgroup.events")), "frozen") == int(on)  # noqa: E731
            else:
                _write(self._file("freezer", "freezer.state"), "FROZEN" if on else "THAWED")
                want = "FROZEN" if on else "THAWED"
                state = lambda: _read(self._file("freezer", "freezer.state")).strip() == want  # noqa: E731
        except OSError as e:
            logger.warning("cannot %s the program's cgroup: %s", "freeze" if on else "thaw", e)
            return False
        end = time.monotonic() + 1.0
        while not state():
            if time.monotonic() > end:
                return False
            time.sleep(0.005)
        return True

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (v2 ``cgroup.kill`` where the kernel has it)."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(self._file("", "cgroup.kill"), "1")
                return
        frozen = self.freeze(True)  # a frozen process cannot fork while we kill
        for pid in self.procs():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if frozen:
            self.freeze(False)  # killed processes die once thawed

    def remove(self, timeout: float = 2.0) -> None:
        """Kill what is left and remove the cgroup's directories (the kernel refuses while a
        process is in it: retried until ``timeout``)."""
        end = time.monotonic() + timeout
        for p in self.paths.values():
            while p.exists():
                try:
                    p.rmdir()
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        break
                    if time.monotonic() > end:
                        logger.error("cannot remove cgroup %s: %s", p, e)
                        break
                    self.kill()
                    time.sleep(0.01)
