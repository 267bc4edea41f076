"""Operator commands through real processes: drain under load, closing a session, disabling a
user, the live status table, and the events stream naming who did what and why."""

from __future__ import annotations

import getpass
import subprocess
import threading

import pytest
import redis
from helpers import Procs, events, node_state, session_field, start_pool, wait_for

from cloudq.client.launcher import ClientError, Launcher
from cloudq.keys import Keys


def connect(procs: Procs, user: str, *args: str) -> subprocess.Popen[bytes]:
    return procs.start("connect", "--user", user, "--password-stdin", "--headless", *args, stdin=b"pw\n")


def admin(procs: Procs, *args: str) -> subprocess.CompletedProcess[str]:
    out = procs.run(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_a_drained_node_finishes_its_session_and_never_takes_a_new_one(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    start_pool(r, keys, procs, nodes=2, grace=30, idle_timeout=30)
    alice, bob = Launcher(r, keys), Launcher(r, keys)
    ta, tb = alice.login("alice", "pw"), bob.login("bob", "pw")
    drained = ta.node
    wait_for(lambda: node_state(r, keys, drained) == "active", 15, what="alice's node active")
    admin(procs, "node", "drain", drained, "--reason", "kernel update")
    # the current session goes on (these launchers send no heartbeats: it waits in grace, on its node)
    assert session_field(r, keys, ta.sid) in ("active", "sleeping", "disconnected")
    assert session_field(r, keys, ta.sid, "node") == drained
    carol: list[object] = []
    waiting = threading.Thread(target=lambda: carol.append(Launcher(r, keys).login("carol", "pw", wait=30)))
    waiting.start()  # carol waits in the queue (her launcher keeps her place)
    wait_for(lambda: r.lrange(keys.queue, 0, -1) == [b"carol"], 10, what="carol queued")
    alice.logout(ta.token)
    wait_for(lambda: node_state(r, keys, drained) == "free", 15, what="drained node freed")
    # free but drained: out of the pool, and carol still waits for the other node
    assert r.zscore(keys.pool, drained) is None
    assert r.lrange(keys.queue, 0, -1) == [b"carol"]
    bob.logout(tb.token)
    waiting.join(30)
    assert carol, "carol never got a node"
    carol_sid = r.hget(keys.user("carol"), "session").decode()
    assert session_field(r, keys, carol_sid, "node") == tb.node != drained
    assigned_after = [e for e in events(r, keys, f"node:{drained}") if e["to"] == "assigned"]
    assert len(assigned_after) == 1  # alice's, before the drain: nothing since
    drain_ev = [e for e in events(r, keys, f"node:{drained}") if "drained by" in e["reason"]]
    assert drain_ev and drain_ev[0]["reason"] == f"drained by {getpass.getuser()}: kernel update"
    admin(procs, "node", "undrain", drained)
    assert r.zscore(keys.pool, drained) is not None
    assert "-" in admin(procs, "status").stdout  # still renders
    bad = procs.run("node", "drain", "nope")
    assert bad.returncode == 1 and "no node 'nope'" in bad.stderr


def test_session_close_saves_frees_the_node_and_tells_the_client_why(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    start_pool(r, keys, procs, nodes=1, idle_timeout=30)
    client = connect(procs, "alice", "--duration", "60")
    wait_for(lambda: node_state(r, keys, "n1") == "active", 20, what="session active")
    sid = r.hget(keys.user("alice"), "session").decode()
    out = admin(procs, "session", "close", sid, "--reason", "maintenance at noon")
    assert f"session {sid} is closing" in out.stdout
    assert client.wait(30) == 6
    assert "closed by the operator: maintenance at noon" in procs.output(client)
    wait_for(lambda: session_field(r, keys, sid) == "closed", 15, what="session closed")
    assert node_state(r, keys, "n1") == "free" and r.zscore(keys.pool, "n1") is not None
    saved = [e for e in events(r, keys, f"session:{sid}") if e["to"] == "saved"]
    assert saved, "the close saved the user's data"
    asked = [e for e in events(r, keys, f"session:{sid}") if e["reason"].startswith("close requested by")]
    assert asked[0]["reason"] == f"close requested by {getpass.getuser()}: admin: maintenance at noon"
    assert procs.run("session", "close", sid).returncode == 1  # gone: a clear error


def test_a_disabled_user_is_closed_and_refused_until_enabled(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    start_pool(r, keys, procs, nodes=1, idle_timeout=30)
    client = connect(procs, "bob", "--duration", "60")
    wait_for(lambda: node_state(r, keys, "n1") == "active", 20, what="session active")
    admin(procs, "user", "disable", "bob", "--reason", "abuse report")
    assert client.wait(30) == 6
    assert "account was disabled" in procs.output(client)
    wait_for(lambda: node_state(r, keys, "n1") == "free", 15, what="node freed")
    again = connect(procs, "bob", "--duration", "5")
    assert again.wait(30) == 4
    assert "disabled" in procs.output(again)
    with pytest.raises(ClientError) as wrong:
        Launcher(r, keys).login("bob", "wrong")
    assert wrong.value.kind == "invalid"  # a wrong password never learns that the account is disabled
    admin(procs, "user", "enable", "bob")
    assert Launcher(r, keys).login("bob", "pw").status == "assigned"
    reasons = [e["reason"] for e in events(r, keys, "user:bob")]
    assert f"disabled by {getpass.getuser()}: abuse report" in reasons
    assert f"enabled by {getpass.getuser()}" in reasons


def test_status_watch_shows_per_node_fps_and_cpu(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    start_pool(r, keys, procs, nodes=1, app="probe", node_args=("--size", "320x240"), idle_timeout=30)
    client = connect(procs, "alice", "--duration", "30")
    wait_for(lambda: node_state(r, keys, "n1") == "active", 20, what="session active")
    out = admin(procs, "status", "--watch", "--count", "3", "--interval", "1")
    tables = out.stdout.split("cloudq status at ")
    assert len(tables) == 4  # '' before the first
    last = tables[-1]
    assert "\x1b[" not in out.stdout  # not a terminal: no screen control codes
    line = next(x for x in last.splitlines() if x.strip().startswith("n1"))
    fps = float(line.split("fps=")[1].split()[0])
    assert 20 <= fps <= 40, line  # the probe renders every frame at 30 fps
    assert "cpu=" in line and "alice" in last
    client.terminate()
