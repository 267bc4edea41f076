"""``cloudq bench central``: what an idle central server costs, with and without sessions.

An embedded server with cloudq's ACL users; N live sessions (real session and node state made by
the same Lua scripts, fake nodes), whose clients beat at 1 Hz from a separate process (heartbeat
TTL 3 s), nobody giving input, nothing logging in: the control plane at rest. The central
server is a real ``cloudq central`` process; its CPU (``/proc``, user + system) is read over a
window once the sessions are settled. Baseline, same run: the same central with no session.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from typing import Any

import redis

from cloudq.bench.control import HB_INTERVAL, HB_TTL, PREFIX, _beater
from cloudq.bench.report import machine, write_section
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.local.cluster import setup_acl
from cloudq.procs import ProcessGroup
from cloudq.procstat import cpu_seconds
from cloudq.settings import Settings
from cloudq.state import StateMachine

CLOCKS = dict(
    heartbeat_interval=HB_INTERVAL,
    heartbeat_ttl=HB_TTL,
    idle_timeout=0,
    grace=600,
    idle_close=0,
    max_session=0,
    node_ttl=0,
    autosave=0,
)


def _one(urls: dict[str, str], n: int, window: float) -> float:
    """Central CPU, % of one core, over ``window`` s with ``n`` beating sessions."""
    r = redis.Redis.from_url(urls["admin"])
    r.flushdb()
    keys = Keys(PREFIX)
    Settings(**CLOCKS).publish(r, keys)  # type: ignore[arg-type]
    sm = StateMachine(r, keys)
    sids = []
    for i in range(n):
        sm.register_node(f"sim{i}", "bench", "sim", "x")
        _, sid, _, gen, _ = sm.login(f"user{i}", f"th{i}")
        sm.activate(f"sim{i}", sid, gen)
        sids.append(sid)
    ctx = mp.get_context("spawn")
    done = ctx.Event()
    beater = ctx.Process(
        target=_beater, args=(urls["admin"], sids, f"{PREFIX}bench:stopped", done), daemon=True
    )
    beater.start()
    group = ProcessGroup(urls["central"], PREFIX, log_dir=tempfile.mkdtemp(prefix="cloudq-bench-central-"))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CLOCKS.items() if k != "autosave"]
    central = group.start("central", *args)
    try:
        time.sleep(HB_TTL + 3 * HB_INTERVAL)  # every session beating, the first full ACL pass done
        if central.poll() is not None:
            raise RuntimeError("the central server exited")
        c0, t0 = cpu_seconds([central.pid]), time.monotonic()
        time.sleep(window)
        c1, t1 = cpu_seconds([central.pid]), time.monotonic()
    finally:
        done.set()
        beater.join(10)
        group.stop_all()
        r.close()
    return 100.0 * (c1 - c0) / (t1 - t0)


def run(sessions: int = 1000, window: float = 20.0, rounds: int = 2) -> dict[str, Any]:
    server = EmbeddedServer().start()
    try:
        urls = setup_acl(server.url, Keys(PREFIX))
        none, many = [], []
        for _ in range(rounds):  # interleaved, so load from elsewhere hits both alike
            none.append(_one(urls, 0, window))
            many.append(_one(urls, sessions, window))
    finally:
        server.stop()
    result: dict[str, Any] = {
        "machine": machine(),
        "sessions": sessions,
        "window": window,
        "none": sorted(none)[len(none) // 2],
        "many": sorted(many)[len(many) // 2],
        "runs": {"none": none, "many": many},
    }
    result["table"] = format_table(result)
    return result


def format_table(m: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| idle central server | CPU, % of one core | baseline (no session, same run) |",
            "|---|---|---|",
            f"| {m['sessions']:,} live sessions, clients beating at 1 Hz, no input | {m['many']:.3f} % | "
            f"{m['none']:.3f} % |",
        ]
    )


def write_markdown(result: dict[str, Any], path: str) -> None:
    body = (
        "`cloudq bench central --write BENCHMARKS.md` (embedded Valkey with cloudq's ACL users, one "
        f"`cloudq central`; CPU over {result['window']:.0f} s windows, median of "
        f"{len(result['runs']['many'])} interleaved runs: {result['runs']}).\n"
        f"Machine: {result['machine']} (shared with other jobs while measured).\n\n" + result["table"]
    )
    write_section("Control plane: an idle central server", body, path)
