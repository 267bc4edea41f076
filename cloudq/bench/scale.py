"""``cloudq bench scale``: what the media plane costs its Redis servers per session, and how the
cost splits over several media servers (:mod:`cloudq.media`).

Packets are real: a desktop-like 1280x720 picture (windows, a terminal being typed into, a moving
pointer) encoded with the codec's H.264 encoder as a node does (``ultrafast``, 2 Mbit/s, an IDR
every 2 s); their sizes, keyframes and P-frames, are what the load sends.

Load: generator processes (asyncio, one connection per publisher and one per reader, as a node
and a client have) run S sessions spread over M embedded media servers (placed in turn, as
``create_session`` does). Each session is a publisher ``XADD``\\ ing ``VideoPacket`` envelopes
with the node's ``MAXLEN ~`` and a reader in ``XREAD BLOCK`` (the player), in one of three states:

- **active**: a frame every 1/30 s (an IDR every 2 s, P-frames between);
- **idle** (active, nothing changes: the method encodes on change only): an IDR every 2 s;
- **asleep**: nothing is sent; the reader stays blocked (1 s blocks, as the player).

Per state and server count: the media servers' CPU (all their threads, from ``/proc``) over the
window per session, their memory (``used_memory`` above the empty servers') per session, and the
publish → read latency of every packet (p50/p99). The generators need CPU too: on this 2-core
machine they, not the servers, are the limit, so the table reports per-session costs and a
projection (sessions per server core = 1 / CPU share per session), not a saturation point.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import time
from fractions import Fraction
from typing import Any

import numpy as np
import redis

from cloudq.bench.report import machine, write_section
from cloudq.codec import get_encoder
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.percentile import percentile
from cloudq.procstat import cpu_seconds
from cloudq.wire import VideoPacket

SECTION = "Media plane: server cost per session (`cloudq bench scale`)"
FPS, GOP = 30.0, 2.0
MAXLEN = 2 * int(2 * FPS * GOP) + 64  # the node's video MAXLEN ~ (MediaConfig.video_maxlen)
STATES = ("active", "idle", "asleep")
PREFIX = "cqs:"


def desktop_packets(frames: int = 90) -> tuple[list[int], list[int]]:
    """Sizes (bytes) of the keyframes and P-frames of a real 1280x720 encode of a desktop-like
    picture: two windows, a glyph typed into the terminal and the pointer moved every frame."""
    w, h = 1280, 720
    enc = get_encoder("h264", w, h, FPS, bitrate=2_000_000, preset="ultrafast", gop_seconds=GOP,
                      time_base=Fraction(1, 1000))  # fmt: skip
    rng = np.random.default_rng(1)
    img = np.full((h, w, 3), 0xE0, np.uint8)
    img[40:680, 60:700] = 0xFF  # a window
    img[40:64, 60:700] = (40, 80, 160)  # its title bar
    img[100:600, 760:1220] = 0x20  # a terminal
    keys: list[int] = []
    deltas: list[int] = []
    for i in range(frames):
        row, col = 110 + 16 * ((i // 40) % 30), 770 + 10 * (i % 40)
        img[row : row + 12, col : col + 8] = rng.integers(120, 255, (12, 8, 3), dtype=np.uint8)  # a glyph
        px, py = 100 + 7 * i % 1000, 300 + 3 * i % 300
        frame = img.copy()
        frame[py : py + 16, px : px + 10] = 0  # the pointer
        for p in enc.encode(frame, i * int(1000 / FPS), force_keyframe=False):
            (keys if p.keyframe else deltas).append(len(p.data))
    enc.close()
    return keys, deltas


async def _session(url: str, sid: str, state: str, sizes: tuple[list[int], list[int]], until: float,
                   lat: list[float], counts: dict[str, int]) -> None:  # fmt: skip
    keys = Keys(PREFIX)
    pub, sub = redis.asyncio.Redis.from_url(url), redis.asyncio.Redis.from_url(url)
    key = keys.video(sid)
    kf, pf = sizes
    payload = os.urandom(max(kf) + 16)

    async def publish() -> None:
        seq, t0 = 0, time.monotonic()
        last_key = -GOP
        period = 1 / FPS if state == "active" else GOP
        while (now := time.monotonic()) < until:
            is_key = now - last_key >= GOP
            if is_key:
                last_key = now
            n = random.choice(kf if is_key else pf)
            vp = VideoPacket(seq, int((now - t0) * 1000), is_key, time.time(), payload[:n])
            await pub.xadd(key, vp.pack(), maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
            counts["sent"] += 1
            seq += 1
            await asyncio.sleep(
                max(0.0, t0 + seq * period - time.monotonic()) if state == "active" else period
            )

    async def read() -> None:
        last = "$"
        while time.monotonic() < until:
            got = await sub.xread({key: last}, count=100, block=1000)
            now = time.time()
            for _, entries in got or []:
                for eid, fields in entries:
                    last = eid
                    lat.append(now - VideoPacket.unpack(fields).capture_time)
                    counts["read"] += 1

    try:
        await asyncio.gather(read(), *([publish()] if state != "asleep" else []))
    finally:
        await pub.aclose()
        await sub.aclose()


def _generator(jobs: list[tuple[str, str]], state: str, sizes: tuple[list[int], list[int]], until: float,
               out: Any) -> None:  # fmt: skip
    lat: list[float] = []
    counts = {"sent": 0, "read": 0}

    async def main() -> None:
        await asyncio.gather(*(_session(u, s, state, sizes, until, lat, counts) for u, s in jobs))

    asyncio.run(main())
    out.put((lat, counts))


def _used_memory(servers: list[EmbeddedServer]) -> int:
    total = 0
    for s in servers:
        r = redis.Redis.from_url(s.url)
        total += int(r.info("memory")["used_memory"])
        r.close()
    return total


def measure(servers: list[EmbeddedServer], sessions: int, state: str, sizes: tuple[list[int], list[int]],
            window: float, generators: int, warmup: float = 2.0) -> dict[str, Any]:  # fmt: skip
    """One load: ``sessions`` in ``state`` over ``servers``; the servers' cost over ``window`` s."""
    for s in servers:
        redis.Redis.from_url(s.url).flushall()
    base_mem = _used_memory(servers)
    jobs = [(servers[i % len(servers)].url, f"s{i}") for i in range(sessions)]
    until = time.monotonic() + warmup + window + 1.5
    q: Any = mp.get_context("fork").Queue()
    procs = [
        mp.get_context("fork").Process(target=_generator, args=(jobs[g::generators], state, sizes, until, q))
        for g in range(generators)
    ]
    for p in procs:
        p.start()
    time.sleep(warmup)
    pids = [s.proc.pid for s in servers if s.proc]
    per_server0 = [cpu_seconds([p]) for p in pids]
    t0 = time.monotonic()
    time.sleep(window)
    per_server = [cpu_seconds([p]) - c for p, c in zip(pids, per_server0, strict=True)]
    elapsed = time.monotonic() - t0
    mem = _used_memory(servers) - base_mem
    lat: list[float] = []
    counts = {"sent": 0, "read": 0}
    for _ in procs:
        got_lat, got_counts = q.get(timeout=window + warmup + 30)
        lat += got_lat
        for k in counts:
            counts[k] += got_counts[k]
    for p in procs:
        p.join(10)
    cpu = sum(per_server) / elapsed
    return {
        "servers": len(servers),
        "sessions": sessions,
        "state": state,
        "server_cpu": cpu,  # cores
        "cpu_per_session": cpu / sessions,
        "per_server_cpu": [c / elapsed for c in per_server],
        "mem_per_session_kib": mem / sessions / 1024,
        "packets_per_s": counts["sent"] / (warmup + window + 1.5),
        "latency_ms": {
            "p50": percentile(lat, 50) * 1000 if lat else None,
            "p99": percentile(lat, 99) * 1000 if lat else None,
            "n": len(lat),
        },
    }


def run(sessions: int = 60, loads: tuple[int, ...] = (20, 60, 120), window: float = 8.0,
        generators: int = 2, max_servers: int = 3) -> dict[str, Any]:  # fmt: skip
    """Per state at ``sessions`` on 1 server; active on 1..``max_servers``; active latency by load."""
    sizes = desktop_packets()
    servers = [EmbeddedServer().start() for _ in range(max_servers)]
    rows: list[dict[str, Any]] = []
    try:
        for state in STATES:
            rows.append(measure(servers[:1], sessions, state, sizes, window, generators))
        for m in range(2, max_servers + 1):
            rows.append(measure(servers[:m], sessions, "active", sizes, window, generators))
        by_load = [measure(servers[:1], n, "active", sizes, window, generators) for n in loads]
    finally:
        for s in servers:
            s.stop()
    active = rows[0]["cpu_per_session"]
    result: dict[str, Any] = {
        "machine": machine(),
        "packet_bytes": {
            "keyframe_median": int(np.median(sizes[0])),
            "pframe_median": int(np.median(sizes[1])),
            "pframe_p90": int(np.percentile(sizes[1], 90)),
        },
        "rows": rows,
        "by_load": by_load,
        "sessions_per_core_active": 1 / active if active else None,
        "sessions_32_cores_active": 32 / active if active else None,
    }
    result["table"] = table(result)
    return result


def table(res: dict[str, Any]) -> str:
    pb = res["packet_bytes"]
    lines = [
        f"Packets (real H.264 encodes of a 1280x720 desktop, 2 Mbit/s ultrafast): IDR median "
        f"{pb['keyframe_median']} B, P-frame median {pb['pframe_median']} B (p90 {pb['pframe_p90']} B).",
        "",
        "| state | media servers | sessions | server CPU (% of a core) | per session (% of a core) | "
        "split over servers (% of a core each) | memory per session (KiB) | publish→read p50 / p99 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lat = r["latency_ms"]
        lat_s = f"{lat['p50']:.2f} / {lat['p99']:.2f}" if lat["p50"] is not None else "-"
        split = " + ".join(f"{c * 100:.1f}" for c in r["per_server_cpu"])
        lines.append(
            f"| {r['state']} | {r['servers']} | {r['sessions']} | {r['server_cpu'] * 100:.1f} | "
            f"{r['cpu_per_session'] * 100:.3f} | {split} | {r['mem_per_session_kib']:.0f} | {lat_s} |"
        )
    lines += ["", "| active sessions on 1 server | server CPU (% of a core) | publish→read p50 / p99 (ms) |",
              "|---|---|---|"]  # fmt: skip
    for r in res["by_load"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['sessions']} | {r['server_cpu'] * 100:.1f} | {lat['p50']:.2f} / {lat['p99']:.2f} |"
        )
    if res["sessions_per_core_active"]:
        lines += [
            "",
            f"Projection from the active per-session cost: one server core carries about "
            f"{res['sessions_per_core_active']:.0f} active sessions at 30 fps; a 32-core host running "
            f"32 media servers about {res['sessions_32_cores_active']:.0f}.",
        ]
    return "\n".join(lines)


def write_markdown(res: dict[str, Any], path: str) -> None:
    body = (
        f"Measured on {res['machine']} by `cloudq bench scale` (rerun: `cloudq bench scale --write "
        f"BENCHMARKS.md`). Generators and servers share this machine's 2 cores, so the figures are "
        f"per-session costs, not a saturation point: the servers' CPU is their own (from /proc), while "
        f"the publish→read latency includes the Python generators' scheduling, whose p99 grows with "
        f"the generators' load (and anything else running), not the servers'.\n\n{res['table']}\n"
    )
    write_section(SECTION, body, path)
