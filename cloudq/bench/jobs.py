"""Benchmark: the worker's CPU per job, a work horse forked per job (RQ's ``Worker``, ``cloudq
worker --fork-per-job``) against one long-lived horse (``cloudq worker``), in the same run.

Each mode runs a real ``cloudq worker`` process on an embedded server and gets ``jobs`` real
save jobs (``cloudq.jobs.enqueue``: the bodies of ``workers/jobs.py``, their ids, retries and
timeouts) for sessions that are not live, so a job is the whole of RQ's path plus a body that
reads the session and returns: what a job costs beyond its own work. The figure is the CPU of the
worker's process tree (forked horses that were reaped included) from the first enqueue to the last
job's end, over the number of jobs. ``cloudq bench jobs`` prints the table.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import redis

from cloudq import jobs
from cloudq.bench.report import machine, write_section
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.procs import ProcessGroup
from cloudq.procstat import tree_cpu

log = logging.getLogger(__name__)

PREFIX = "cqbj:"
HOST = "bench"


def _measure(group: ProcessGroup, r: redis.Redis, keys: Keys, n: int, fork: bool, tag: str) -> dict[str, Any]:
    w = group.start("worker", "--host", HOST, *(["--fork-per-job"] if fork else []), name=f"worker-{tag}")
    try:
        end = time.monotonic() + 30
        while not r.scard("rq:workers"):
            if time.monotonic() > end or w.poll() is not None:
                raise RuntimeError(f"the worker did not start (see {group.logs.get(w.pid)})")
            time.sleep(0.05)
        time.sleep(0.5)  # its start-up is over
        q = jobs.queue_for(r, keys, HOST)
        done0 = q.finished_job_registry.count
        cpu0, t0 = tree_cpu(w.pid), time.monotonic()
        for i in range(n):
            jobs.enqueue(r, keys, "save", f"bench-{tag}", 1, HOST, f"autosave#{i}")
        while q.finished_job_registry.count - done0 < n:
            if time.monotonic() - t0 > 120 or w.poll() is not None:
                raise RuntimeError(f"the jobs did not finish (see {group.logs.get(w.pid)})")
            time.sleep(0.02)
        cpu, wall = tree_cpu(w.pid) - cpu0, time.monotonic() - t0
    finally:
        group.stop(w)
    return {
        "jobs": n,
        "cpu_ms_per_job": round(cpu / n * 1000, 2),
        "wall_ms_per_job": round(wall / n * 1000, 2),
    }


def run(jobs_per_mode: int = 200, rounds: int = 2) -> dict[str, Any]:
    """Per-job worker CPU with a fork per job and without, alternating modes for ``rounds``."""
    server = EmbeddedServer().start()
    try:
        r = redis.Redis.from_url(server.url)
        keys = Keys(PREFIX)
        group = ProcessGroup(server.url, PREFIX, log_dir=tempfile.mkdtemp(prefix="cloudq-bench-jobs-"))
        runs: dict[str, list[dict[str, Any]]] = {"fork": [], "nofork": []}
        try:
            for i in range(rounds):
                for mode in ("fork", "nofork") if i % 2 == 0 else ("nofork", "fork"):
                    runs[mode].append(_measure(group, r, keys, jobs_per_mode, mode == "fork", f"{mode}{i}"))
        finally:
            group.stop_all()
    finally:
        server.stop()

    def best(mode: str, key: str) -> float:
        return min(x[key] for x in runs[mode])

    result: dict[str, Any] = {
        "jobs_per_mode": jobs_per_mode,
        "rounds": rounds,
        "runs": runs,
        "fork_cpu_ms_per_job": best("fork", "cpu_ms_per_job"),
        "nofork_cpu_ms_per_job": best("nofork", "cpu_ms_per_job"),
        "fork_wall_ms_per_job": best("fork", "wall_ms_per_job"),
        "nofork_wall_ms_per_job": best("nofork", "wall_ms_per_job"),
    }
    result["saved_cpu_ms_per_job"] = round(result["fork_cpu_ms_per_job"] - result["nofork_cpu_ms_per_job"], 2)
    result["table"] = format_table(result)
    return result


def format_table(result: dict[str, Any]) -> str:
    f, n = result["fork_cpu_ms_per_job"], result["nofork_cpu_ms_per_job"]
    return (
        "| worker | CPU ms / job | wall ms / job |\n|---|---:|---:|\n"
        f"| a work horse forked per job (`--fork-per-job`) | {f:.2f} | {result['fork_wall_ms_per_job']:.2f} |\n"
        f"| one long-lived work horse (default) | {n:.2f} | {result['nofork_wall_ms_per_job']:.2f} |\n"
        f"| saved per job | {f - n:.2f} ({(f - n) / f:.0%}) | |\n"
    )


def write_markdown(result: dict[str, Any], path: str) -> None:
    write_section(
        "Worker: CPU per job, fork per job vs one long-lived work horse",
        f"""CPU of the `cloudq worker` process tree per job (reaped work horses included), from the
first enqueue to the last job's end, for {result["jobs_per_mode"]} real save jobs of sessions that
are not live (RQ's whole path plus a body that reads the session and returns); best of
{result["rounds"]} rounds per mode, modes alternated, same run.

{result["table"]}
Machine: {machine()}.
Rerun: `cloudq bench jobs --write BENCHMARKS.md` (`--jobs N`, `--rounds N`, `--json`).""",
        path,
    )
