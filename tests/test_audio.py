"""Audio out, through real processes: a node running an ``x11:`` program that plays a tone into its
session's PulseAudio server (in the program's sandbox), the node recording, encoding Opus and
writing ``session:{sid}:audio``, and the stream going quiet while the session sleeps.

Needs ``Xvfb``, ``pulseaudio``, ``parec`` and ``pacat`` (Debian: xvfb pulseaudio pulseaudio-utils;
``.ci/run`` installs them). The browser's side is in ``test_gateway_browser.py``.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import redis
from helpers import Procs, missing_prerequisite, session_field, start_pool, wait_for

from cloudq.client.launcher import Launcher
from cloudq.codec import OpusDecoder
from cloudq.keys import Keys
from cloudq.messages import Control, pack_control
from cloudq.wire import AudioPacket, InputEvent

MISSING = [p for p in ("Xvfb", "pulseaudio", "parec", "pacat") if shutil.which(p) is None]


def tone_app(tmp: Path) -> tuple[str, tuple[str, ...]]:
    """An ``x11:`` app that plays a 440 Hz tone over and over (a 1 s file the sandbox sees
    read-only through ``--program-bind``), and the node options it needs."""
    if MISSING:
        missing_prerequisite(f"audio tests need {', '.join(MISSING)} (apt: xvfb pulseaudio pulseaudio-utils)")
    d = tmp / "tone"
    d.mkdir()
    one = [int(12000 * math.sin(2 * math.pi * 440 * i / 48000)) for i in range(48000)]
    (d / "tone.raw").write_bytes(b"".join(struct.pack("<hh", s, s) for s in one))
    play = f"pacat --raw --format=s16le --rate=48000 --channels=2 --latency-msec=20 {d}/tone.raw"
    return f"x11:sh -c 'while :; do {play}; done'", ("--size", "320x240", "--program-bind", str(d))


def node_stats(r: redis.Redis, keys: Keys, node: str) -> dict[str, int]:
    return json.loads(r.hget(keys.node(node), "stats") or b"{}")


def packets(r: redis.Redis, keys: Keys, sid: str) -> list[AudioPacket]:
    return [AudioPacket.unpack(f) for _, f in r.xrange(keys.audio(sid))]


def test_the_programs_tone_is_streamed_as_opus_and_stops_while_the_session_sleeps(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    app, node_args = tone_app(tmp_path)
    start_pool(r, keys, procs, 1, app, node_args, users=("alice",), heartbeat_ttl=30, idle_timeout=30)
    t = Launcher(r, keys).login("alice", "pw")
    r.set(keys.heartbeat(t.sid), "1", px=30000)
    wait_for(lambda: r.xlen(keys.audio(t.sid)) >= 10, 20, what="audio packets")
    got = packets(r, keys, t.sid)
    assert all(p.codec == "opus" and p.rate == 48000 and p.channels == 2 for p in got)
    dec = OpusDecoder()
    pcm = np.concatenate([dec.decode(p.data) for p in got])
    assert len(pcm) >= 10 * 960 * 2
    rms = float(np.sqrt(np.mean(pcm[-48000:].astype(np.float64) ** 2)))
    assert rms > 3000, f"the tone decodes loud (RMS {rms:.0f}, played at 12000 peak: 8485)"
    # asleep (the sweeper's command): nothing recorded, encoded or written
    node = session_field(r, keys, t.sid, "node")
    r.xadd(keys.node_control(node), pack_control(Control("sleep", t.sid)))
    wait_for(lambda: "audio_starts" in node_stats(r, keys, node) and node_stats(r, keys, node)["sleeping"], 5)
    n = r.xlen(keys.audio(t.sid))
    time.sleep(1.0)
    assert r.xlen(keys.audio(t.sid)) == n, "no audio packets while the session sleeps"
    # input wakes the node: the sound comes back, numbered on from where it stopped
    last = packets(r, keys, t.sid)[-1].seq
    r.xadd(keys.input(t.sid), InputEvent("key", 0, time.time(), key="a").pack())
    wait_for(lambda: r.xlen(keys.audio(t.sid)) > n + 5, 10, what="audio after the wake")
    assert packets(r, keys, t.sid)[n].seq == last + 1
    # the node publishes its counters every second or so: the second start shows up there
    wait_for(lambda: node_stats(r, keys, node)["audio_starts"] == 2, 5, what="the second audio start counted")
