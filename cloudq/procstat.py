"""Processes and their CPU from ``/proc`` (Linux): the one parser of ``/proc/<pid>/stat`` that the
x11 app (its program's process tree), the benchmarks, ``cloudq demo`` and the tests share.

A process's own CPU comes from its threads' ``schedstat`` (the scheduler's run time, nanosecond
resolution) where the kernel has it, else from ``stat`` utime + stime (clock ticks); reaped
children come from ``stat`` cutime + cstime. So a figure over a short window is exact for a live
tree, and the work horses a worker forked and reaped are still counted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` cloudq reads (CPU times in clock ticks)."""

    comm: str
    state: str  # R, S, D, T, Z (zombie), X (dead), ...
    ppid: int
    pgrp: int
    utime: int
    stime: int
    cutime: int  # children this process reaped
    cstime: int


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
        # comm (field 2) may contain spaces and parentheses: it ends at the last ')'
        head, rest = data.rsplit(")", 1)
        f = rest.split()  # f[0] is field 3 (state); utime..cstime are fields 14..17
        return ProcStat(head.split("(", 1)[1], f[0], int(f[1]), int(f[2]), *map(int, f[11:15]))
    except (OSError, ValueError, IndexError, TypeError):
        return None


def all_stats() -> dict[int, ProcStat]:
    """Every process visible in ``/proc``, by pid."""
    out: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := read_stat(int(name))) is not None:
            out[int(name)] = st
    return out


def children_map(stats: dict[int, ProcStat] | None = None) -> dict[int, list[int]]:
    """Parent pid -> child pids (zombies included), from ``stats`` (:func:`all_stats`) or now."""
    kids: dict[int, list[int]] = {}
    for pid, st in (all_stats() if stats is None else stats).items():
        kids.setdefault(st.ppid, []).append(pid)
    return kids


def alive(pid: int) -> bool:
    """The process exists and has not died (a zombie has)."""
    st = read_stat(pid)
    return st is not None and st.state not in ("Z", "X")


def process_tree(pid: int, pgid: int | None = None) -> set[int]:
    """Live (non-zombie) processes that descend from ``pid`` or belong to process group ``pgid``.

    Descendants are followed through parent links, so programs that start their own session (xterm
    runs its shell in a new session) are included as long as their parent is still alive.
    """
    stats = all_stats()
    kids = children_map(stats)
    todo = [pid] if pid in stats else []
    if pgid is not None:
        todo += [p for p, st in stats.items() if st.pgrp == pgid]
    found: set[int] = set()
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo.extend(kids.get(p, ()))
    return {p for p in found if stats[p].state not in ("Z", "X")}


def _process_clock(pid: int) -> int:
    """The clock id of ``pid``'s process-wide CPU clock (Linux: ``MAKE_PROCESS_CPUCLOCK(pid,
    CPUCLOCK_SCHED)``, what ``clock_getcpuclockid`` returns): every thread, ended ones too, in ns."""
    return ((~pid) << 3) | 2


def cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run (its process CPU clock; OSError if it is not readable)."""
    return time.clock_gettime_ns(_process_clock(pid))


def _run_time(pid: int, st: ProcStat) -> float:
    """Seconds ``pid`` itself ran (every thread, live or ended), from its process CPU clock (ns);
    else from its live threads' schedstat, or ``stat``'s ticks when threads have ended (a 10 ms
    step each: a short window across a thread's end read a whole tick)."""
    ticks = (st.utime + st.stime) / CLK_TCK
    try:
        return cpu_ns(pid) / 1e9
    except OSError:
        pass
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        # threads that ended are no longer listed; stat still has them (tick resolution)
        return max(total / 1e9, ticks)
    except (OSError, ValueError, IndexError):
        return ticks


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds the given processes ran themselves, every thread (gone ones count 0)."""
    return sum(_run_time(p, st) for p in pids if (st := read_stat(p)) is not None)


def tree_cpu(pid: int, kids: dict[int, list[int]] | None = None) -> float:
    """CPU seconds of a process and everything it started: its own, its reaped children's
    (cutime + cstime) and those of its live descendants. Pass ``kids`` (:func:`children_map`) to
    read several trees against one snapshot."""
    kids = children_map() if kids is None else kids
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        st = read_stat(p)
        if st is None:
            continue
        total += _run_time(p, st) + (st.cutime + st.cstime) / CLK_TCK
        todo.extend(kids.get(p, []))
    return total


def peak_rss_mib(pid: int) -> float:
    """``VmHWM`` (peak resident set) of a live process, MiB."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
