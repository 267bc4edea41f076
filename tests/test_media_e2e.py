"""Media end to end, through real processes: central, a node (probe or paint app), an RQ worker, and
the client kernel (in the test process, or ``cloudq connect`` as a child)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import av
import numpy as np
import redis
from helpers import Procs, node_state, start_pool, wait_for

from cloudq.client.kernel import Kernel
from cloudq.client.launcher import Launcher, Ticket
from cloudq.client.sinks import CallbackSink
from cloudq.keys import Keys
from cloudq.probe import read_probe
from cloudq.settings import Settings
from cloudq.wire import VideoPacket

SIZE = "320x240"


def pool(r: redis.Redis, keys: Keys, procs: Procs, app: str = "probe", **clocks: float) -> None:
    start_pool(r, keys, procs, 1, app, ("--size", SIZE, "--fps", "30"), users=("alice",), **clocks)


def session(r: redis.Redis, keys: Keys) -> Ticket:
    t = Launcher(r, keys).login("alice", "pw")
    wait_for(lambda: node_state(r, keys, "n1") == "active", 15, what="node active")
    return t


class Probe:
    """A kernel whose frames are read back as (last input seq, frame counter)."""

    def __init__(self, r: redis.Redis, keys: Keys, t: Ticket, read: bool = True) -> None:
        self.read = read
        self.seen: list[tuple[int, int]] = []
        self.kernel = Kernel(r, keys, t.sid, Settings.load(r, keys), [CallbackSink(self._frame)])
        self.player = self.kernel.player

    def _frame(self, frame: av.VideoFrame, vp: VideoPacket) -> None:
        self.seen.append(read_probe(self.player.to_rgb(frame)) if self.read else (0, 0))

    def __enter__(self) -> Probe:
        self.kernel.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kernel.close()

    def shows(self, seq: int) -> bool:
        return bool(self.seen) and self.seen[-1][0] == seq


def packets(r: redis.Redis, keys: Keys, sid: str, after: bytes = b"-") -> list[VideoPacket]:
    return [VideoPacket.unpack(f) for _, f in r.xrange(keys.video(sid), min=after)]


def node_stats(r: redis.Redis, keys: Keys) -> dict[str, int]:
    return json.loads(r.hget(keys.node("n1"), "stats") or b"{}")


def test_probe_session_streams_h264_keyframe_first_and_input_reaches_the_app(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool(r, keys, procs, idle_timeout=30)
    t = session(r, keys)
    with Probe(r, keys, t) as probe:
        wait_for(lambda: len(probe.seen) >= 5, 10, what="frames decoded")
        first = packets(r, keys, t.sid)[0]
        assert first.keyframe and first.seq == 0 and (first.width, first.height) == (320, 240)
        ev = probe.kernel.input.send("key", key="a")
        wait_for(lambda: probe.shows(ev.seq), 5, what="input seq shown in the picture")
        counters = probe.player.counters
        assert counters["gaps"] == counters["decode_errors"] == counters["bad_entries"] == 0
        assert counters["sink_errors"] == 0


def test_sleep_stops_encoding_and_frees_the_encoder_and_input_wakes_it_with_an_idr(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool(r, keys, procs, idle_timeout=1.0)
    t = session(r, keys)
    with Probe(r, keys, t) as probe:
        wait_for(lambda: node_state(r, keys, "n1") == "sleeping", 10, what="node asleep")
        wait_for(lambda: node_stats(r, keys).get("encoder_open") == 0, 5, what="encoder freed")
        last = r.xrevrange(keys.video(t.sid), count=1)[0][0]
        time.sleep(0.5)  # an absence cannot be awaited: 15 frame periods with no packet
        assert r.xrevrange(keys.video(t.sid), count=1)[0][0] == last
        ev = probe.kernel.input.send("key", key="a")
        wait_for(lambda: probe.shows(ev.seq), 3, what="woken node shows the input")
        woke = packets(r, keys, t.sid, after=b"(" + last)
        assert woke[0].keyframe, "IDR first after wake"
        assert node_state(r, keys, "n1") == "active"
        assert probe.player.counters["gaps"] == 0


def test_keyframe_request_yields_a_keyframe(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    pool(r, keys, procs, app="paint", idle_timeout=30)
    t = session(r, keys)
    with Probe(r, keys, t, read=False) as probe:  # paint shows no probe code
        wait_for(lambda: r.xlen(keys.video(t.sid)) >= 1, 10)
        last = r.xrevrange(keys.video(t.sid), count=1)[0][0]
        asked = time.monotonic()
        probe.kernel.input.send("keyframe_request")
        got = wait_for(lambda: packets(r, keys, t.sid, after=b"(" + last), 3, what="a packet")
        assert got[0].keyframe and time.monotonic() - asked < 1.5  # before the 2 s GOP keyframe


GARBAGE = [
    {"m": b"\xc1 not msgpack"},
    {"m": VideoPacket(999_999, 0, True, 1.0, b"\x00\x00\x00\x01\x65 not really h264").pack()["m"]},
    {"m": VideoPacket(999_999, 0, False, 1.0, b"truncated").pack()["m"][:-4]},
    {"m": b"\x00" * (5 * 1024 * 1024)},
]


def test_garbage_video_entries_are_counted_dropped_and_playback_recovers(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool(r, keys, procs, idle_timeout=30)
    t = session(r, keys)
    with Probe(r, keys, t) as probe:
        wait_for(lambda: len(probe.seen) >= 3, 10)
        for fields in GARBAGE:
            r.xadd(keys.video(t.sid), fields)
        wait_for(lambda: probe.player.counters["bad_entries"] >= 3, 5, what="bad entries counted")
        requests = [f for _, f in r.xrange(keys.input(t.sid)) if b"keyframe_request" in f[b"m"]]
        assert requests, "the client asked for a keyframe"
        ev = probe.kernel.input.send("key", key="b")
        wait_for(lambda: probe.shows(ev.seq), 5, what="playing again")
        assert probe.kernel._thread.is_alive()


def test_garbage_input_entries_are_counted_by_the_node_which_keeps_serving(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool(r, keys, procs, idle_timeout=30)
    t = session(r, keys)
    with Probe(r, keys, t) as probe:
        wait_for(lambda: len(probe.seen) >= 3, 10)
        for fields in (
            {"m": b"\xc1\xc1"},
            {"m": b"x" * (70 * 1024)},
            {"other": b"1"},
            {"m": VideoPacket(1, 1, True, 1.0, b"x").pack()["m"]},  # a video envelope is no input event
        ):
            r.xadd(keys.input(t.sid), fields)
        ev = probe.kernel.input.send("key", key="a")
        wait_for(lambda: probe.shows(ev.seq), 5, what="input after garbage applied")
        wait_for(lambda: node_stats(r, keys).get("bad_input") == 4, 5, what="bad input counted")


def test_connect_records_an_mp4_that_shows_the_drawing_and_writes_a_snapshot(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    pool(r, keys, procs, app="paint", idle_timeout=30)
    mp4, png = tmp_path / "rec.mp4", tmp_path / "last.png"
    client = procs.start(
        "connect", "--user", "alice", "--password-stdin", "--headless", "--record", str(mp4), "--snapshot", str(png),
        stdin=b"pw\n",
    )  # fmt: skip
    wait_for(lambda: node_state(r, keys, "n1") == "active", 15, what="session active")
    sid = r.hget(keys.node("n1"), "session").decode()
    from cloudq.client.kernel import InputSender

    pen = InputSender(r, keys, sid, first_seq=1000)  # a second input device on the same session
    pen.send("key", key="4")  # blue
    pen.send("mouse_down", x=40, y=120)
    for x in range(60, 281, 20):
        pen.send("mouse_move", x=x, y=120)
    pen.send("mouse_up", x=280, y=120)
    wait_for(lambda: r.xlen(keys.video(sid)) >= 3, 5, what="strokes encoded")
    time.sleep(0.3)  # let the client read the last packets before it is told to stop
    Procs.kill(client, signal.SIGTERM)
    assert client.returncode == 0, procs.output(client)
    with av.open(str(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) >= 2
    row = frames[-1][120, 40:281].astype(int)
    assert (np.abs(row - (30, 70, 220)).max(axis=1) < 40).mean() > 0.9, "the blue stroke is in the recording"
    with av.open(str(png)) as c:
        shot = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    assert shot.shape == (240, 320, 3)
    assert (np.abs(shot[120, 40:281].astype(int) - (30, 70, 220)).max(axis=1) < 40).mean() > 0.9


def test_an_idle_player_reads_rarely_and_its_kernel_stops_at_once(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    """A player whose stream is quiet (a sleeping node) blocks BLOCK s per XREAD (a 0.25 s block
    woke the server four times a second for every idle client), and closing its kernel ends the
    blocked read at once instead of waiting for it."""
    import threading

    from cloudq.client.player import BLOCK
    from cloudq.connection import read_block

    Settings().publish(r, keys)
    client = redis.Redis.from_url(redis_url)  # redis-py's default socket timeout (5 s), unseen by
    # its pool's connection_kwargs: a block of BLOCK s timed out every read of an idle player
    assert read_block(client, BLOCK) < client.connection_pool.make_connection().socket_timeout
    kernel = Kernel(client, keys, "quiet", Settings.load(r, keys), [CallbackSink(lambda *_: None)]).start()
    reads: list[str] = []
    watcher = redis.Redis.from_url(redis_url)

    def watch(m: object, until: float) -> None:
        for c in m.listen():  # type: ignore[attr-defined]
            if c["command"].startswith("ECHO") or time.monotonic() > until:
                return
            if c["command"].startswith("XREAD") and keys.video("quiet") in c["command"]:
                reads.append(c["command"])

    try:
        with watcher.monitor() as m:
            th = threading.Thread(target=watch, args=(m, time.monotonic() + 10), daemon=True)
            th.start()
            time.sleep(1.5)  # the span observed: the reads are what is counted
            redis.Redis.from_url(redis_url).echo("done")
            th.join(10)
        assert len(reads) <= 1, reads  # a 0.25 s block made 5 or 6 (a read issued before the watch began
        # is not seen)
    finally:
        t0 = time.monotonic()
        kernel.close()
        closed_in = time.monotonic() - t0
    assert closed_in < 1.0, closed_in
    assert kernel.failure() is None
    assert kernel.player.counters["redis_errors"] == 0
    client.close()
