"""``cloudq bench media``: the data plane measured through real processes and real Redis.

One run starts its own embedded Valkey, a central server and an RQ worker, then one node at a time
(``cloudq node`` processes, 1280x720), logs a user in and drives the session with the real client
kernel (player + input sender) in this process:

- input-to-decoded-frame latency with the ``probe`` app (the frame itself says which input it
  shows), next to the floor measured in the same run (RGB->YUV + encode + decode, one process);
- sustained fps and CPU% (scheduler run time, all threads: :mod:`cloudq.procstat`) of the node at 30 and 60 fps;
- CPU of the node sleeping vs active over 10 s each;
- wake latency: first input on a sleeping node -> first decoded frame showing it;
- stream bytes/s for ``paint`` idle, ``paint`` drawing and ``probe``.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import redis

from cloudq.bench.floor import measure_floor
from cloudq.bench.report import machine, write_section
from cloudq.central.auth import Users
from cloudq.client.kernel import Kernel
from cloudq.client.launcher import Launcher
from cloudq.client.sinks import CallbackSink
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.percentile import percentile
from cloudq.probe import read_probe
from cloudq.procs import ProcessGroup
from cloudq.procstat import cpu_seconds
from cloudq.settings import Settings
from cloudq.wire import VideoPacket

PREFIX = "cqm:"
SIZE = (1280, 720)
IDLE = 1.0  # idle timeout of the run: the node sleeps this long after the last activity
HZS = (10, 100)
"""Server ticks measured: the stock 10 and 100 (the node paces frames itself; the figures show it)."""


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > end:
            raise RuntimeError(f"bench: timed out waiting for {what}")
        time.sleep(0.01)
    return v


class Rig:
    """Embedded Valkey + central + worker; nodes and sessions one at a time."""

    def __init__(self) -> None:
        self.server = EmbeddedServer().start()
        self.r = redis.Redis.from_url(self.server.url)
        self.keys = Keys(PREFIX)
        self.tmp = tempfile.mkdtemp(prefix="cloudq-bench-media-")
        self.group = ProcessGroup(
            self.server.url,
            PREFIX,
            log_dir=self.tmp,
            env={
                "CLOUDQ_WORKSPACE": os.path.join(self.tmp, "workspace"),
                "CLOUDQ_STORE": os.path.join(self.tmp, "store"),
            },
        )
        settings = Settings(
            idle_timeout=IDLE, grace=10, idle_close=0, max_session=0, max_warning=0, autosave=0
        )
        settings.publish(self.r, self.keys)
        clocks = [f"--{k.replace('_', '-')}={v}" for k, v in vars(settings).items() if "lockout" not in k]
        self.spawn("central", *clocks)
        self.spawn("worker", "--host", "bench")
        Users(self.r, self.keys).add("bench", "pw", cost=4)

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        return self.group.start(*args)

    def node(self, app: str, fps: int) -> subprocess.Popen[bytes]:
        w, h = SIZE
        node_id = f"{app}{fps}"
        p = self.spawn(
            "node", "--id", node_id, "--host", "bench", "--app", app, "--size", f"{w}x{h}", "--fps", str(fps)
        )
        # the previous node was stopped (and left the pool) first: the new one is the only free node
        _wait(lambda: self.r.zrange(self.keys.pool, 0, -1) == [node_id.encode()], 30, "node registered")
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        self.group.stop(p)

    def close(self) -> None:
        self.group.stop_all()
        self.server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Session:
    """A logged-in client: kernel (heartbeat, player, input) with a probe-reading sink."""

    def __init__(self, rig: Rig, probe: bool) -> None:
        self.rig = rig
        self.launcher = Launcher(rig.r, rig.keys)
        self.ticket = self.launcher.login("bench", "pw")
        self.probe = probe
        self.sent: dict[int, float] = {}
        self.shown: dict[int, float] = {}
        self.frames = 0
        self.lock = threading.Lock()
        self.kernel = Kernel(
            rig.r,
            rig.keys,
            self.ticket.sid,
            Settings.load(rig.r, rig.keys),
            [CallbackSink(self._frame)],
            on_input=lambda: self.launcher.mark_activity(self.ticket.sid),
        ).start()
        _wait(lambda: self.frames > 0, 30, "first frame")

    def _frame(self, frame: av.VideoFrame, vp: VideoPacket) -> None:
        now = time.perf_counter()
        self.frames += 1
        if not self.probe:
            return
        seq, _ = read_probe(self.kernel.player.to_rgb(frame))
        if seq not in self.shown:
            self.shown[seq] = now

    def send(self, kind: str, **kw: Any) -> int:
        with self.lock:
            ev = self.kernel.input.send(kind, **kw)
            self.sent[ev.seq] = time.perf_counter()
        return ev.seq

    def latency_ms(self, seq: int, timeout: float = 5.0) -> float:
        _wait(lambda: seq in self.shown, timeout, f"input {seq} shown")
        return (self.shown[seq] - self.sent[seq]) * 1000.0

    def node_state(self) -> str:
        return (self.rig.r.hget(self.rig.keys.node(self.ticket.node), "state") or b"").decode()

    def close(self) -> None:
        self.kernel.close()
        self.launcher.logout(self.ticket.token)
        _wait(lambda: self.node_state() == "free", 30, "node freed")

    def stream_bytes(self, seconds: float, during: Callable[[], None] | None = None) -> float:
        """Bytes/s of video entries added to the stream over ``seconds`` (wall clock)."""
        key = self.rig.keys.video(self.ticket.sid)
        last = self.rig.r.xrevrange(key, count=1)
        start_id = last[0][0] if last else b"0-0"
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            if during:
                during()
            else:
                time.sleep(0.05)
        total = sum(len(f[b"m"]) for _, f in self.rig.r.xrange(key, min=b"(" + start_id))
        return total / (time.monotonic() - t0)


def keep_active(s: Session, seconds: float) -> None:
    """The user is there (activity refreshed) but gives no input."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.launcher.mark_activity(s.ticket.sid)
        time.sleep(min(0.25, max(0.0, end - time.monotonic())))


def active_window(node: subprocess.Popen[bytes], s: Session, seconds: float) -> dict[str, float]:
    f0, c0, t0 = s.frames, cpu_seconds([node.pid]), time.monotonic()
    keep_active(s, seconds)
    dt = time.monotonic() - t0
    cpu = cpu_seconds([node.pid]) - c0
    return {"fps": (s.frames - f0) / dt, "cpu_pct": 100 * cpu / dt, "cpu_s": cpu, "seconds": dt}


def run(latency_samples: int = 300, cpu_window: float = 10.0, wake_samples: int = 10) -> dict[str, Any]:
    w, h = SIZE
    result: dict[str, Any] = {"machine": machine(), "size": f"{w}x{h}"}
    floor = measure_floor(w, h, frames=300, app="probe", fps=30)
    result["floor_ms"] = {"p50": floor["total_p50_ms"], "p99": floor["total_p99_ms"]}
    rig = Rig()
    try:
        # -- probe at 30 fps: latency, fps/CPU, sleep vs active, wake, bytes/s
        node = rig.node("probe", 30)
        s = Session(rig, probe=True)
        for hz in HZS:
            rig.r.config_set("hz", hz)
            lat = []
            for _ in range(latency_samples):
                seq = s.send("key", key="a")
                lat.append(s.latency_ms(seq))
                time.sleep(random.uniform(0.03, 0.07))  # inputs at random phases of the frame clock
            result[f"hz{hz}"] = {
                "latency_ms": {
                    "p50": percentile(lat, 50),
                    "p99": percentile(lat, 99),
                    "max": max(lat),
                    "n": len(lat),
                },
                "fps30": active_window(node, s, cpu_window),
            }
        rig.r.config_set("hz", HZS[0])  # the rest at the stock tick
        result["latency_ms"] = result[f"hz{HZS[0]}"]["latency_ms"]
        active = result["fps30"] = result[f"hz{HZS[0]}"]["fps30"]
        result["probe_bytes_per_s"] = s.stream_bytes(3.0, during=lambda: keep_active(s, 0.25))
        _wait(lambda: s.node_state() == "sleeping", IDLE + 10, "node asleep")
        c0, t0 = cpu_seconds([node.pid]), time.monotonic()
        time.sleep(cpu_window)
        slept = {"cpu_s": cpu_seconds([node.pid]) - c0, "seconds": time.monotonic() - t0}
        result["sleep"] = slept
        result["sleep_cpu_ratio"] = slept["cpu_s"] / active["cpu_s"] if active["cpu_s"] else float("nan")
        wake = []
        for _ in range(wake_samples):
            _wait(lambda: s.node_state() == "sleeping", IDLE + 10, "node asleep")
            time.sleep(0.2)  # asleep for a moment, not just entering sleep
            wake.append(s.latency_ms(s.send("key", key="w")))
        result["wake_ms"] = {"p50": percentile(wake, 50), "max": max(wake), "n": len(wake)}
        s.close()
        rig.stop(node)

        # -- probe at 60 fps: fps/CPU
        node = rig.node("probe", 60)
        s = Session(rig, probe=False)
        result["fps60"] = active_window(node, s, cpu_window)
        s.close()
        rig.stop(node)

        # -- paint: bytes/s idle and drawing
        node = rig.node("paint", 30)
        s = Session(rig, probe=False)
        result["paint_idle_bytes_per_s"] = s.stream_bytes(6.0, during=lambda: keep_active(s, 0.25))
        pos = {"x": 100, "dx": 7, "down": False}

        def draw() -> None:
            if not pos["down"]:
                s.send("mouse_down", x=pos["x"], y=360)
                pos["down"] = True
            pos["x"] += pos["dx"]
            if not 50 < pos["x"] < w - 50:
                pos["dx"] = -pos["dx"]
            s.send("mouse_move", x=pos["x"], y=360 + int(200 * np.sin(pos["x"] / 80)))
            time.sleep(1 / 60)

        result["paint_drawing_bytes_per_s"] = s.stream_bytes(6.0, during=draw)
        s.close()
        rig.stop(node)
    finally:
        rig.close()
    result["table"] = table(result)
    return result


def table(x: dict[str, Any]) -> str:
    f30, f60 = x["fps30"], x["fps60"]
    rows = [
        "| measure | value | target |",
        "|---|---|---|",
        f"| floor (RGB→YUV + encode + decode + →RGB, one process), p50 / p99 | {x['floor_ms']['p50']:.1f} / {x['floor_ms']['p99']:.1f} ms | |",
    ]
    for hz in HZS:
        h = x[f"hz{hz}"]
        lat, fps = h["latency_ms"], h["fps30"]
        rows += [
            f"| server hz {hz}: input → decoded frame, probe {x['size']}, p50 | {lat['p50']:.1f} ms | ≤ floor + 2 ms |",
            f"| server hz {hz}: input → decoded frame, p99 (n={lat['n']}) | {lat['p99']:.1f} ms | ≤ 20 ms |",
            f"| server hz {hz}: node at 30 fps: sustained fps, CPU | {fps['fps']:.1f} fps, {fps['cpu_pct']:.1f} % | 30 ± 1 fps |",
        ]
    rows += [
        f"| node at 60 fps: sustained fps, CPU | {f60['fps']:.1f} fps, {f60['cpu_pct']:.1f} % | |",
        f"| CPU over {x['sleep']['seconds']:.0f} s: sleeping vs active (30 fps) | {x['sleep']['cpu_s'] * 1000:.0f} ms vs {f30['cpu_s'] * 1000:.0f} ms = {100 * x['sleep_cpu_ratio']:.2f} % | < 1 % |",
        f"| wake: input on a sleeping node → first decoded frame, p50 (max, n={x['wake_ms']['n']}) | {x['wake_ms']['p50']:.1f} ms ({x['wake_ms']['max']:.1f}) | ≤ 30 ms |",
        f"| stream: paint idle | {x['paint_idle_bytes_per_s'] / 1000:.1f} kB/s | |",
        f"| stream: paint drawing (60 mouse moves/s) | {x['paint_drawing_bytes_per_s'] / 1000:.1f} kB/s | |",
        f"| stream: probe at 30 fps | {x['probe_bytes_per_s'] / 1000:.1f} kB/s | |",
    ]
    return "\n".join(rows)


def write_markdown(result: dict[str, Any], path: str) -> None:
    body = f"""Through real processes (embedded Valkey, central, RQ worker, one `cloudq node` at a time at
{result["size"]}, x264 ultrafast/zerolatency, 2 Mbit/s) with the client kernel (player + input
sender) in the benchmark process. Latency is from the client's XADD of an input event to the
decoded frame whose probe code shows that event (read back from the picture); the floor is the same
frames' conversion, encode, decode and conversion back in one process, no Redis. CPU is the node
process's scheduler run time (all threads) from `/proc`. Bytes/s count whole stream entries (envelope
included).

{result["table"]}

Server: embedded Valkey, measured at the stock `hz 10` and at `hz 100` in the same run (the node
paces frames with its own clock and a reader thread hands it the streams' entries, so neither
figure should depend on the server's tick); everything after the first rows runs at `hz 10`.
Machine: {result["machine"]}.
Rerun: `cloudq bench media --write BENCHMARKS.md` (`--json` for JSON); about 2 minutes."""
    write_section("Media", body, path)
