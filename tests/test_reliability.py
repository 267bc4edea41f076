"""Faults that must cost nobody their work or leave anything stuck (issue 9).

Tests that pause or restart Redis run on a server of their own, so the suite's shared server
is never stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from helpers import FAST, Pool, Procs, node_state, publish, session_field, start_pool, wait_for
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from test_userdata import SIZE, connect, draw, flush, ink_rows

from cloudq import jobs, loginflow
from cloudq.central.auth import Users
from cloudq.central.server import Central
from cloudq.client.kernel import Heartbeat
from cloudq.client.launcher import Launcher
from cloudq.embedded import EmbeddedServer
from cloudq.jobs import queue_for
from cloudq.keys import Keys
from cloudq.messages import Control, pack_control, unpack_reply
from cloudq.procs import cloudq_command
from cloudq.procstat import alive, children_map
from cloudq.settings import Settings
from cloudq.wire import InputEvent
from cloudq.workers.store import DirectoryStore


@dataclass
class Own:
    server: EmbeddedServer
    r: redis.Redis
    procs: Procs


@pytest.fixture
def own(keys: Keys, tmp_path: Path) -> Iterator[Own]:
    server = EmbeddedServer(data_dir=tmp_path / "redis").start()
    r = redis.Redis.from_url(server.url, socket_timeout=10)
    p = Procs(server.url, keys.prefix, str(tmp_path))
    try:
        yield Own(server, r, p)
    finally:
        p.stop_all()
        r.close()
        server.stop()


def events(r: redis.Redis, keys: Keys, obj: str = "") -> list[tuple[str, str, str]]:
    return [
        (f[b"from"].decode(), f[b"to"].decode(), f[b"reason"].decode())
        for _, f in r.xrange(keys.events)
        if not obj or f[b"obj"].decode() == obj
    ]


def server_time(r: redis.Redis) -> float:
    sec, usec = r.time()
    return sec + usec / 1e6


def test_a_three_second_redis_pause_declares_nobody_offline_and_keeps_the_drawing(
    own: Own, keys: Keys
) -> None:
    r, procs = own.r, own.procs
    clocks = dict(heartbeat_interval=0.3, heartbeat_ttl=1.0, node_ttl=1.0, idle_timeout=30, grace=30)
    start_pool(r, keys, procs, 2, "paint", ("--size", SIZE, "--fps", "10"), **clocks)
    _, a, hb = connect(r, keys, "alice")
    try:
        draw(r, keys, a.sid, y=30)
        wait_for(lambda: 30 in ink_rows(flush(r, keys, a.node, a.sid, procs)), 10, what="drawn")
        own.server.pause()
        time.sleep(3.0)  # the fault itself: Redis does not answer for 3 s
        own.server.resume()
        resumed = server_time(r)
        # watch until every clock has had a full period past the pause to misjudge it
        wait_for(lambda: server_time(r) > resumed + 3 * 1.0, 10)
        wait_for(lambda: r.exists(keys.node_alive(a.node)) and r.exists(keys.heartbeat(a.sid)), 5)
        assert not [e for e in events(r, keys, f"node:{a.node}") if e[1] == "offline"]
        assert not [e for e in events(r, keys, f"session:{a.sid}") if e[1] == "disconnected"]
        assert session_field(r, keys, a.sid) == "active" and session_field(r, keys, a.sid, "node") == a.node
        assert node_state(r, keys, a.node) == "active"
        assert 30 in ink_rows(flush(r, keys, a.node, a.sid, procs))
        assert any("blind" in e[2] for e in events(r, keys, "central"))
    finally:
        hb.stop.set()


def test_after_a_redis_crash_and_restart_every_process_reconnects_and_the_session_goes_on(
    own: Own, keys: Keys
) -> None:
    r, procs = own.r, own.procs
    clocks = dict(heartbeat_interval=0.3, heartbeat_ttl=1.0, node_ttl=1.0, idle_timeout=30, grace=30)
    start_pool(r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), **clocks)
    _, a, hb = connect(r, keys, "alice")
    try:
        draw(r, keys, a.sid, y=30)
        wait_for(lambda: 30 in ink_rows(flush(r, keys, a.node, a.sid, procs)), 10, what="drawn")
        r.execute_command("WAITAOF", 1, 0, 5000)  # what is written so far is on disk (everysec)
        own.server.kill()
        time.sleep(1.0)  # down for a while
        own.server.start()
        wait_for(lambda: any("restarted" in e[2] for e in events(r, keys, "central")), 15, what="seen")
        wait_for(lambda: r.exists(keys.node_alive(a.node)) and r.exists(keys.heartbeat(a.sid)), 15)
        before = len(r.xrange(keys.video(a.sid)))
        draw(r, keys, a.sid, y=50)  # the node reads input and streams again
        wait_for(lambda: len(r.xrange(keys.video(a.sid))) > before, 10, what="video after restart")
        assert {30, 50} <= ink_rows(flush(r, keys, a.node, a.sid, procs))
        assert session_field(r, keys, a.sid) == "active" and session_field(r, keys, a.sid, "node") == a.node
        assert not [e for e in events(r, keys, f"node:{a.node}") if e[1] == "offline"]
        assert all(p.poll() is None for p in procs.procs)  # nobody died of it
    finally:
        hb.stop.set()


def test_a_session_whose_keys_a_restart_lost_is_closed_with_a_reason_and_its_work_saved(
    keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    server = EmbeddedServer().start()  # no persistence: a restart loses every key
    try:
        r = redis.Redis.from_url(server.url, socket_timeout=10)
        procs.redis_url, procs.urls = server.url, {}  # its own server, without cloudq's ACL users
        clocks = dict(heartbeat_interval=0.3, heartbeat_ttl=1.0, node_ttl=1.0, idle_timeout=30, grace=30)
        pool = start_pool(r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), **clocks)
        _, a, hb = connect(r, keys, "alice")
        hb.stop.set()
        draw(r, keys, a.sid, y=30)
        wait_for(lambda: b'"input": 3' in (r.hget(keys.node(a.node), "stats") or b""), 10, what="applied")
        server.kill()
        server.start()
        wait_for(lambda: session_field(r, keys, a.sid) == "closed", 15, what="recorded as closed")
        assert session_field(r, keys, a.sid, "close_reason") == "server_restarted"
        assert 30 in newest_rows(procs, "alice", tmp_path)
        wait_for(lambda: r.zcard(keys.pool) == 1, 15, what="node back in the pool")
        # the central server publishes its clocks again (on its next pass after it sees the new server)
        wait_for(lambda: r.exists(keys.settings), 10, what="the settings published again")
        assert all(p.poll() is None for p in [pool.central, pool.worker, *pool.nodes])
    finally:
        procs.stop_all()
        server.stop()


def newest_rows(procs: Procs, user: str, tmp: Path) -> set[int]:
    """Ink rows of the newest saved version of ``user``'s canvas."""
    store = DirectoryStore(Path(procs.log_dir) / "store")
    if not store.versions(user):
        return set()
    dest = tmp / f"restored-{time.monotonic_ns()}"
    store.restore(user, dest)
    path = dest / "canvas.npy"
    return ink_rows(np.load(path)) if path.exists() else set()


def test_a_node_declared_offline_rejoins_with_its_session_when_nobody_took_it(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool = start_pool(r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), idle_timeout=30, grace=30)
    _, a, hb = connect(r, keys, "alice")
    try:
        draw(r, keys, a.sid, y=30)
        wait_for(lambda: 30 in ink_rows(flush(r, keys, a.node, a.sid, procs)), 10, what="drawn")
        pool.nodes[0].send_signal(signal.SIGSTOP)  # the node stalls longer than its liveness TTL
        try:
            wait_for(lambda: node_state(r, keys, "n1") == "offline", 10, what="declared offline")
        finally:
            pool.nodes[0].send_signal(signal.SIGCONT)
        wait_for(lambda: session_field(r, keys, a.sid, "node") == "n1", 10, what="rejoined")
        assert node_state(r, keys, "n1") in ("sleeping", "active")
        assert 30 in ink_rows(flush(r, keys, "n1", a.sid, procs))  # the app's state is the live one
        draw(r, keys, a.sid, y=50)  # input wakes it as usual
        wait_for(lambda: session_field(r, keys, a.sid) == "active", 10, what="woke")
        assert {30, 50} <= ink_rows(flush(r, keys, "n1", a.sid, procs))
    finally:
        hb.stop.set()


def test_a_node_declared_offline_whose_session_moved_saves_the_work_to_the_store(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    pool = start_pool(r, keys, procs, 2, "paint", ("--size", SIZE, "--fps", "10"), idle_timeout=30, grace=30)
    _, a, hb = connect(r, keys, "alice")
    try:
        draw(r, keys, a.sid, y=30)
        wait_for(lambda: b'"input": 3' in (r.hget(keys.node(a.node), "stats") or b""), 10, what="applied")
        victim = pool.nodes[int(a.node[1:]) - 1]
        victim.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: session_field(r, keys, a.sid, "node") not in ("", a.node), 10, what="moved")
        finally:
            victim.send_signal(signal.SIGCONT)
        wait_for(lambda: 30 in newest_rows(procs, "alice", tmp_path), 15, what="the old node's save")
        wait_for(lambda: node_state(r, keys, a.node) == "free", 10, what="old node back in the pool")
    finally:
        hb.stop.set()


def procs_at(workspace: Path) -> Procs:
    """A harness whose ``log_dir/workspace`` is ``workspace`` (for ``flush``)."""
    assert workspace.name == "workspace"
    return Procs("", "", str(workspace.parent))


def _up(data_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    clocks = [
        "--heartbeat-interval",
        "0.3",
        "--heartbeat-ttl",
        "1",
        "--node-ttl",
        "1",
        "--idle-timeout",
        "30",
    ]
    with open(log, "ab") as fh:
        p = subprocess.Popen(
            [*cloudq_command(), "-v", "up", "--nodes", "1", "--duration", "120", *clocks, *extra],
            stdout=subprocess.PIPE,
            stderr=fh,
            text=True,
            start_new_session=True,
            cwd=data_dir.parent,
        )
    assert p.stdout is not None
    m = re.search(r"CLOUDQ_REDIS_URL=(\S+)", p.stdout.readline())
    assert m, "cloudq up printed its URL"
    return p, m.group(1)


def _stop_up(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_up_with_a_data_dir_keeps_users_sessions_and_work_across_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "cq"
    keys = Keys()
    p, url = _up(data_dir, tmp_path / "up.log", "--data-dir", str(data_dir))
    try:
        assert "everything is kept in" in (p.stdout.readline() if p.stdout else "")
        r = redis.Redis.from_url(url, socket_timeout=10)
        wait_for(lambda: r.zcard(keys.pool) == 1, 30, what="node up")
        Users(r, keys).add("alice", "pw", cost=4)
        _, a, hb = connect(r, keys, "alice")
        draw(r, keys, a.sid, y=30)
        wait_for(lambda: b'"input": 3' in (r.hget(keys.node(a.node), "stats") or b""), 10, what="applied")
        hb.stop.set()
        old_instance = r.hget(keys.node("node1"), "instance")
        _stop_up(p)  # a graceful stop: the node saves the session's work to the store
        p, url2 = _up(data_dir, tmp_path / "up.log", "--data-dir", str(data_dir))
        assert url2 == url  # same port again: clients find the server where it was
        r = redis.Redis.from_url(url, socket_timeout=10)
        wait_for(lambda: r.zcard(keys.pool) + r.scard(keys.sessions) >= 1, 30, what="node up again")
        # the new node process took the session back with what the user saved
        wait_for(lambda: r.hget(keys.node("node1"), "instance") != old_instance, 30, what="new node")
        _, a2, hb2 = connect(r, keys, "alice")  # the account is still there
        try:
            assert a2.sid == a.sid  # and so is the session (reconnect within grace)
            ws = data_dir / "workspace"
            assert 30 in ink_rows(flush(r, keys, a2.node, a2.sid, procs_at(ws)))
        finally:
            hb2.stop.set()
    finally:
        _stop_up(p)


def test_up_without_a_data_dir_says_everything_is_temporary(tmp_path: Path) -> None:
    p, _ = _up(tmp_path / "x", tmp_path / "up.log")
    try:
        assert p.stdout is not None and "TEMPORARY" in p.stdout.readline()
    finally:
        _stop_up(p)


def test_a_lapsed_heartbeat_saves_the_work_at_once(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    start_pool(r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), idle_timeout=30, grace=30)
    _, a, hb = connect(r, keys, "alice")
    draw(r, keys, a.sid, y=30)
    wait_for(lambda: b'"input": 3' in (r.hget(keys.node(a.node), "stats") or b""), 10, what="applied")
    hb.stop.set()  # the client vanishes (autosave is off, the session is far from idle)
    wait_for(lambda: session_field(r, keys, a.sid) == "disconnected", 10)
    wait_for(lambda: 30 in newest_rows(procs, "alice", tmp_path), 15, what="saved on disconnect")


def test_autosave_goes_on_after_a_reconnect_and_after_a_wake(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    start_pool(
        r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), idle_timeout=30, grace=30, autosave=0.5
    )
    launcher, a, hb = connect(r, keys, "alice")
    hb.stop.set()
    wait_for(lambda: session_field(r, keys, a.sid) == "disconnected", 10)
    hb.join()
    gone = server_time(r)  # away for a few autosave periods
    wait_for(lambda: server_time(r) > gone + 1.5, 5)
    a2 = launcher.login("alice", "pw")  # back within grace: same session
    hb2 = Heartbeat(r, keys, a2.sid, Settings.load(r, keys))
    hb2.start()
    try:
        assert a2.sid == a.sid and a2.status == "reconnect"
        draw(r, keys, a.sid, y=70)  # wakes the node; autosave must be running again
        wait_for(lambda: 70 in newest_rows(procs, "alice", tmp_path), 15, what="autosave after reconnect")
        assert session_field(r, keys, a.sid) == "active"
    finally:
        hb2.stop.set()


# -- nothing stuck ---------------------------------------------------------------------------
def _pool_without_worker(r: redis.Redis, keys: Keys, procs: Procs, **clocks: float) -> None:
    clk = {**FAST, **clocks}
    publish(r, keys, **clk)
    procs.central(**clk)
    procs.node("n1", "h1", "paint", "--size", SIZE, "--fps", "10")
    wait_for(lambda: r.zcard(keys.pool) == 1, 20, what="node registered")
    Users(r, keys).add("alice", "pw", cost=4)


def test_a_session_idle_during_a_slow_mount_still_starts_and_the_node_is_not_stuck(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    _pool_without_worker(r, keys, procs, idle_timeout=0.5, grace=30)
    launcher = Launcher(r, keys)
    a = launcher.login("alice", "pw")
    hb = Heartbeat(r, keys, a.sid, Settings.load(r, keys))
    hb.start()
    try:
        # the mount is slow (no worker yet): the user's activity lapses meanwhile
        wait_for(lambda: not r.exists(keys.activity(a.sid)), 5)
        t = server_time(r)
        wait_for(lambda: server_time(r) > t + 1.0, 5)
        procs.worker()
        wait_for(lambda: ("starting", "active") in [e[:2] for e in events(r, keys, f"session:{a.sid}")], 15)
        wait_for(lambda: node_state(r, keys, "n1") in ("active", "sleeping"), 5, what="node in service")
    finally:
        hb.stop.set()


def test_a_reconnect_during_a_slow_mount_still_starts_the_session(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    _pool_without_worker(r, keys, procs, idle_timeout=30, grace=30)
    launcher = Launcher(r, keys)
    a = launcher.login("alice", "pw")  # no heartbeat: the client is gone during the mount
    wait_for(lambda: not r.exists(keys.heartbeat(a.sid)), 5)
    t = server_time(r)
    wait_for(lambda: server_time(r) > t + 1.0, 5)
    a2 = launcher.login("alice", "pw")  # ... and comes back before the mount ran
    hb = Heartbeat(r, keys, a2.sid, Settings.load(r, keys))
    hb.start()
    try:
        assert a2.sid == a.sid
        procs.worker()
        wait_for(lambda: session_field(r, keys, a.sid) == "active", 15, what="session started")
        assert node_state(r, keys, "n1") == "active"
    finally:
        hb.stop.set()


def test_idle_close_is_re_armed_after_a_reconnect_into_a_sleeping_session(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    start_pool(r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), idle_timeout=0.5, idle_close=2.0)
    launcher = Launcher(r, keys)
    a = launcher.login("alice", "pw")
    hb = Heartbeat(r, keys, a.sid, Settings.load(r, keys))
    hb.start()
    try:
        wait_for(lambda: session_field(r, keys, a.sid) == "sleeping", 15, what="asleep")
        hb.stop.set()
        hb.join()
        wait_for(lambda: session_field(r, keys, a.sid) == "disconnected", 5)
        a2 = launcher.login("alice", "pw")  # reconnects into the sleeping session, gives no input
        assert a2.sid == a.sid
        hb = Heartbeat(r, keys, a2.sid, Settings.load(r, keys))
        hb.start()
        wait_for(lambda: session_field(r, keys, a.sid) == "closed", 10, what="idle close")
        assert session_field(r, keys, a.sid, "close_reason") == "idle"
    finally:
        hb.stop.set()


def test_a_logout_whose_close_job_was_lost_still_closes(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    pool = start_pool(r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), job_lease=1.0)
    launcher, a, hb = connect(r, keys, "alice")
    procs.stop(pool.worker)  # no worker for a moment, so the job waits in the queue ...
    launcher.logout(a.token)
    hb.stop.set()
    q = queue_for(r, keys, "h1")
    wait_for(lambda: q.count >= 1, 5, what="close job queued")
    q.empty()  # ... and is lost (a failover, an operator, a crash between two steps)
    procs.worker()
    wait_for(lambda: session_field(r, keys, a.sid) == "closed", 15, what="closed anyway")
    assert session_field(r, keys, a.sid, "close_reason") == "logout"
    assert node_state(r, keys, "n1") == "free"


def test_a_mount_re_issued_after_its_job_failed_runs_under_its_own_id(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    _pool_without_worker(r, keys, procs, idle_timeout=30, grace=30, job_lease=1.0)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    bad = procs.start("worker", "--host", "h1", CLOUDQ_WORKSPACE=str(blocker / "ws"))  # mounts fail
    launcher = Launcher(r, keys)
    a = launcher.login("alice", "pw")
    hb = Heartbeat(r, keys, a.sid, Settings.load(r, keys))
    hb.start()
    try:
        failed = FailedJobRegistry(keys.job_queue("h1"), connection=r, serializer=JSONSerializer)
        wait_for(lambda: jobs.job_id(keys, "mount", a.sid, 1) in failed.get_job_ids(), 20, what="failed")
        procs.stop(bad)
        procs.worker()
        wait_for(lambda: session_field(r, keys, a.sid) == "active", 15, what="re-issued mount ran")
    finally:
        hb.stop.set()


# -- nothing crosses between users, no process dies of another's bug --------------------------
def _app_pool(r: redis.Redis, keys: Keys, procs: Procs, app: str, **clocks: float) -> Pool:
    clk = {"idle_timeout": 30, "grace": 30, **clocks}
    return start_pool(r, keys, procs, 1, f"apps_for_tests:{app}", ("--size", SIZE, "--fps", "10"), **clk)


@pytest.mark.parametrize("key", ["x", "r"])
def test_an_app_that_raises_closes_the_session_with_app_error_and_the_node_serves_on(
    r: redis.Redis, keys: Keys, procs: Procs, key: str
) -> None:
    pool = _app_pool(r, keys, procs, "Fragile")
    _, a, hb = connect(r, keys, "alice")
    try:
        r.xadd(keys.input(a.sid), InputEvent("key", 1, time.time(), key=key).pack())
        wait_for(lambda: session_field(r, keys, a.sid) == "closed", 20, what="closed")
        assert session_field(r, keys, a.sid, "close_reason").startswith("app_error: ")
        wait_for(lambda: node_state(r, keys, "n1") == "free", 5)
        assert pool.nodes[0].poll() is None
        _, _b, hbb = connect(r, keys, "bob")  # the node serves the next user
        hbb.stop.set()
    finally:
        hb.stop.set()


def test_an_app_that_raises_in_load_closes_the_session_with_app_error(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool = _app_pool(r, keys, procs, "BrokenLoad")
    a = Launcher(r, keys).login("alice", "pw")
    wait_for(lambda: session_field(r, keys, a.sid) == "closed", 20, what="closed")
    assert session_field(r, keys, a.sid, "close_reason").startswith("app_error: load: ")
    wait_for(lambda: node_state(r, keys, "n1") == "free", 5)
    assert pool.nodes[0].poll() is None


def test_a_slow_app_save_does_not_delay_the_node_liveness(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    _app_pool(r, keys, procs, "SlowSave", node_ttl=1.0)
    _, a, hb = connect(r, keys, "alice")
    try:
        draw(r, keys, a.sid, y=30)
        wait_for(lambda: b'"input": 3' in (r.hget(keys.node("n1"), "stats") or b""), 10, what="applied")
        ref = "slow"
        r.xadd(keys.node_control("n1"), pack_control(Control("flush", a.sid, 0, ref)))
        wait_for(lambda: r.hget(keys.node("n1"), "flushed") == b"slow|dirty", 10, what="flushed")
        assert not [e for e in events(r, keys, "node:n1") if e[1] == "offline"]
    finally:
        hb.stop.set()


def _children(pid: int) -> set[int]:
    return set(children_map().get(pid, ()))


def test_up_killed_with_sigkill_leaves_no_orphans(tmp_path: Path) -> None:
    p, url = _up(tmp_path / "x", tmp_path / "up.log", "--workers", "1")
    try:
        r = redis.Redis.from_url(url, socket_timeout=5)
        wait_for(lambda: r.zcard(Keys().pool) == 1, 30, what="node up")
        kids = _children(p.pid)
        assert len(kids) >= 4  # server, central, node, worker
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    wait_for(lambda: not [k for k in kids if alive(k)], 20, what="every child gone")


def test_closing_a_session_whose_mount_never_ran_saves_nothing_of_the_previous_user(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool = start_pool(r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), idle_timeout=30, grace=30)
    la, a, hba = connect(r, keys, "alice")
    draw(r, keys, a.sid, y=30)
    wait_for(lambda: b'"input": 3' in (r.hget(keys.node("n1"), "stats") or b""), 10, what="applied")
    la.logout(a.token)
    hba.stop.set()
    wait_for(lambda: session_field(r, keys, a.sid) == "closed", 20)
    procs.stop(pool.worker)
    lb = Launcher(r, keys)
    b = lb.login("bob", "pw")  # gets n1, whose workspace still holds alice's files
    q = queue_for(r, keys, "h1")
    wait_for(lambda: q.count >= 1, 5, what="mount queued")
    q.empty()  # bob's mount never runs
    procs.worker()
    lb.logout(b.token)
    wait_for(lambda: session_field(r, keys, b.sid) == "closed", 20, what="bob closed")
    store = DirectoryStore(Path(procs.log_dir) / "store")
    assert store.versions("bob") == []  # alice's canvas was not saved as bob's data
    assert len(store.versions("alice")) == 1
    wait_for(lambda: node_state(r, keys, "n1") == "free", 5)


class SilentProxy:
    """A TCP proxy to Redis that can go silent: the connections open at that moment stay open
    but never carry a byte again (half-open, as after a network partition or a dead peer
    without RST); connections made after :meth:`heal` work."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.epoch = 0
        self.silent = False
        self.closed = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                c, _ = self.listener.accept()
            except OSError:
                continue
            self.socks.append(c)
            if self.silent:
                continue  # accepted, never answered
            u = socket.create_connection(("127.0.0.1", self.target))
            self.socks.append(u)
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b, self.epoch), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, epoch: int) -> None:
        a.settimeout(0.2)
        while not self.closed.is_set():
            try:
                data = a.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if self.epoch == epoch:  # a connection from before the partition carries nothing
                try:
                    b.sendall(data)
                except OSError:
                    return

    def partition(self) -> None:
        self.epoch += 1
        self.silent = True

    def heal(self) -> None:
        self.silent = False

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.slow
def test_half_open_connections_hang_no_server_process(
    r: redis.Redis, redis_url: str, keys: Keys, procs: Procs
) -> None:
    proxy = SilentProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        procs.redis_url = f"redis://127.0.0.1:{proxy.port}/0"
        # every role's connection goes through the proxy too
        procs.urls = {k: v.replace(f":{port}/", f":{proxy.port}/") for k, v in procs.urls.items()}
        procs.extra_env["CLOUDQ_SOCKET_TIMEOUT"] = "1"
        start_pool(r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), idle_timeout=30, grace=30)
        proxy.partition()
        cut = server_time(r)
        wait_for(lambda: server_time(r) > cut + 3, 10)  # longer than the socket timeout
        assert time.time() - float(r.hget(keys.sweeper, "last") or 0) > 2  # central cut off too
        proxy.heal()
        wait_for(lambda: node_state(r, keys, "n1") == "free" and r.exists(keys.node_alive("n1")), 30)
        a = Launcher(r, keys).login("alice", "pw")  # central, worker and node all work again
        hb = Heartbeat(r, keys, a.sid, Settings.load(r, keys))
        hb.start()
        try:
            wait_for(lambda: session_field(r, keys, a.sid) == "active", 30, what="session active")
        finally:
            hb.stop.set()
    finally:
        procs.stop_all()
        proxy.close()


# -- nothing grows without bound -------------------------------------------------------------
def test_an_offline_node_is_forgotten_after_node_forget_or_by_the_operator(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool = start_pool(r, keys, procs, 2, "paint", ("--size", SIZE, "--fps", "10"), node_forget=4)
    procs.stop(pool.nodes[0])  # n1 shuts down: offline, then forgotten
    wait_for(lambda: node_state(r, keys, "n1") == "offline", 10)
    wait_for(lambda: not r.exists(keys.node("n1")), 10, what="forgotten")
    assert not r.sismember(keys.nodes, "n1") and not r.exists(keys.node_control("n1"))
    assert not [m for m in r.zrange(keys.deadlines, 0, -1) if m.endswith(b"|n1")]
    out = procs.run("node", "forget", "n2")
    assert out.returncode == 1 and "alive" in out.stderr and "Traceback" not in out.stderr
    Procs.kill(pool.nodes[1])
    wait_for(lambda: node_state(r, keys, "n2") == "offline", 10)
    out = procs.run("node", "forget", "n2")
    assert out.returncode == 0, out.stderr
    assert not r.exists(keys.node("n2")) and not r.sismember(keys.nodes, "n2")
    assert procs.run("node", "forget", "n9").returncode == 1
    assert procs.run("node").returncode == 2  # running a node still needs --id


def test_the_requests_a_dead_central_replica_took_are_answered_by_a_live_one(
    r: redis.Redis, keys: Keys
) -> None:
    """A replica took a login (it moved it onto its own taken list) and died before answering:
    once its beat is older than ``dead_after``, a live replica takes the request back and
    answers it, and forgets the dead one."""
    publish(r, keys, **FAST)
    Users(r, keys, cost=4).add("alice", "pw")
    req = loginflow.login_request("alice", "pw")
    r.rpush(keys.requests_taken("dead-replica"), req.pack())
    r.zadd(keys.centrals, {"dead-replica": 1.0})  # its last beat, long ago
    central = Central(
        r, keys, Settings(**FAST), name="live", notifications=False, dead_after=0.5, bcrypt_cost=4
    )
    central.start()
    try:
        got = r.blpop([keys.reply(req.id)], timeout=10)
        assert got is not None, "the dead replica's request was answered"
        assert unpack_reply(got[1]).status == "queued"  # no node registered: queued, but answered
        assert r.zscore(keys.centrals, "dead-replica") is None and r.zscore(keys.centrals, "live")
        assert not r.exists(keys.requests_taken("dead-replica"))
    finally:
        central.shutdown()
    assert r.zscore(keys.centrals, "live") is None, "a clean stop leaves the set"


def test_user_del_revokes_closes_and_purges_and_a_re_added_name_starts_empty(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    start_pool(r, keys, procs, 1, "paint", ("--size", SIZE, "--fps", "10"), idle_timeout=30, grace=30)
    _, a, hb = connect(r, keys, "alice")
    try:
        draw(r, keys, a.sid, y=30)
        wait_for(lambda: b'"input": 3' in (r.hget(keys.node("n1"), "stats") or b""), 10, what="applied")
        token_key = keys.token(session_field(r, keys, a.sid, "token"))
        out = procs.run("user", "del", "alice")
        assert out.returncode == 0, out.stderr
        assert not r.exists(token_key)  # revoked at once
        wait_for(lambda: session_field(r, keys, a.sid) == "closed", 20, what="session closed")
        assert session_field(r, keys, a.sid, "close_reason") == "user_deleted"
        assert 30 in newest_rows(procs, "alice", tmp_path)  # saved before it closed
        wait_for(lambda: node_state(r, keys, "n1") == "free", 5)
    finally:
        hb.stop.set()
    assert (
        procs.run("user", "add", "alice", "--password-stdin", "--bcrypt-cost", "4", stdin=b"pw\n").returncode
        == 0
    )
    _, a2, hb2 = connect(r, keys, "alice")  # a new account of the same name
    try:
        assert 30 not in ink_rows(flush(r, keys, a2.node, a2.sid, procs))
    finally:
        hb2.stop.set()
    out = procs.run("user", "del", "alice", "--purge")
    assert out.returncode == 0, out.stderr
    assert DirectoryStore(Path(procs.log_dir) / "store").versions("alice") == []
    assert procs.run("user", "del", "alice").returncode == 1  # no such user: a clear error


def test_a_worker_comes_back_by_itself_when_redis_restarts_during_a_job(own: Own, keys: Keys) -> None:
    r, procs = own.r, own.procs
    w = procs.worker()
    q = queue_for(r, keys, "h1")
    q.enqueue("jobs_for_tests.slow_first_attempt", "cqt:test:a", 3, job_id="slow1")
    wait_for(lambda: r.get("cqt:test:a") == b"1", 20, what="job running")
    r.execute_command("WAITAOF", 1, 0, 5000)
    own.server.kill()  # while the job runs: RQ's worker quits on the connection error
    time.sleep(2.0)  # the fault itself: down for longer than redis-py's own retries
    own.server.start()
    q.enqueue("jobs_for_tests.slow_first_attempt", "cqt:test:b", 0, job_id="next")
    wait_for(lambda: r.get("cqt:test:b") == b"1", 30, what="the next job ran")
    assert w.poll() is None
