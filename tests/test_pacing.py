"""The node's frame clock is its own: against a stock server (``hz 10``, whose blocking-read
timeouts end only on its 100 ms tick) a 30 fps node sends 30 fps, and input latency is what it is
at ``hz 100``. One server, switched between the two with CONFIG SET, so both are measured in the
same run on the same machine."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from helpers import Procs, start_pool, wait_for
from test_media_e2e import Probe, session

from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.percentile import percentile

FPS = 30
WINDOW = 3.0


@pytest.fixture
def hz_server(tmp_path) -> Iterator[tuple[redis.Redis, Procs]]:
    server = EmbeddedServer(hz=10).start()
    r = redis.Redis.from_url(server.url)
    procs = Procs(server.url, "cqp:", str(tmp_path))
    try:
        yield r, procs
    finally:
        procs.stop_all()
        r.close()
        server.stop()


def sent_fps(r: redis.Redis, keys: Keys, sid: str) -> float:
    """Video entries the node added in the last WINDOW seconds (entry ids are server ms)."""
    time.sleep(WINDOW)  # the measurement window itself, not a synchronisation
    last = int(r.xrevrange(keys.video(sid), count=1)[0][0].split(b"-")[0])
    n = len(r.xrange(keys.video(sid), min=f"{last - int(WINDOW * 1000) + 1}-0", max=f"{last}-99999"))
    return n / WINDOW


def input_latency_ms(probe: Probe, n: int = 25) -> float:
    samples = []
    for _ in range(n):
        ev = probe.kernel.input.send("key", key="a")
        t0 = time.monotonic()
        wait_for(lambda ev=ev: probe.shows(ev.seq), 5, interval=0.001, what="input shown")
        samples.append((time.monotonic() - t0) * 1000)
    return percentile(samples, 50)


def test_a_30fps_node_sends_30fps_against_hz_10_and_input_latency_does_not_depend_on_hz(
    hz_server: tuple[redis.Redis, Procs],
) -> None:
    r, procs = hz_server
    keys = Keys(procs.prefix)
    assert int(r.config_get("hz")["hz"]) == 10
    start_pool(
        r,
        keys,
        procs,
        1,
        "probe",
        ("--size", "320x240", "--fps", str(FPS)),
        users=("alice",),
        idle_timeout=60,
    )
    t = session(r, keys)
    with Probe(r, keys, t) as probe:
        wait_for(lambda: len(probe.seen) >= 10, 10, what="frames decoded")
        fps_hz10 = sent_fps(r, keys, t.sid)
        lat_hz10 = input_latency_ms(probe)
        r.config_set("hz", 100)
        fps_hz100 = sent_fps(r, keys, t.sid)
        lat_hz100 = input_latency_ms(probe)
    print(
        f"hz 10: {fps_hz10:.1f} fps, input {lat_hz10:.1f} ms; hz 100: {fps_hz100:.1f} fps, input {lat_hz100:.1f} ms"
    )
    # paced by the server's 100 ms tick it would be about 10 fps; a tenth below 30 allows for the
    # suite's load on 2 cores (30.0 alone; the +-1 bound failed once in a run with five workers)
    assert 0.9 * FPS <= fps_hz10 <= FPS + 1
    assert 0.9 * FPS <= fps_hz100 <= FPS + 1
    # same mechanism at both ticks: an arriving entry ends the read at once
    assert lat_hz10 <= 1.5 * lat_hz100 + 5
