"""CPU and memory of process trees from ``/proc``: the one accounting every benchmark (and the
demo) uses.

A process's own CPU comes from its threads' ``schedstat`` (the scheduler's run time, nanosecond
resolution) where the kernel has it, else from ``stat`` utime + stime (clock ticks); reaped
children come from ``stat`` cutime + cstime. So a figure over a short window is exact for a live
tree, and the work horses a worker forked and reaped are still counted.
"""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children_map() -> dict[int, list[int]]:
    """Parent pid -> live child pids, for every process visible in ``/proc``."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            kids.setdefault(int(st[1]), []).append(int(name))
    return kids


def _run_time(pid: int, st: list[str]) -> float:
    """Seconds ``pid`` itself ran (every thread, live or ended)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        # threads that ended are no longer listed; stat still has them (tick resolution)
        return max(total / 1e9, (int(st[11]) + int(st[12])) / CLK_TCK)
    except (OSError, ValueError, IndexError):
        return (int(st[11]) + int(st[12])) / CLK_TCK


def tree_cpu(pid: int, kids: dict[int, list[int]] | None = None) -> float:
    """CPU seconds of a process and everything it started: its own, its reaped children's
    (cutime + cstime) and those of its live descendants. Pass ``kids`` (:func:`children_map`) to
    read several trees against one snapshot."""
    kids = children_map() if kids is None else kids
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        st = _stat(p)
        if st is None:
            continue
        total += _run_time(p, st) + (int(st[13]) + int(st[14])) / CLK_TCK
        todo.extend(kids.get(p, []))
    return total


def own_cpu() -> float:
    """This process's CPU seconds (every thread), without its children."""
    st = _stat(os.getpid())
    return _run_time(os.getpid(), st) if st else 0.0


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
