"""The cloud client without a window, through real processes: ``cloudq connect --headless`` driven by
a script, recording, stats, kill -9 and reconnect, Redis pausing under it, bad scripts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import redis
from helpers import ROLE_OF, Procs, node_state, session_field, start_pool, wait_for

from cloudq.central.auth import Users
from cloudq.client.script import ScriptError, parse_script
from cloudq.embedded import EmbeddedServer, free_port
from cloudq.keys import Keys
from cloudq.procs import cloudq_command

BLUE = (30, 70, 220)
RED = (220, 30, 30)
DRAW = """# pick blue, draw a line along y=120
0.0 key 4
0.2 mouse_down 40 120
0.3 mouse_move 100 120
0.4 mouse_move 200 120
0.5 mouse_up 280 120
"""


def pool(
    r: redis.Redis, keys: Keys, procs: Procs, app: str = "paint", **clocks: float
) -> subprocess.Popen[bytes]:
    """Central, node n1 (320x240, returned), a worker, user alice/pw; idle and grace 30 s."""
    clk = {"idle_timeout": 30.0, "grace": 30.0, **clocks}
    return start_pool(
        r, keys, procs, 1, app, ("--size", "320x240", "--fps", "30"), users=("alice",), **clk
    ).nodes[0]


def connect(procs: Procs, *args: str) -> subprocess.Popen[bytes]:
    return procs.start("connect", "--user", "alice", "--password-stdin", "--headless", *args, stdin=b"pw\n")


def stats(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def share(row: np.ndarray, colour: tuple[int, int, int]) -> float:
    """Fraction of the pixels in ``row`` within H.264 noise of ``colour``."""
    return float((np.abs(row.astype(int) - colour).max(axis=1) < 40).mean())


def frames_of(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_script_carries_key_down_up_text_and_wheel_for_real_programs() -> None:
    evs = parse_script(
        "0 key_down shift\n0.1 key_up shift\n0.2 key ctrl+c\n"
        "0.3 text echo hi # there > note.txt\n0.4 wheel 0 -3\n"
    )
    assert [(e.type, e.fields()) for e in evs] == [
        ("key_down", {"key": "shift"}),
        ("key_up", {"key": "shift"}),
        ("key", {"key": "ctrl+c"}),
        ("text", {"text": "echo hi # there > note.txt"}),
        ("wheel", {"dx": 0, "dy": -3}),
    ]
    for text, err in (
        ("0 text\n", "text takes the string"),
        ("0 wheel 0 0\n", "must not both be 0"),
        ("0 wheel 1\n", "wheel takes integer DX DY"),
        ("0 key_down\n", "key_down takes exactly one key name"),
    ):
        with pytest.raises(ScriptError, match=err):
            parse_script(text)


def test_script_errors_name_the_line_and_exit_2_before_connecting(tmp_path: Path) -> None:
    assert [e.type for e in parse_script(DRAW)] == [
        "key",
        "mouse_down",
        "mouse_move",
        "mouse_move",
        "mouse_up",
    ]
    for text, words in [
        ("0.1 key a\n0.2 jump 1 2\n", "line 2: unknown event 'jump'"),
        ("x key a\n", "line 1: expected seconds first"),
        ("1 mouse_down 10\n", "line 1: mouse_down takes X Y"),
        ("1 mouse_up 10 ten\n", "line 1: mouse_up takes integer X Y"),
        ("1 key a\n\n# ok\n0.5 key b\n", "line 4: time 0.5 goes back"),
        ("-1 key a\n", "line 1: time must be"),
        ("2\n", "line 1: missing the event"),
    ]:
        with pytest.raises(ScriptError, match=words):
            parse_script(text)
    bad = tmp_path / "bad.txt"
    bad.write_text("0 key a\n1 mouse_move 1\n")
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: a script error must come first
    out = subprocess.run(
        [*cloudq_command(), "connect", "--user", "u", "--password-stdin", "--headless", "--script", str(bad)],
        input="pw\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={"CLOUDQ_REDIS_URL": down, "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"cloudq: {bad} line 2: mouse_move takes X Y, e.g. 'mouse_move 100 200'"


def test_scripted_drawing_is_recorded_and_the_stats_tell_what_the_session_saw(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    pool(r, keys, procs)
    script, mp4, js = tmp_path / "draw.txt", tmp_path / "rec.mp4", tmp_path / "stats.json"
    script.write_text(DRAW)
    client = connect(procs, "--script", str(script), "--record", str(mp4), "--stats-json", str(js))
    wait_for(lambda: stats(js).get("script_events_sent") == 5, 20, what="script played")
    wait_for(lambda: stats(js).get("input_latency_ms", {}).get("count", 0) >= 1, 5, what="a latency")
    wait_for(lambda: r.exists(keys.activity("s1")), 2, what="activity marked")
    Procs.kill(client, signal.SIGTERM)
    assert client.returncode == 0, procs.output(client)
    last = frames_of(mp4)[-1]
    assert share(last[120, 40:281], BLUE) > 0.9, "the scripted blue stroke is in the recording"
    assert share(last[60, 40:281], (255, 255, 255)) > 0.9, "and nothing else was drawn"
    s = stats(js)
    assert s["sid"] == "s1" and s["nodes"] == ["n1"] and "active" in s["states"]
    assert s["frames"] >= 2 and s["keyframes"] >= 1
    assert s["gaps"] == s["bad_entries"] == s["decode_errors"] == 0
    assert s["reconnects"] == [] and s["exit_code"] == 0 and s["close_reason"] == ""
    lat = s["input_latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] < 2000, lat
    assert s["counters"]["inputs_sent"] == 5 and s["counters"]["heartbeats"] >= 1


def test_a_killed_client_started_again_within_grace_gets_its_session_node_and_drawing_back(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    pool(r, keys, procs)
    script, js = tmp_path / "draw.txt", tmp_path / "first.json"
    script.write_text(DRAW)
    first = connect(procs, "--script", str(script), "--stats-json", str(js))
    wait_for(lambda: stats(js).get("script_events_sent") == 5, 20, what="script played")
    wait_for(lambda: stats(js).get("input_latency_ms", {}).get("count", 0) >= 4, 5, what="strokes shown")
    Procs.kill(first)  # SIGKILL: no logout, the heartbeat just stops
    wait_for(lambda: session_field(r, keys, "s1") == "disconnected", 10, what="heartbeat lapsed")
    wait_for(lambda: node_state(r, keys, "n1") == "sleeping", 5, what="node asleep")
    png, js2 = tmp_path / "again.png", tmp_path / "again.json"
    again = connect(procs, "--snapshot", str(png), "--stats-json", str(js2))
    wait_for(lambda: stats(js2).get("frames", 0) >= 1, 15, what="the last picture shown again")
    Procs.kill(again, signal.SIGTERM)
    assert again.returncode == 0, procs.output(again)
    assert "session s1 on node n1 (reconnect)" in procs.output(again)
    with av.open(str(png)) as c:
        shot = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    assert share(shot[120, 40:281], BLUE) > 0.9, "the drawing survived the client's death"


def test_client_rides_out_a_redis_pause_and_keeps_receiving_frames(tmp_path: Path, keys: Keys) -> None:
    server = EmbeddedServer().start()
    procs = Procs(server.url, keys.prefix, str(tmp_path))
    r = redis.Redis.from_url(server.url)
    try:
        pool(r, keys, procs, app="probe", node_ttl=10.0)  # the nodes outlive the outage
        script, js = tmp_path / "keys.txt", tmp_path / "stats.json"
        # a user who keeps typing: every 0.2 s for a minute (also what wakes the node after the pause)
        script.write_text("".join(f"{i * 0.2:.1f} key a\n" for i in range(300)))
        client = connect(
            procs, "--script", str(script), "--stats-json", str(js), "--socket-timeout", "0.8"
        )  # fmt: skip
        wait_for(lambda: stats(js).get("frames", 0) >= 20, 20, what="frames flowing")
        server.pause()
        try:
            wait_for(lambda: stats(js).get("states", [""])[-1] == "reconnecting", 5, what="client noticed")
            paused = stats(js)["frames"]
            time.sleep(3)  # the outage itself: three seconds of a server that does not answer
        finally:
            server.resume()
        wait_for(lambda: stats(js).get("reconnects"), 20, what="logged in again")
        got = stats(js)["reconnects"][0]
        assert got["status"] == "reconnect" and got["node"] == "n1" and got["down_s"] >= 2
        wait_for(lambda: stats(js)["frames"] > paused + 30, 15, what="frames after the pause")
        assert client.poll() is None, procs.output(client)
        Procs.kill(client, signal.SIGTERM)
        assert client.returncode == 0, procs.output(client)
        s = stats(js)
        assert s["sid"] == "s1" and s["nodes"] == ["n1"] and s["exit_code"] == 0
        assert "reconnecting" in s["states"] and s["states"][-1] != "reconnecting"
        assert s["counters"]["redis_errors"] >= 1 and s["keyframe_requests"] >= 1
        assert "Traceback" not in procs.output(client)
    finally:
        procs.stop_all()
        r.close()
        server.stop()


def test_a_queued_client_rides_out_a_redis_pause_and_gets_the_node_when_it_frees(
    tmp_path: Path, keys: Keys
) -> None:
    """The queue wait survives what a session survives: it used to exit 5 at the first socket
    timeout ("lost the server while queued") however short the outage."""
    server = EmbeddedServer().start()
    procs = Procs(server.url, keys.prefix, str(tmp_path))
    r = redis.Redis.from_url(server.url)
    try:
        pool(r, keys, procs, app="probe", node_ttl=10.0)
        Users(r, keys).add("bob", "pw", cost=4)
        first = connect(procs)
        wait_for(lambda: session_field(r, keys, "s1") == "active", 20, what="alice's session")
        js = tmp_path / "bob.json"
        bob = procs.start(
            "connect", "--user", "bob", "--password-stdin", "--headless", "--stats-json", str(js),
            "--socket-timeout", "0.8", stdin=b"pw\n",
        )  # fmt: skip
        wait_for(lambda: r.lpos(keys.queue, "bob") == 0, 20, what="bob queued")
        # logged in and waiting (settings read, first position shown): the pause hits the queue wait
        wait_for(lambda: "queued: position 1" in procs.output(bob), 20, what="bob waiting in the queue")
        server.pause()
        try:
            time.sleep(3)  # the outage itself: three seconds of a server that does not answer
        finally:
            server.resume()
        assert bob.poll() is None, procs.output(bob)
        Procs.kill(first, signal.SIGTERM)  # alice logs out: her node goes to bob
        wait_for(lambda: stats(js).get("frames", 0) >= 1, 30, what="bob's first frame")
        Procs.kill(bob, signal.SIGTERM)
        assert bob.returncode == 0, procs.output(bob)
        assert "Traceback" not in procs.output(bob)
    finally:
        procs.stop_all()
        r.close()
        server.stop()


def test_client_follows_its_session_to_another_node_when_its_node_dies(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    n1 = pool(r, keys, procs, app="probe")
    n2 = procs.node("n2", "h1", "probe", "--size", "320x240", "--fps", "30")
    wait_for(lambda: r.zcard(keys.pool) == 2, 20, what="second node registered")
    js = tmp_path / "stats.json"
    client = connect(procs, "--stats-json", str(js))
    wait_for(lambda: stats(js).get("frames", 0) >= 10, 20, what="frames flowing")
    first = stats(js)["nodes"][0]
    other = "n2" if first == "n1" else "n1"
    Procs.kill(n1 if first == "n1" else n2)
    wait_for(lambda: stats(js).get("nodes") == [first, other], 20, what="client followed the move")
    moved_at = stats(js)["frames"]
    wait_for(lambda: stats(js)["frames"] > moved_at + 10, 15, what="frames from the new node")
    assert session_field(r, keys, "s1", "node") == other
    Procs.kill(client, signal.SIGTERM)
    assert client.returncode == 0, procs.output(client)
    assert f"session moved to node {other}" in procs.output(client)


def test_max_session_warning_is_shown_once_then_the_close_is_explained_with_exit_6(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    pool(r, keys, procs, max_session=2.5, max_warning=2.0)
    js = tmp_path / "stats.json"
    client = connect(procs, "--stats-json", str(js))
    assert client.wait(20) == 6
    out = procs.output(client)
    assert out.count("warning: the session reaches its maximum length soon") == 1
    assert (
        out.strip().splitlines()[-1]
        == "cloudq: the session was closed: it reached the maximum session length"
    )
    s = stats(js)
    assert s["warning"] == "max_session" and s["close_reason"] == "max_session" and s["exit_code"] == 6
    assert "Traceback" not in out


def test_a_stream_with_nothing_decodable_ends_the_client_with_exit_7(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    n1 = pool(r, keys, procs, node_ttl=30.0)
    js = tmp_path / "stats.json"
    client = connect(procs, "--stats-json", str(js), "--stream-timeout", "1.5")
    wait_for(lambda: stats(js).get("frames", 0) >= 1, 20, what="a frame decoded")
    os.killpg(n1.pid, signal.SIGSTOP)  # the node stops producing; only garbage arrives
    try:

        def garbage_until_exit() -> bool:
            r.xadd(keys.video("s1"), {"m": b"\xc1 not a video packet"})
            return client.poll() is not None

        wait_for(garbage_until_exit, 15, interval=0.1, what="the client gave up")
    finally:
        os.killpg(n1.pid, signal.SIGCONT)
    assert client.returncode == 7, procs.output(client)
    last = procs.output(client).strip().splitlines()[-1]
    assert last.startswith("cloudq: the video stream is unusable: nothing decodable for 1.5 s"), last
    s = stats(js)
    assert s["exit_code"] == 7 and s["bad_entries"] >= 10 and s["keyframe_requests"] >= 1


def test_a_second_login_takes_the_session_over_and_the_first_client_says_so(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    pool(r, keys, procs)
    js = tmp_path / "first.json"
    first = connect(procs, "--stats-json", str(js))
    wait_for(lambda: stats(js).get("frames", 0) >= 1, 20, what="first client playing")
    second = connect(procs, "--duration", "20")
    assert first.wait(15) == 6
    last = procs.output(first).strip().splitlines()[-1]
    assert last == "cloudq: the session was taken over by another login of the same user"
    assert second.poll() is None, "the second client has the session"
    assert "session s1 on node n1 (reconnect)" in procs.output(second)
    Procs.kill(second, signal.SIGTERM)
    assert second.returncode == 0


def test_an_idle_session_says_when_it_will_close(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    pool(r, keys, procs, idle_timeout=1.0, idle_close=60.0)
    js = tmp_path / "stats.json"
    client = connect(procs, "--stats-json", str(js))
    wait_for(lambda: "sleeping" in stats(js).get("states", []), 15, what="session asleep")
    wait_for(lambda: "idle: the node is asleep" in procs.output(client), 5, what="idle warning")
    assert "closes after 60 s without input" in procs.output(client)
    Procs.kill(client, signal.SIGTERM)
    assert client.returncode == 0


def test_a_session_closed_while_the_client_was_away_is_explained_and_not_replaced(
    tmp_path: Path, keys: Keys
) -> None:
    """The operator closes the session during an outage and the close completes (saved, node
    freed, the session's Redis user dropped) before the client can look. It used to log in again
    (which started a second session on the free node), log that one out and say "grace"; then,
    with ACLs on, to find its credentials refused and say "taken over" after 2 s. It resumes with
    its token instead, and the central server tells it why the session ended."""
    from cloudq.local.cluster import setup_acl
    from cloudq.state import StateMachine
    from cloudq.tokens import session_acl_user

    server = EmbeddedServer().start()
    urls = setup_acl(server.url, keys)
    procs = Procs(urls["admin"], keys.prefix, str(tmp_path), {c: urls[role] for c, role in ROLE_OF.items()})
    r = redis.Redis.from_url(urls["admin"])
    client: subprocess.Popen[bytes] | None = None
    try:
        start_pool(
            r, keys, procs, 2, "probe", ("--size", "320x240", "--fps", "30"), users=("alice",),
            idle_timeout=30.0, grace=30.0, node_ttl=10.0,
        )  # fmt: skip
        js = tmp_path / "stats.json"
        client = connect(procs, "--stats-json", str(js), "--socket-timeout", "0.8")
        wait_for(lambda: stats(js).get("frames", 0) >= 5, 20, what="frames flowing")
        server.pause()
        try:
            wait_for(lambda: stats(js).get("states", [""])[-1] == "reconnecting", 5, what="client noticed")
            os.killpg(client.pid, signal.SIGSTOP)  # it has had no answer since: it cannot have looked
        finally:
            server.resume()
        assert StateMachine(r, keys).admin_close("s1", "admin: maintenance", "tester") == "ok"
        wait_for(lambda: r.hget(keys.session("s1"), "state") == b"closed", 20, what="close completed")
        wait_for(lambda: r.acl_getuser(session_acl_user("s1")) is None, 5, what="session user dropped")
        os.killpg(client.pid, signal.SIGCONT)
        assert client.wait(20) == 6, procs.output(client)
        out = procs.output(client)
        assert out.strip().splitlines()[-1] == "cloudq: the session was closed by the operator: maintenance"
        s = stats(js)
        assert s["close_reason"] == "admin: maintenance" and s["exit_code"] == 6 and s["reconnects"] == []
        assert r.get(keys.seq) == b"1", "no second session was started"
        assert r.hget(keys.user("alice"), "session") in (None, b"") and r.lpos(keys.queue, "alice") is None
        assert "Traceback" not in out
    finally:
        if client is not None and client.poll() is None:
            os.killpg(client.pid, signal.SIGCONT)
        procs.stop_all()
        r.close()
        server.stop()
