"""User data follows the user between time-shared nodes: mount and save through RQ jobs."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import FAST
from helpers import Procs, node_state, publish, session_field, start_pool, wait_for

from cloudq.central.auth import Users
from cloudq.client.kernel import Heartbeat
from cloudq.client.launcher import Launcher, Ticket
from cloudq.keys import Keys
from cloudq.messages import Control, pack_control
from cloudq.settings import Settings
from cloudq.state import JobResult
from cloudq.wire import InputEvent
from cloudq.workers.data import workspace_dir
from cloudq.workers.store import DirectoryStore

SIZE = "160x120"


def pool(r: redis.Redis, keys: Keys, procs: Procs, nodes: int = 2, **clocks: float) -> list:
    clk = {"grace": 30, "idle_timeout": 30, **clocks}
    return start_pool(r, keys, procs, nodes, "paint", ("--size", SIZE, "--fps", "10"), **clk).nodes


def connect(r: redis.Redis, keys: Keys, user: str) -> tuple[Launcher, Ticket, Heartbeat]:
    launcher = Launcher(r, keys)
    t = launcher.login(user, "pw")
    hb = Heartbeat(r, keys, t.sid, Settings.load(r, keys))
    hb.start()
    # 5 s on an idle machine; the bound leaves room for a loaded one (the suite runs 4 workers)
    wait_for(lambda: session_field(r, keys, t.sid) == "active", 40, what=f"{user} active")
    return launcher, t, hb


def draw(r: redis.Redis, keys: Keys, sid: str, y: int) -> None:
    now = time.time()
    evs = [
        InputEvent("mouse_down", 1, now, x=10, y=y, button=1),
        InputEvent("mouse_move", 2, now, x=120, y=y, button=1),
        InputEvent("mouse_up", 3, now, x=120, y=y, button=1),
    ]
    for ev in evs:
        r.xadd(keys.input(sid), ev.pack())


def flush(r: redis.Redis, keys: Keys, node: str, sid: str, procs: Procs) -> np.ndarray | None:
    """Make the node write its app's state (if input changed it) and return the workspace canvas."""
    ref = uuid.uuid4().hex[:12]
    r.xadd(keys.node_control(node), pack_control(Control("flush", sid, 0, ref)))
    wait_for(
        lambda: (r.hget(keys.node(node), "flushed") or b"").decode().split("|")[0] == ref, 10, what="flush"
    )
    path = workspace_dir(Path(procs.log_dir) / "workspace", node) / "canvas.npy"
    return np.load(path) if path.exists() else None


def ink_rows(canvas: np.ndarray | None) -> set[int]:
    if canvas is None:
        return set()
    background = canvas[0, 0]
    return {int(y) for y in np.nonzero(np.any(canvas != background, axis=(1, 2)))[0]}


def test_nodes_are_time_shared_and_each_user_sees_only_their_own_data(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool(r, keys, procs, nodes=2)
    la, a, hba = connect(r, keys, "alice")
    lc, c, hbc = connect(r, keys, "carol")
    assert {a.node, c.node} == {"n1", "n2"}
    draw(r, keys, a.sid, y=30)
    wait_for(
        lambda: 30 in ink_rows(flush(r, keys, a.node, a.sid, procs)),
        10,
        what="alice's stroke",
    )
    la.logout(a.token)
    hba.stop.set()
    wait_for(lambda: session_field(r, keys, a.sid) == "closed", 20, what="alice closed")
    store = DirectoryStore(Path(procs.log_dir) / "store")
    assert store.versions("alice"), "closing saved alice's data"
    # bob gets alice's old node and sees a blank canvas of his own
    _, b, hbb = connect(r, keys, "bob")
    assert b.node == a.node
    assert ink_rows(flush(r, keys, b.node, b.sid, procs)) == set()
    # alice comes back while bob holds her old node: another node, her drawing restored
    lc.logout(c.token)
    hbc.stop.set()
    wait_for(lambda: session_field(r, keys, c.sid) == "closed", 20)
    _, a2, hba2 = connect(r, keys, "alice")
    try:
        assert a2.node == c.node != a.node
        rows = ink_rows(flush(r, keys, a2.node, a2.sid, procs))
        assert 30 in rows
    finally:
        hbb.stop.set()
        hba2.stop.set()


def test_a_dead_node_moves_its_session_with_the_last_saved_version(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    nodes = pool(r, keys, procs, nodes=2, autosave=0.5)
    _, a, hb = connect(r, keys, "alice")
    try:
        draw(r, keys, a.sid, y=60)
        store = DirectoryStore(Path(procs.log_dir) / "store")
        wait_for(lambda: store.versions("alice"), 15, what="an autosave")
        Procs.kill(nodes[int(a.node[1:]) - 1], signal.SIGKILL)
        other = "n2" if a.node == "n1" else "n1"
        wait_for(lambda: session_field(r, keys, a.sid, "node") == other, 10, what="moved")
        wait_for(lambda: session_field(r, keys, a.sid) == "active", 20, what="active again")
        rows = ink_rows(flush(r, keys, other, a.sid, procs))
        assert 60 in rows
        assert node_state(r, keys, a.node) == "offline"
    finally:
        hb.stop.set()


def _save_versions(store: DirectoryStore, tmp: Path, user: str, rows: list[int]) -> None:
    for y in rows:
        d = tmp / f"src{y}"
        d.mkdir()
        canvas = np.full((120, 160, 3), 255, np.uint8)
        canvas[y] = 0
        np.save(d / "canvas.npy", canvas)
        store.save(user, d)


def test_corrupt_newest_version_falls_back_to_the_one_before_and_says_so(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    store = DirectoryStore(Path(procs.log_dir) / "store")
    _save_versions(store, tmp_path, "alice", [20, 40])
    newest = sorted((Path(procs.log_dir) / "store" / "alice").glob("*.tar"))[-1]
    raw = bytearray(newest.read_bytes())
    raw[600] ^= 0xFF
    newest.write_bytes(bytes(raw))
    pool(r, keys, procs, nodes=1)
    _, a, hb = connect(r, keys, "alice")
    try:
        assert 20 in ink_rows(flush(r, keys, a.node, a.sid, procs))
        notes = [f[b"reason"].decode() for _, f in r.xrange(keys.events) if f[b"to"] == b"mounted"]
        assert any("fell back" in n for n in notes)
    finally:
        hb.stop.set()


def test_unmountable_data_fails_the_session_and_returns_the_node(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    store = DirectoryStore(Path(procs.log_dir) / "store")
    _save_versions(store, tmp_path, "alice", [20])
    for tar in (Path(procs.log_dir) / "store" / "alice").glob("*.tar"):
        tar.write_bytes(b"\0" * tar.stat().st_size)
    pool(r, keys, procs, nodes=1)
    t = Launcher(r, keys).login("alice", "pw")
    wait_for(lambda: session_field(r, keys, t.sid) == "closed", 20, what="failed session closed")
    assert session_field(r, keys, t.sid, "close_reason").startswith("mount_failed")
    wait_for(lambda: node_state(r, keys, "n1") == "free", 5)
    assert len(store.versions("alice")) == 1  # nothing was overwritten


def test_cli_lists_shows_and_restores_versions(procs: Procs, tmp_path: Path) -> None:
    root = Path(procs.log_dir) / "store"
    store = DirectoryStore(root)
    _save_versions(store, tmp_path, "alice", [10, 20, 30])
    out = procs.run("data", "ls", "alice", "--store", str(root))
    assert out.returncode == 0 and len(out.stdout.strip().splitlines()) == 3
    out = procs.run("data", "ls", "alice", "--store", str(root), "--json")
    assert out.returncode == 0, out.stderr
    assert [v["version"] for v in json.loads(out.stdout)] == [1, 2, 3]
    out = procs.run("data", "show", "alice", "1", "--store", str(root))
    assert out.returncode == 0 and "canvas.npy" in out.stdout
    out = procs.run("data", "restore", "alice", "1", "--store", str(root))
    assert out.returncode == 0, out.stderr
    newest = store.versions("alice")[-1]
    assert newest.version == 4 and newest.promoted_from == 1
    dest = tmp_path / "restored"
    store.restore("alice", dest)
    assert ink_rows(np.load(dest / "canvas.npy")) == {10}
    out = procs.run("data", "ls", "../etc", "--store", str(root))
    assert out.returncode == 1 and "Traceback" not in out.stderr


def test_data_over_quota_is_not_saved_and_the_event_says_why(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    clk = {**FAST, "grace": 30, "idle_timeout": 30}
    publish(r, keys, **clk)
    procs.central(**clk)
    procs.node("n1", "h1", "paint", "--size", SIZE)
    procs.start("worker", "--host", "h1", CLOUDQ_QUOTA_MIB="0.01")  # 10 KiB; a 160x120 canvas is 57 KiB
    wait_for(lambda: r.zcard(keys.pool) == 1, 20)
    Users(r, keys).add("alice", "pw", cost=4)
    launcher, a, hb = connect(r, keys, "alice")
    launcher.logout(a.token)
    hb.stop.set()
    wait_for(lambda: session_field(r, keys, a.sid) == "closed", 20)
    failed = [f[b"reason"].decode() for _, f in r.xrange(keys.events) if f[b"to"] == b"save_failed"]
    assert failed and "quota" in failed[0].lower()
    assert DirectoryStore(Path(procs.log_dir) / "store").versions("alice") == []
    assert node_state(r, keys, "n1") == "free"  # the node still goes back to the pool


def test_autosave_writes_a_version_only_when_input_changed_something(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool(r, keys, procs, nodes=1, autosave=0.3)
    _, a, hb = connect(r, keys, "alice")
    store = DirectoryStore(Path(procs.log_dir) / "store")
    try:
        draw(r, keys, a.sid, y=50)
        wait_for(lambda: len(store.versions("alice")) == 1, 15, what="autosave after drawing")
        # several autosave periods with no input: clean flushes, no new version
        n = int(r.hget(keys.session(a.sid), "saves") or 0)
        wait_for(lambda: int(r.hget(keys.session(a.sid), "saves") or 0) >= n + 4, 15, what="more autosaves")
        assert len(store.versions("alice")) == 1
        draw(r, keys, a.sid, y=70)
        wait_for(lambda: len(store.versions("alice")) == 2, 15, what="autosave after more drawing")
    finally:
        hb.stop.set()


def test_login_during_a_close_mounts_only_after_the_final_save(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    pool(r, keys, procs, nodes=2)
    launcher, a, hb = connect(r, keys, "alice")
    draw(r, keys, a.sid, y=40)
    wait_for(lambda: 40 in ink_rows(flush(r, keys, a.node, a.sid, procs)), 10)
    launcher.logout(a.token)
    hb.stop.set()
    # log in again at once: while the old session is closing, a new session must wait for its save
    _, a2, hb2 = connect(r, keys, "alice")
    try:
        assert a2.sid != a.sid
        assert session_field(r, keys, a.sid) == "closed"
        assert 40 in ink_rows(flush(r, keys, a2.node, a2.sid, procs))
    finally:
        hb2.stop.set()


def test_two_hosts_each_with_their_own_workspace_share_one_store(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    clk = {**FAST, "grace": 30, "idle_timeout": 30}
    publish(r, keys, **clk)
    procs.central(**clk)
    ws = {h: Path(procs.log_dir) / f"workspace-{h}" for h in ("h1", "h2")}
    for host in ("h1", "h2"):
        procs.start(
            "node", "--id", f"node-{host}", "--host", host, "--size", SIZE, CLOUDQ_WORKSPACE=str(ws[host])
        )
        procs.start("worker", "--host", host, CLOUDQ_WORKSPACE=str(ws[host]))
    wait_for(lambda: r.zcard(keys.pool) == 2, 20)
    for u in ("alice", "bob", "carol"):
        Users(r, keys).add(u, "pw", cost=4)

    def canvas(node: str) -> np.ndarray | None:
        path = ws[node.split("-")[1]] / node / "data" / "canvas.npy"
        return np.load(path) if path.exists() else None

    la, a, hba = connect(r, keys, "alice")
    lb, b, hbb = connect(r, keys, "bob")
    draw(r, keys, a.sid, y=44)
    wait_for(lambda: b'"input": 3' in (r.hget(keys.node(a.node), "stats") or b""), 10, what="input applied")
    la.logout(a.token)
    hba.stop.set()
    wait_for(lambda: session_field(r, keys, a.sid) == "closed", 20)
    _, c, hbc = connect(r, keys, "carol")  # carol gets alice's old node, on alice's old host
    assert c.node == a.node and 44 not in ink_rows(canvas(c.node))
    lb.logout(b.token)
    hbb.stop.set()
    wait_for(lambda: session_field(r, keys, b.sid) == "closed", 20)
    _, a2, hba2 = connect(r, keys, "alice")  # the other host: mounted there from the shared store
    try:
        assert a2.node == b.node != a.node
        assert 44 in ink_rows(canvas(a2.node))
        for h in ("h1", "h2"):  # each host's jobs were done by that host's worker
            assert r.llen(f"rq:queue:{keys.job_queue(h)}") == 0
    finally:
        hba2.stop.set()
        hbc.stop.set()


@pytest.mark.slow
def test_a_save_lock_whose_holder_was_killed_lapses_within_its_lease(
    r: redis.Redis, keys: Keys, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A work horse killed mid-save (kill -9, or with its worker) must not hold the user's saves
    and mounts up for minutes: the lock is a lease its holder renews (``--save-lease``, short here)."""
    lease = 3.0
    import subprocess
    import sys

    from cloudq.workers import data

    store = tmp_path / "store"
    ws = tmp_path / "ws"
    ws.mkdir()
    with open(ws / "big.bin", "wb") as fh:  # a save that takes a while
        for _ in range(192):
            fh.write(os.urandom(1 << 20))
    r.set(keys.user_mounted("ann"), "s1")
    holder = subprocess.Popen(
        [sys.executable, "-P", "-c",
         "import sys, redis; from pathlib import Path; from cloudq.keys import Keys; from cloudq.workers import data;"
         "data.store_workspace(redis.Redis.from_url(sys.argv[1]), Keys(sys.argv[2]), 's1', 'ann', Path(sys.argv[3]), 'save')",
         redis_url, keys.prefix, str(ws)],
        env={**os.environ, "CLOUDQ_STORE": str(store), "CLOUDQ_QUOTA_MIB": "1024", "CLOUDQ_SAVE_LEASE": str(lease)},
    )  # fmt: skip
    try:
        wait_for(lambda: r.exists(keys.save_lock("ann")), 30, interval=0.01, what="the save under way")
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        holder.kill()
    assert r.exists(keys.save_lock("ann")), "killed while saving: its lock is left behind"
    assert DirectoryStore(store).versions("ann") == [], "killed before the save committed"
    r.set(keys.user_mounted("ann"), "s2")  # the user's next session saves
    monkeypatch.setenv("CLOUDQ_STORE", str(store))
    monkeypatch.setenv("CLOUDQ_SAVE_LEASE", str(lease))
    (ws / "big.bin").unlink()
    (ws / "note.txt").write_text("after the crash")
    t0 = time.monotonic()
    result = data.store_workspace(r, keys, "s2", "ann", ws, "save")
    waited = time.monotonic() - t0
    assert result.startswith("version"), result
    assert waited < lease + 2, f"waited {waited:.1f} s for a lease of {lease:g} s"
    assert not r.exists(keys.save_lock("ann")), "released after the save"


def test_a_save_of_a_workspace_that_did_not_change_writes_no_version(
    r: redis.Redis, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloudq.workers import data

    monkeypatch.setenv("CLOUDQ_STORE", str(tmp_path / "store"))
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("hello")
    r.set(keys.user_mounted("alice"), "s1")
    assert data.store_workspace(r, keys, "s1", "alice", ws, "save") == "version 1"
    assert data.store_workspace(r, keys, "s1", "alice", ws, "save") == "unchanged"
    (ws / "notes.txt").write_text("hellO")  # same size, other bytes
    assert data.store_workspace(r, keys, "s1", "alice", ws, "final") == "version 2"
    assert [v.version for v in data.open_store().versions("alice")] == [1, 2]
    assert any(f[b"to"] == b"unchanged" for _, f in r.xrange(keys.events))
    # the user's next session: what a mount restored is saved as no new version, a touch (mtime
    # alone) neither; a changed byte is a new version
    monkeypatch.setenv("CLOUDQ_WORKSPACE", str(tmp_path / "workspaces"))
    data.mount_session(r, keys, "s2", "alice", "n1")
    mounted = data.workspace_dir(data.workspace_root(), "n1")
    assert (mounted / "notes.txt").read_text() == "hellO"
    assert data.store_workspace(r, keys, "s2", "alice", mounted, "save") == JobResult.UNCHANGED
    os.utime(mounted / "notes.txt")
    assert data.store_workspace(r, keys, "s2", "alice", mounted, "save") == JobResult.UNCHANGED
    (mounted / "notes.txt").write_text("Hello")
    assert data.store_workspace(r, keys, "s2", "alice", mounted, "final") == "version 3"
