"""Nothing dies silently: long-lived loops survive what they can survive (a server out of memory, a
flushed script cache) and end with a clear message and an exit code when they cannot, through real
``cloudq`` processes on the suite's server."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import redis
from helpers import FAST, Procs, clock_args, node_state, publish, session_field, start_pool, wait_for
from test_client_headless import stats
from test_metrics import value

from cloudq.central.auth import Users
from cloudq.embedded import free_port
from cloudq.keys import Keys

# the session must not lapse while the server refuses writes (heartbeats, liveness): long clocks
CALM = {**FAST, "heartbeat_ttl": 30.0, "idle_timeout": 60.0, "grace": 60.0, "node_ttl": 15.0}
STREAMING = ("--size", "320x240", "--always-encode")  # a packet every frame: the node writes all the time


def connect(procs: Procs, user: str, *args: str) -> subprocess.Popen[bytes]:
    return procs.start("connect", "--user", user, "--password-stdin", "--headless", *args, stdin=b"pw\n")


def fill_memory(r: redis.Redis) -> None:
    """Fill the server with a big key and cap its memory below what it now uses: every write that
    needs memory gets OOM until the key is deleted (reads and deletes go on)."""
    for _ in range(10):
        r.rpush("big", b"x" * 400_000)  # 4 MB, each piece below proto-max-bulk-len
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 1_000_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        r.set("probe", 1)


def test_a_node_out_of_memory_keeps_its_session_and_stays_registered(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    pc = free_port()
    publish(r, keys, **CALM)
    procs.start("central", *clock_args(**CALM), "--metrics-port", str(pc), "--metrics-addr", "127.0.0.1")
    n1 = procs.node("n1", "h1", "paint", *STREAMING)
    procs.worker()
    wait_for(lambda: r.zcard(keys.pool) == 1, 20, what="node registered")
    Users(r, keys).add("alice", "pw", cost=4)
    js = tmp_path / "stats.json"
    client = connect(procs, "alice", "--stats-json", str(js))
    wait_for(lambda: stats(js).get("frames", 0) >= 1, 20, what="a frame decoded")
    try:
        fill_memory(r)
        # a worker that starts now cannot register (RQ raises out of work()): it waits, it does not exit
        w2 = procs.start("worker", "--host", "h2", "--name", "oomw")
        c2 = procs.start("central", *clock_args(**CALM))  # so does a central server: it waits to set up
        # the node's packets and the sweeper's scripts are refused
        wait_for(lambda: "OutOfMemoryError" in procs.output(n1), 10, what="the node hit OOM")
        wait_for(lambda: "OutOfMemoryError" in procs.output(w2), 10, what="the worker hit OOM")
        wait_for(lambda: "cannot set up yet" in procs.output(c2), 10, what="the second central hit OOM")
        wait_for(
            lambda: value(pc, "cloudq_central_loop_restarts_total", loop="sweep") >= 1,
            10,
            what="the sweeper's restart counted",
        )
        assert n1.poll() is None, procs.output(n1)
        assert session_field(r, keys, "s1") == "active" and not session_field(r, keys, "s1", "close_reason")
    finally:
        r.delete("big")
        r.config_set("maxmemory", 0)
    frames = stats(js).get("frames", 0)
    wait_for(lambda: stats(js).get("frames", 0) > frames, 15, what="video again after memory was freed")
    assert n1.poll() is None and client.poll() is None
    assert node_state(r, keys, "n1") == "active" and r.exists(keys.node_alive("n1"))
    assert session_field(r, keys, "s1") == "active" and not session_field(r, keys, "s1", "close_reason")
    assert "retrying in" in procs.output(n1) and "Traceback" not in procs.output(n1)
    wait_for(lambda: r.sismember("rq:workers", "rq:worker:oomw"), 10, what="the worker registered after all")
    assert w2.poll() is None, procs.output(w2)
    wait_for(lambda: r.zcard(keys.centrals) == 2, 10, what="the second central running after all")
    assert c2.poll() is None and "Traceback" not in procs.output(c2), procs.output(c2)
    Procs.kill(client, signal.SIGTERM)
    assert client.returncode == 0, procs.output(client)


def test_a_script_flush_under_a_running_pool_changes_nothing(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    pool = start_pool(r, keys, procs, 1, "paint", ("--size", "320x240"), users=("alice", "bob"))
    alice_js, bob_js = tmp_path / "alice.json", tmp_path / "bob.json"
    alice = connect(procs, "alice", "--stats-json", str(alice_js))
    wait_for(lambda: stats(alice_js).get("frames", 0) >= 1, 20, what="alice's first frame")
    r.script_flush()
    # every transition runs a script the server no longer has: logout, close, release, login,
    # mount, activate; and the node's liveness refresh
    Procs.kill(alice, signal.SIGTERM)
    assert alice.returncode == 0, procs.output(alice)
    wait_for(lambda: node_state(r, keys, "n1") == "free", 20, what="alice's session closed, n1 free")
    bob = connect(procs, "bob", "--stats-json", str(bob_js))
    wait_for(lambda: stats(bob_js).get("frames", 0) >= 1, 20, what="bob's first frame on n1")
    assert stats(bob_js)["nodes"] == ["n1"]
    for p in (pool.central, *pool.nodes, pool.worker):
        assert p.poll() is None, procs.output(p)
        assert "Traceback" not in procs.output(p)
    Procs.kill(bob, signal.SIGTERM)
    assert bob.returncode == 0, procs.output(bob)


def test_a_player_that_cannot_go_on_ends_the_client_and_the_node_says_why(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    """The video stream turns into a string: the player's XREAD and the node's XADD get WRONGTYPE,
    an error neither can wait out. The client must not show a frozen picture while its heartbeats
    go on: it ends with exit 1 and the reason; the node ends with exit 1 and the reason."""
    pool = start_pool(r, keys, procs, 1, "paint", STREAMING, users=("alice",))
    js = tmp_path / "stats.json"
    client = connect(procs, "alice", "--stats-json", str(js))
    wait_for(lambda: stats(js).get("frames", 0) >= 1, 20, what="a frame decoded")
    with r.pipeline(transaction=True) as pipe:
        pipe.delete(keys.video("s1")).set(keys.video("s1"), "not a stream").execute()
    assert client.wait(10) == 1, procs.output(client)
    out = procs.output(client)
    last = out.strip().splitlines()[-1]
    assert last.startswith("cloudq: the video player stopped (ResponseError: WRONGTYPE"), last
    assert last.endswith("the session was ended"), last
    assert "Traceback" not in out
    assert stats(js)["exit_code"] == 1
    n1 = pool.nodes[0]
    assert n1.wait(10) == 1, procs.output(n1)
    out = procs.output(n1)
    assert "cloudq: node n1 stopped on an unexpected error: ResponseError: WRONGTYPE" in out, out
    assert "Traceback" not in out
