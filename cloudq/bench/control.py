"""``cloudq bench control``: from a lapsed heartbeat deadline to the node being ``sleeping``.

N simulated sessions (real session and node state, created by the same Lua scripts) beat at
1 Hz from a separate process, through real Redis, with the central server running as a real
process and ``background_keys`` other live keys with a TTL present. A sample of sessions
stops beating; for each, the deadline is the moment its heartbeat key expires, and the time
of the node's ``sleeping`` transition is read from the ``events`` stream (server time). In
the same run a subscriber records when the ``expired`` keyspace notification arrives for an
untouched shadow key with the same expiry: the figure a notification-driven design would get.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import threading
import time
from typing import Any

import redis

from cloudq.bench.report import machine, write_section
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.percentile import percentile
from cloudq.procs import ProcessGroup
from cloudq.procstat import cpu_seconds
from cloudq.settings import Settings
from cloudq.state import StateMachine

PREFIX = "cqb:"
HB_INTERVAL = 1.0
HB_TTL = 3.0
NOTIFY_WINDOW = 40.0
CPU_WINDOW = 5.0
"""Seconds the central server's CPU is read while every session beats (none lapsing)."""


def _beater(url: str, sids: list[str], stop_key: str, done: Any) -> None:
    """Beat every session at 1 Hz except those in ``stop_key`` (checked every round)."""
    r = redis.Redis.from_url(url)
    keys = Keys(PREFIX)
    stopped: set[bytes] = set()
    while not done.is_set():
        start = time.monotonic()
        stopped = r.smembers(stop_key)
        pipe = r.pipeline(transaction=False)
        for i, sid in enumerate(sids):
            if sid.encode() not in stopped:
                pipe.set(keys.heartbeat(sid), "1", px=int(HB_TTL * 1000))
            if i % 2000 == 1999:
                pipe.execute()
        pipe.execute()
        r.set(stop_key + ":round", f"{time.time():.3f}")
        done.wait(max(0.0, HB_INTERVAL - (time.monotonic() - start)))


def _one(url: str, n: int, background: int, sample: int) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    r.flushdb()
    keys = Keys(PREFIX)
    Settings(heartbeat_interval=HB_INTERVAL, heartbeat_ttl=HB_TTL, idle_timeout=0, grace=600, idle_close=0,
             max_session=0, node_ttl=0).publish(r, keys)  # fmt: skip
    pipe = r.pipeline(transaction=False)
    for i in range(background):
        pipe.set(f"{PREFIX}bg:{i}", "x", ex=3600)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    sm = StateMachine(r, keys)
    sids, nodes = [], []
    for i in range(n):
        node = f"sim{i}"
        sm.register_node(node, "bench", "sim", "x")
        _, sid, _, gen, _ = sm.login(f"user{i}", f"th{i}")
        sm.activate(node, sid, gen)
        sids.append(sid)
        nodes.append(node)
    done = mp.Event()
    beater = mp.Process(target=_beater, args=(url, sids, f"{PREFIX}bench:stopped", done), daemon=True)
    beater.start()
    group = ProcessGroup(url, PREFIX, log_dir=tempfile.mkdtemp(prefix="cloudq-bench-control-"))
    central = group.start(
        "central", "--heartbeat-interval", str(HB_INTERVAL), "--heartbeat-ttl", str(HB_TTL),
        "--idle-timeout", "0", "--grace", "600", "--idle-close", "0", "--max-session", "0", "--node-ttl", "0",
    )  # fmt: skip
    notified: dict[str, float] = {}
    ps = r.pubsub(ignore_subscribe_messages=True)
    ps.subscribe("__keyevent@0__:expired")
    stop_sub = threading.Event()

    def listen() -> None:
        while not stop_sub.is_set():
            m = ps.get_message(timeout=0.2)
            if m and isinstance(m["data"], bytes):
                notified.setdefault(m["data"].decode(), time.time())

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        time.sleep(HB_TTL + 2 * HB_INTERVAL)  # warm-up: every session beating, sweeper settled
        if central.poll() is not None:
            raise RuntimeError("central server exited")
        # the central server's own CPU while every session beats and none lapses
        c0, t0 = cpu_seconds([central.pid]), time.monotonic()
        time.sleep(CPU_WINDOW)
        central_pct = 100 * (cpu_seconds([central.pid]) - c0) / (time.monotonic() - t0)
        step = max(1, n // sample)
        chosen = list(range(0, n, step))[:sample]
        r.sadd(f"{PREFIX}bench:stopped", *[sids[i] for i in chosen])
        # wait one beater round after the stop so no beat is in flight, then read each deadline
        seen = r.get(f"{PREFIX}bench:stopped:round")
        end = time.monotonic() + 5
        while r.get(f"{PREFIX}bench:stopped:round") == seen and time.monotonic() < end:
            time.sleep(0.05)
        pipe = r.pipeline(transaction=False)
        for i in chosen:
            pipe.pttl(keys.heartbeat(sids[i]))
        pttls = pipe.execute()
        sec, usec = r.time()
        now = sec + usec / 1e6
        deadline = {sids[i]: now + p / 1000 for i, p in zip(chosen, pttls, strict=True) if p > 0}
        # The sweeper reads each heartbeat key when it comes due, and that read itself makes
        # Redis delete the key and publish `expired`. So notifications are measured on shadow
        # keys with the same expiry that nothing touches: what a notification-driven design sees.
        pipe = r.pipeline(transaction=False)
        for i, p in zip(chosen, pttls, strict=True):
            if p > 0:
                pipe.set(f"{PREFIX}bench:shadow:{sids[i]}", "1", px=p)
        pipe.execute()
        by_node = {nodes[i]: sids[i] for i in chosen}
        # wait for every sampled node's sleeping transition (bounded)
        sleeping: dict[str, float] = {}
        last_id = "0-0"
        end = time.monotonic() + HB_TTL + 15
        while len(sleeping) < len(deadline) and time.monotonic() < end:
            for eid, f in r.xrange(keys.events, min=f"({last_id}" if last_id != "0-0" else "-", count=5000):
                last_id = eid.decode()
                obj = f[b"obj"].decode()
                if f[b"to"] == b"sleeping" and obj.startswith("node:"):
                    sid = by_node.get(obj[5:])
                    if sid in deadline:
                        sleeping.setdefault(sid, float(f[b"t"]))
            time.sleep(0.05)
        sweeper = [(sleeping[s] - deadline[s]) * 1000 for s in sleeping]
        end = time.monotonic() + NOTIFY_WINDOW
        hb_keys = {f"{PREFIX}bench:shadow:{s}": s for s in deadline}
        while time.monotonic() < end and not all(k in notified for k in hb_keys):
            time.sleep(0.1)
        # a notification that never came counts as infinitely late
        notes = [
            (notified[k] - deadline[s]) * 1000 if k in notified else float("inf") for k, s in hb_keys.items()
        ]
    finally:
        stop_sub.set()
        listener.join(2)
        ps.close()
        done.set()
        beater.join(5)
        if beater.is_alive():
            beater.kill()
        group.stop_all()
        shutil.rmtree(group.log_dir or "", ignore_errors=True)
        r.flushdb()
    return {
        "sessions": n,
        "background_keys": background,
        "sample": len(deadline),
        "central_cpu_pct": central_pct,
        "sweeper_ms": {"p50": percentile(sweeper, 50), "p99": percentile(sweeper, 99), "max": max(sweeper, default=float("nan")),
                       "n": len(sweeper)},
        "notification_ms": {"p50": percentile(notes, 50), "p99": percentile(notes, 99), "n": sum(x != float("inf") for x in notes),
                            "window_s": NOTIFY_WINDOW},
    }  # fmt: skip


def _f(x: float) -> str:
    if x == float("inf"):
        return f"> {NOTIFY_WINDOW * 1000:.0f}"
    return "—" if x != x else f"{x:.0f}"


def run(redis_url: str | None, counts: list[int], background: int, sample: int) -> dict[str, Any]:
    server = None
    if not redis_url:
        server = EmbeddedServer().start()
        redis_url = server.url
    try:
        info = redis.Redis.from_url(redis_url).info("server")
        version = (
            f"{info.get('server_name', 'redis')} {info.get('valkey_version') or info.get('redis_version')}"
        )
        rows = [_one(redis_url, n, background, sample) for n in counts]
    finally:
        if server:
            server.stop()
    lines = [
        "| sessions beating at 1 Hz | other live TTL keys | central CPU, % of a core | sample | sweeper p50 ms "
        "| sweeper p99 ms | sweeper max ms | notifications p50 ms | notifications p99 ms | notifications arrived |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in rows:
        s, nt = x["sweeper_ms"], x["notification_ms"]
        lines.append(
            f"| {x['sessions']:,} | {x['background_keys']:,} | {x['central_cpu_pct']:.2f} | {x['sample']} "
            f"| {_f(s['p50'])} | {_f(s['p99'])} "
            f"| {_f(s['max'])} | {_f(nt['p50'])} | {_f(nt['p99'])} | {nt['n']}/{x['sample']} within {nt['window_s']:.0f} s |"
        )
    return {"server": version, "machine": machine(), "rows": rows, "table": "\n".join(lines)}


def write_markdown(result: dict[str, Any], path: str) -> None:
    body = f"""Time from a session's heartbeat deadline (its key's expiry) to its node's `sleeping`
transition (server time, from the `events` stream), with the central server's sweeper, next to
the arrival of `expired` keyspace notifications in the same run for untouched keys with the
same expiry (a notification that did not arrive within the window counts as later than it).
The central server's own CPU is read over {CPU_WINDOW:g} s while every session beats and none lapses.

{result["table"]}

Server: {result["server"]} (embedded). Machine: {result["machine"]}.
Rerun: `cloudq bench control --write BENCHMARKS.md` (add `--redis-url URL` to measure another server, `--json` for JSON)."""
    write_section("Control plane: deadline → node sleeping", body, path)
