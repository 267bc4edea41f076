"""``cloudq bench audio``: a program's sound, from its write to the page, and what it costs the node.

One run starts its own embedded Valkey, a central server, an RQ worker, one node whose ``x11:``
program is ``pacat`` playing from a FIFO this benchmark writes (in the program's sandbox, through
the session's PulseAudio server), a ``cloudq gateway`` and headless Chromium logged in to the page.

- **Latency**: every 400 ms the benchmark writes a 100 ms 1 kHz burst into the FIFO (silence in
  between, paced in real time: 10 ms blocks, at most 20 ms ahead); for each burst, from that
  write (``time.time()``) to (a) the node's first audio packet that carries it (its capture time:
  the node read the frame's last sample), (b) the page's WebCodecs output of that packet, and
  (c) the page's estimate of when it leaves the speakers (decoded + the AudioWorklet's jitter
  buffer + the AudioContext's output latency). Wall clocks of one host.
- **CPU**: the node process (recording, Opus encoding, XADD; its video is a still black screen)
  while a continuous tone plays, against the same while the program plays silence (nothing is
  sent), in % of one core; the session's PulseAudio server's own CPU; the node's own encode time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np

from cloudq.bench.browser import Browser, _free_port, _healthy
from cloudq.bench.media import Rig, _wait
from cloudq.bench.report import machine, write_section
from cloudq.codec import OpusDecoder
from cloudq.percentile import percentile
from cloudq.procstat import all_stats, children_map, tree_cpu
from cloudq.wire import AudioPacket, InputEvent

RATE = 48000
BLOCK = 480  # 10 ms
PERIOD = 0.4
ONSET = 0.05  # RMS (full scale 1) of a frame that carries a burst: the page's threshold (audio.js)
BURST = 0.1


def _tone(n: int, start: int, amp: int) -> bytes:
    s = (amp * np.sin(2 * math.pi * 1000 * (np.arange(start, start + n) / RATE))).astype(np.int16)
    return np.repeat(s, 2).tobytes()


class Feeder(threading.Thread):
    """Writes s16le stereo into the FIFO in real time: ``mode`` = bursts | tone | silence."""

    def __init__(self, fifo: str) -> None:
        super().__init__(daemon=True)
        self.fifo, self.mode, self.stop = fifo, "silence", threading.Event()
        self.bursts: list[float] = []

    def run(self) -> None:
        fd = os.open(self.fifo, os.O_WRONLY)
        t0, n, last_burst = time.monotonic(), 0, -1
        try:
            while not self.stop.is_set():
                due = t0 + n * BLOCK / RATE - 0.02  # at most 20 ms ahead of the player's clock
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                pos = n * BLOCK / RATE
                if self.mode == "tone":
                    data = _tone(BLOCK, n * BLOCK, 12000)
                elif self.mode == "bursts" and pos % PERIOD < BURST:
                    k = int(pos // PERIOD)
                    if k != last_burst:
                        last_burst = k
                        self.bursts.append(time.time())
                    data = _tone(BLOCK, n * BLOCK, 12000)
                else:
                    data = bytes(BLOCK * 4)
                os.write(fd, data)
                n += 1
        finally:
            os.close(fd)


def run(seconds: float = 10.0) -> dict[str, Any]:
    if not shutil.which("pulseaudio") or not shutil.which("pacat"):
        raise RuntimeError(
            "bench audio needs pulseaudio and pacat (apt-get install pulseaudio pulseaudio-utils)"
        )
    result: dict[str, Any] = {"machine": machine(), "seconds": seconds}
    rig = Rig()
    tmp = tempfile.mkdtemp(prefix="cloudq-bench-audio-")
    fifo = os.path.join(tmp, "feed")
    os.mkfifo(fifo, 0o644)
    os.chmod(tmp, 0o755)
    browser = feeder = None
    busy: threading.Event | None = None
    from cloudq.central.auth import Users

    Users(rig.r, rig.keys).add("web", "pw", cost=4)
    try:
        play = f"pacat --raw --format=s16le --rate={RATE} --channels=2 --latency-msec=20 {fifo}"
        node = rig.spawn(
            "node", "--id", "sound", "--host", "bench", "--app", f"x11:{play}", "--size", "320x240",
            "--program-bind", tmp,
        )  # fmt: skip
        _wait(lambda: rig.r.zcard(rig.keys.pool) == 1, 30, "the node registered")
        port, admin = _free_port(), _free_port()
        rig.spawn("gateway", "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin))
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _healthy(url), 20, "the gateway")
        feeder = Feeder(fifo)
        feeder.start()
        browser = Browser(url)
        sid = browser.stats()["sid"]
        busy = threading.Event()

        seen: dict[bytes, AudioPacket] = {}  # the stream keeps 5 s: read it as it goes
        last = [b"0-0"]

        def active() -> None:  # the user is there (no input from the page): the node stays awake
            while not busy.wait(0.2):  # as the launcher does: a TTL of the idle clock (1 s here)
                rig.r.set(rig.keys.activity(sid), "1", px=1000)
                for eid, f in rig.r.xrange(rig.keys.audio(sid), min=b"(" + last[0]):
                    seen[eid] = AudioPacket.unpack(f)
                    last[0] = eid

        rig.r.set(rig.keys.activity(sid), "1", px=1000)
        threading.Thread(target=active, daemon=True).start()
        # a pointer move wakes the node if the run's 1 s idle clock already put it to sleep (the
        # sweeper may have decided so just before the activity above: wake it until it stays awake)
        awake_since = None
        while awake_since is None or time.monotonic() - awake_since < 1.0:
            if rig.r.hget(rig.keys.session(sid), "state") != b"active":
                awake_since = None
                rig.r.xadd(rig.keys.input(sid), InputEvent("mouse_move", 0, time.time(), x=1, y=1).pack())
            elif awake_since is None:
                awake_since = time.monotonic()
            time.sleep(0.1)
        # latency: bursts
        feeder.mode = "bursts"
        time.sleep(seconds)
        feeder.mode = "silence"
        time.sleep(0.5)
        page = browser.stats()["audio"]
        packets = list(seen.items())  # in stream order
        dec, loud = OpusDecoder(), []
        for _, p in packets:
            pcm = dec.decode(p.data)
            if len(pcm) and np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > ONSET * 32768:
                loud.append(p.capture_time)
        node_ms, page_ms, out_ms = [], [], []
        onsets = page.get("onsets") or []
        for t in feeder.bursts:
            cap = next((c for c in loud if c >= t), None)
            if cap is None or cap - t > PERIOD:
                continue
            node_ms.append((cap - t) * 1000)
            on = next((o for o in onsets if abs(o[0] - cap) < 0.001), None)
            if on is not None:
                page_ms.append((on[1] - t) * 1000)
                out_ms.append((on[1] - t) * 1000 + on[2])
        for name, v in (("to_node", node_ms), ("to_page", page_ms), ("to_output", out_ms)):
            result[name] = {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)} if v else None
        result["bursts"] = len(feeder.bursts)
        result["page"] = {
            k: page.get(k) for k in ("frames", "packets", "gaps", "underruns", "dropped", "errors", "state")
        }
        # CPU: a tone, then silence, each `seconds` long
        pid = node.pid

        def cpu() -> tuple[float, float]:
            stats = all_stats()
            kids = children_map(stats)
            pulse = sum(tree_cpu(p, kids) for p, s in stats.items() if s.comm == "pulseaudio")
            own = stats[pid]
            return (own.utime + own.stime) / os.sysconf("SC_CLK_TCK"), pulse

        def stat_of(name: str) -> int:
            return int(json.loads(rig.r.hget(rig.keys.node("sound"), "stats") or b"{}").get(name, 0))

        for mode in ("tone", "silence"):
            feeder.mode = mode
            time.sleep(1.0)
            (n0, p0), enc0, t0 = cpu(), stat_of("audio_encode_us"), time.monotonic()
            time.sleep(seconds)
            (n1, p1), enc1, dt = cpu(), stat_of("audio_encode_us"), time.monotonic() - t0
            result[f"cpu_{mode}"] = {
                "node_pct": (n1 - n0) / dt * 100,
                "pulseaudio_pct": (p1 - p0) / dt * 100,
                "encode_pct": (enc1 - enc0) / 1e6 / dt * 100,
            }
    finally:
        if busy is not None:
            busy.set()
        if feeder is not None:
            feeder.stop.set()
        if browser is not None:
            browser.close()
        rig.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result["table"] = table(result)
    return result


def _fmt(x: dict[str, Any] | None, key: str) -> str:
    return f"{x[key]:.1f} ms" if x else "n/a"


def table(x: dict[str, Any]) -> str:
    rows = [
        "| program writes a burst → | p50 | p99 | n |",
        "|---|---|---|---|",
    ]
    for key, what in (
        ("to_node", "node's Opus packet (capture time)"),
        ("to_page", "page's WebCodecs output (via Redis and the gateway)"),
        ("to_output", "page's speakers (+ jitter buffer + output latency)"),
    ):
        v = x.get(key)
        rows.append(f"| {what} | {_fmt(v, 'p50')} | {_fmt(v, 'p99')} | {v['n'] if v else 0} |")
    tone, quiet = x["cpu_tone"], x["cpu_silence"]
    rows += [
        "",
        "| CPU, % of one core | tone playing | silence |",
        "|---|---|---|",
        f"| node process (record + Opus + XADD; a still screen) | {tone['node_pct']:.1f} | {quiet['node_pct']:.1f} |",
        f"| of which Opus encoding (node counter) | {tone['encode_pct']:.2f} | {quiet['encode_pct']:.2f} |",
        f"| the session's PulseAudio server | {tone['pulseaudio_pct']:.1f} | {quiet['pulseaudio_pct']:.1f} |",
    ]
    return "\n".join(rows)


def write_markdown(result: dict[str, Any], path: str) -> None:
    page = result["page"]
    body = f"""Through real processes: embedded Valkey, central, RQ worker, a node whose `x11:` program is
`pacat` (in its sandbox, playing into the session's PulseAudio server), `cloudq gateway` and
headless Chromium on the page. The benchmark writes the program's input into a FIFO in real time:
for {result["seconds"]:.0f} s a 100 ms 1 kHz burst every 400 ms ({result["bursts"]} bursts), each
timed from the benchmark's write to the first packet / decoded frame that carries it (wall clocks of
one host). Then {result["seconds"]:.0f} s of a continuous tone and {result["seconds"]:.0f} s of
silence for the CPU figures.

{result["table"]}

The first row includes the program's own playback buffer (`pacat --latency-msec=20`) and the
PulseAudio pipe sink's block; one Opus frame is 20 ms, so a burst waits up to 20 ms for the frame
that ends after it. The speakers row adds the page's AudioWorklet jitter buffer (40 ms target,
filled before it plays after silence) and the AudioContext's reported output latency. Silence is
not sent (after a 200 ms tail), so a quiet program costs the node only the reads of its sink.
Page counters at the end: {page["frames"]} frames decoded from {page["packets"]} packets,
{page["gaps"]} seq gaps (silence not sent), {page["underruns"]} underruns, {page["errors"]} decode
errors, AudioContext `{page["state"]}`. Machine: {result["machine"]}.
Rerun: `cloudq bench audio --write BENCHMARKS.md` (`--json` for JSON; needs `pulseaudio`,
`pulseaudio-utils`, `chromium`, `chromium-driver` and `pip install selenium`)."""
    write_section("Audio", body, path)
