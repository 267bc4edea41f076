"""``cloudq bench cost``'s machinery: the population engine against real processes, and the node's
``--always-encode`` baseline. Structure and basic truths only; no figure is asserted."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import redis
from helpers import Procs

from cloudq.bench import nodecost
from cloudq.bench.population import Habits, Mode, PopulationConfig, run_population
from cloudq.keys import Keys
from cloudq.procstat import tree_cpu
from cloudq.wire import VideoPacket
from cloudq.workers.apps import PaintApp
from cloudq.workers.node import MediaConfig, Streamer

W, H = 320, 240


def run_ticks(s: Streamer, seconds: float) -> None:
    """Drive the streamer as the node loop would (deadline-paced, bounded)."""
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        due = s.deadline()
        if due is not None and due > now:
            time.sleep(min(due, end) - now)  # stands in for the node's blocking XREAD timeout
        s.tick(time.monotonic())


def video(r: redis.Redis, keys: Keys, sid: str) -> list[VideoPacket]:
    return [VideoPacket.unpack(f) for _, f in r.xrange(keys.video(sid))]


def test_always_encode_streams_every_tick_of_an_unchanged_canvas(
    r: redis.Redis, keys: Keys, tmp_path
) -> None:
    base = MediaConfig(width=W, height=H, fps=20, workspace=str(tmp_path))
    always = MediaConfig(width=W, height=H, fps=20, workspace=str(tmp_path), always_encode=True)
    s_on = Streamer(r, keys, "on2", PaintApp(W, H), base, Counter())
    s_off = Streamer(r, keys, "off", PaintApp(W, H), always, Counter())
    run_ticks(s_on, 0.5)
    run_ticks(s_off, 0.5)
    assert len(video(r, keys, "on2")) == 1, "paint idle: the IDR, then nothing"
    assert len(video(r, keys, "off")) >= 5, "always-encode: a frame on every tick (20 fps for 0.5 s)"


def test_tree_cpu_counts_children() -> None:
    import os
    import subprocess
    import sys

    p = subprocess.Popen(
        [sys.executable, "-c", "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass"]
    )
    try:
        p.wait(20)
    finally:
        p.kill()
    # the child was reaped by this process: its CPU shows in our cutime
    assert tree_cpu(os.getpid()) >= 0.25


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_population_runs_both_modes_and_accounts_for_every_process(tmp_path) -> None:
    # short visits and breaks (simulated seconds / 60): users come and go, so 4 users share 2 nodes
    habits = Habits(
        idle_gap=60, p_break=0.2, long_break=(120, 240), p_drop=0.2, visit=120, min_visit=60, away=90
    )
    cfg = PopulationConfig(users=4, nodes=2, duration=7, time_scale=60, seed=3, habits=habits)
    runs = {m.name: run_population(cfg, m, log_dir=str(tmp_path / m.name)) for m in (Mode.on(60), Mode.off())}
    for name, x in runs.items():
        json.dumps(x)  # a report is plain data
        assert not x["errors"], (name, x["errors"])
        # the sessions' streams on a media server apart from the control server (the deployment's layout)
        assert set(x["cpu_s"]) == {"valkey", "media:m1", "central", "worker", "node:n1", "node:n2", "clients"}
        assert set(x["cpu_by_role"]) == {"valkey", "media", "central", "worker", "node", "clients"}
        assert x["cpu_s"]["media:m1"] > 0, "frames and input went through the media server"
        assert all(v >= 0 for v in x["cpu_s"].values())
        assert x["cpu_s"]["node:n1"] > 0 and x["cpu_s"]["node:n2"] > 0 and x["cpu_s"]["clients"] > 0
        assert x["server_cpu_s"] == pytest.approx(sum(v for k, v in x["cpu_s"].items() if k != "clients"))
        assert set(x["peak_rss_mib"]) == {"n1", "n2"} and all(v > 0 for v in x["peak_rss_mib"].values())
        assert x["users_served"] == cfg.users, f"{name}: every user got a node"
        assert x["sessions"] >= cfg.users and x["users_per_node"] == x["sessions"] / cfg.nodes
        assert (
            x["queue_wait_s"]["n"] == x["sessions"] and x["queue_wait_s"]["p95"] >= x["queue_wait_s"]["p50"]
        )
        assert x["user_hours"] > 0 and x["frames_decoded"] > 0 and x["inputs"] > 0
        assert sum(x["node_state_share"].values()) == pytest.approx(1.0)
        for spans in x["timeline"].values():
            assert spans[0][0] == pytest.approx(0.0, abs=1e-6) and spans[-1][1] == pytest.approx(
                x["window_s"], abs=1
            )
    # the report: the control plane is the control server, the central server and the worker; the
    # media server (frames and input) is server CPU, on a line of its own, not control plane
    from cloudq.bench import cost

    x = cost.result_of(cfg, runs["on"], runs["off"])
    on = runs["on"]["cpu_by_role"]
    assert x["control_plane_share"] == pytest.approx(
        (on["valkey"] + on["central"] + on["worker"]) / runs["on"]["server_cpu_s"]
    )
    assert (
        x["media_share"] == pytest.approx(on["media"] / runs["on"]["server_cpu_s"]) and x["media_share"] > 0
    )
    assert x["valkey_central_worker_share"] == pytest.approx(x["control_plane_share"] + x["media_share"])
    assert "media servers (the sessions' streams; not control plane)" in x["table"]
    cost.write_markdown(x, str(tmp_path / "BENCH.md"), draw=False)
    text = (tmp_path / "BENCH.md").read_text()
    assert "1 more as media server" in text and "is not control plane" in text
    assert runs["off"]["sleep_share"] == 0.0, "without the method no node ever sleeps"
    assert runs["on"]["sleep_share"] > 0.0, "with the method idle nodes sleep"
    assert runs["off"]["always_encode"] and not runs["on"]["always_encode"]


def test_bench_cost_refuses_bad_options_with_a_clear_message(procs: Procs) -> None:
    out = procs.run("bench", "cost", "--activity", "1.5")
    assert out.returncode == 2 and "--activity" in out.stderr and "Traceback" not in out.stderr
    out = procs.run("bench", "cost", "--users", "0")
    assert out.returncode == 2 and "--users" in out.stderr and "Traceback" not in out.stderr
    out = procs.run("bench", "cost", "--size", "720p")
    assert out.returncode == 2 and "--size" in out.stderr and "Traceback" not in out.stderr
    out = procs.run("bench", "cost", "--help")
    assert out.returncode == 0
    for opt in (
        "--users",
        "--nodes",
        "--duration",
        "--activity",
        "--seed",
        "--time-scale",
        "--state-seconds",
        "--size",
        "--media-servers",
        "--json",
        "--write",
    ):
        assert opt in out.stdout


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_node_states_show_what_the_method_saves_and_where_it_cannot() -> None:
    x = nodecost.measure(PopulationConfig(), seconds=1.0)
    assert list(x["on"]) == ["free", "awake idle", "drawing", "asleep"]
    assert list(x["off"]) == ["free", "awake idle", "drawing"]
    on, off = x["on"], x["off"]
    for states in (on, off):
        for cpu in states.values():
            assert set(cpu) == {"valkey", "media", "central", "worker", "node"}
            assert all(v >= 0 for v in cpu.values())
    # paint idle encodes nothing; an always-encoding node encodes 30 frames a second of it
    assert off["awake idle"]["node"] > 2 * on["awake idle"]["node"]
    # asleep, the node only refreshes its liveness; drawing, it renders and encodes
    assert on["asleep"]["node"] < on["drawing"]["node"] / 5
    # the ceiling is the ratio of those figures, and lower activity raises it
    assert nodecost.ceiling(x, 0.1) > nodecost.ceiling(x, 0.3) > 1.0
    a3 = nodecost.break_even(x, 3.0)
    assert nodecost.ceiling(x, a3) == pytest.approx(3.0)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_each_session_event_is_timed_alone_on_the_control_plane() -> None:
    """Each event costs the control plane something, a wake (one script) far less than a login
    (bcrypt, a job, an ACL user) or a sleep with its save job."""
    from cloudq.bench import events

    x = events.measure(PopulationConfig(), repeats=1)
    assert set(x["ms"]) == set(events.EVENTS) and all(len(v) >= 1 for v in x["samples_ms"].values())
    assert all(v >= 0 for v in x["ms"].values()) and x["idle_ms_per_s"] > 0
    assert x["ms"]["wake"] < x["ms"]["login"] and x["ms"]["wake"] < x["ms"]["sleep (saved)"]
    # apart: the node's part (a login starts the program, more than a wake's keyframe costs it)
    assert all(set(roles) == set(events.ROLES) for roles in x["role_ms"].values())
    assert x["role_ms"]["login"]["node"] > x["role_ms"]["wake"]["node"]


def test_the_projection_puts_each_measured_cost_at_its_real_rate() -> None:
    """The arithmetic of the 100-node projection, on made-up costs: every node-second of a
    user-hour is in one state, events come at the habits' real rates, and the totals are the
    rows' sums."""
    from cloudq.bench import projection

    h = Habits(activity=0.3)
    r = projection.rates(h)
    on, off = r["on"], r["off"]
    assert on["drawing_s"] == off["drawing_s"] == pytest.approx(0.3 * 3600)
    assert on["drawing_s"] + on["awake idle_s"] + on["asleep_s"] <= 3600 + 1e-6
    assert off["drawing_s"] + off["awake idle_s"] == pytest.approx(3600)
    assert on["sleep (saved)"] > 1 and on["login"] >= off["login"] >= on["close"] - 1e-9 > 0
    ms = {"login": 20.0, "sleep (saved)": 30.0, "wake": 1.0, "close": 30.0}
    node_ms = {"login": 200.0, "sleep (saved)": 5.0, "wake": 2.0, "close": 50.0}
    ev = {"idle_ms_per_s": 5.0, "ms": ms, "role_ms": {e: {"node": v} for e, v in node_ms.items()}}
    st = {
        "on": {
            "free": {"node": 0.1, "valkey": 0.2},
            "drawing": {"node": 30.0, "valkey": 1.2},
            "awake idle": {"node": 1.0, "valkey": 0.3},
            "asleep": {"node": 0.1, "valkey": 0.2},
        },
        "off": {
            "free": {"node": 0.1, "valkey": 0.2},
            "drawing": {"node": 30.0, "valkey": 1.5},
            "awake idle": {"node": 25.0, "valkey": 0.7},
        },
    }
    p = projection.project(h, ev, st)
    for mode in ("on", "off"):
        assert p["total"][mode] == pytest.approx(sum(p["rows"][mode].values()))
    assert p["cpu_ratio"] == pytest.approx(p["total"]["off"] / p["total"]["on"]) and p["cpu_ratio"] > 1
    assert 0 < p["control_plane_share"] < p["valkey_central_worker_share"] < 1
    # the node's part of each event and Valkey's media traffic (above a free node's) are counted
    rows = p["rows"]["on"]
    assert rows[f"node login: {r['on']['login']:.2f}/h x 200.0 ms"] == pytest.approx(r["on"]["login"] * 0.2)
    media = rows[f"media drawing (Valkey): {r['on']['drawing_s']:.0f} s/h x 1.00 %"]
    assert media == pytest.approx(r["on"]["drawing_s"] * 0.01)
    assert p["media_on"] == pytest.approx(sum(v for k, v in rows.items() if k.startswith("media ")))
    # the less the users draw, the more the method saves
    assert projection.project(Habits(activity=0.1), ev, st)["cpu_ratio"] > p["cpu_ratio"]
