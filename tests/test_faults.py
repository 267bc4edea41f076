"""Faults together (issue 9, section 6): scripted users on 3 nodes, 2 workers, 2 central
replicas and Redis with AOF, while at scheduled random moments (fixed seed) one node, one
worker, one central replica and two clients are killed -9, Redis pauses for 3 s once and is
killed and restarted once. It prints what it did and what it checked."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from helpers import FAST, Procs, publish, wait_for
from test_userdata import SIZE, ink_rows

from cloudq.central.auth import Users
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.workers.store import DirectoryStore

SEED = 9
USERS = 10
STAGGER = 3.5  # a user starts every STAGGER seconds ...
DURATION = 8.0  # ... and stays this long: about two at a time on three nodes
CLOCKS = {
    **FAST,
    "heartbeat_interval": 0.3,
    "heartbeat_ttl": 1.5,
    "node_ttl": 1.5,
    "idle_timeout": 30,
    "grace": 6.0,
    "autosave": 1.0,
    "job_lease": 4.0,
}


DETECTED_WITHIN = CLOCKS["node_ttl"] + 1.5
"""A killed node is declared offline (its session moved) within its liveness TTL plus the
sweeper's and the move's own time: input sent to it meanwhile reaches no node."""
SAVE_SLACK = 1.0
"""A save that ends this long after a stroke was sent holds it (the stroke reaches the node in
milliseconds; a save's flush and store take a fraction of a second)."""


def row(i: int) -> int:
    return 8 + 10 * i


def drawn_at(client_log: str) -> float | None:
    """When the client had sent its whole stroke (its log line's wall clock); None: it never did."""
    for line in client_log.splitlines():
        if "script: all 3 events sent" in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


@pytest.mark.slow
def test_faults_together_lose_nothing_and_leave_nothing_stuck(keys: Keys, tmp_path: Path) -> None:
    rnd = random.Random(SEED)
    server = EmbeddedServer(data_dir=tmp_path / "redis").start()
    procs = Procs(server.url, keys.prefix, str(tmp_path))
    log: list[str] = []

    def say(msg: str) -> None:
        log.append(f"{time.monotonic() - t0:5.1f}s {msg}")
        print(log[-1], flush=True)

    t0 = time.monotonic()
    try:
        r = redis.Redis.from_url(server.url, socket_timeout=10)
        publish(r, keys, **CLOCKS)
        centrals = [procs.central(**CLOCKS) for _ in range(2)]
        nodes = [procs.node(f"n{i + 1}", "h1", "paint", "--size", SIZE, "--fps", "10") for i in range(3)]
        workers = [procs.worker() for _ in range(2)]
        wait_for(lambda: r.zcard(keys.pool) == 3, 30, what="nodes registered")
        for i in range(USERS):
            Users(r, keys).add(f"u{i}", "pw", cost=4)
        clients: dict[int, subprocess.Popen[bytes]] = {}

        def start_client(i: int) -> None:
            script = tmp_path / f"u{i}.txt"
            y = row(i)
            script.write_text(f"0.5 mouse_down 10 {y}\n0.7 mouse_move 150 {y}\n0.9 mouse_up 150 {y}\n")
            clients[i] = procs.start(
                "connect", "--user", f"u{i}", "--password-stdin", "--headless", "--script", str(script),
                "--duration", str(DURATION), "--stats-json", str(tmp_path / f"u{i}.json"),
                name=f"client{i}", stdin=b"pw\n",
            )  # fmt: skip
            say(f"user u{i} starts")

        # the faults, in a seeded order, one every few seconds while users come and go
        faults = ["node", "worker", "central", "client", "client", "pause", "restart"]
        rnd.shuffle(faults)
        fault_at = {k: 5.0 + 4.5 * k for k in range(len(faults))}
        killed_clients: set[int] = set()
        node_deaths: list[tuple[float, str]] = []
        schedule = sorted(
            [(i * STAGGER, "user", i) for i in range(USERS)]
            + [(fault_at[k], f, k) for k, f in enumerate(faults)]
        )
        start = time.monotonic()
        for at, what, arg in schedule:
            time.sleep(max(0.0, start + at - time.monotonic()))  # the scenario's own clock
            if what == "user":
                start_client(arg)
            elif what == "node":
                victim = rnd.randrange(3)
                Procs.kill(nodes[victim], signal.SIGKILL)
                node_deaths.append((time.time(), f"n{victim + 1}"))
                say(f"kill -9 node n{victim + 1}")
            elif what == "worker":
                Procs.kill(workers[0], signal.SIGKILL)
                say("kill -9 worker 1")
            elif what == "central":
                Procs.kill(centrals[0], signal.SIGKILL)
                say("kill -9 central replica 1")
            elif what == "client":
                live = [i for i, p in clients.items() if p.poll() is None and i not in killed_clients]
                assert live, "\n".join([*log, "a scheduled client kill found no live client"])
                i = rnd.choice(live)
                Procs.kill(clients[i], signal.SIGKILL)
                killed_clients.add(i)
                say(f"kill -9 client of u{i}")
            elif what == "pause":
                server.pause()
                time.sleep(3.0)  # the fault itself
                server.resume()
                say("redis paused 3 s")
            elif what == "restart":
                r.execute_command("WAITAOF", 1, 0, 2000)
                server.kill()
                server.start()
                say("redis killed -9 and restarted (AOF)")

        # every client ends by itself
        for p in clients.values():
            p.wait(DURATION + 40)
        say("all clients ended")
        # nothing left in a non-final state once its clocks have run out
        wait_for(lambda: r.scard(keys.sessions) == 0, 40, what="every session closed")
        say("every session closed")

        # checks -------------------------------------------------------------------------
        problems: list[str] = []
        holders: dict[str, str] = {}
        # a save's time is when its content was fixed (the node's flush acknowledged: "asof"), not
        # when the store finished, which under load can be seconds later
        events = [
            (float(f.get(b"asof") or f[b"t"]), f[b"obj"].decode(), f[b"to"].decode(), f[b"reason"].decode())
            for _, f in r.xrange(keys.events)
        ]
        for _, obj, to, reason in events:
            if obj.startswith("node:") and to == "assigned":
                sid = reason.split()[-1]
                if holders.get(obj) not in (None, sid):
                    problems.append(f"{obj} assigned to {sid} while it held {holders[obj]}")
                holders[obj] = sid
            elif obj.startswith("node:") and to in ("free", "offline"):
                holders.pop(obj, None)
        say("checked: no node was held by two sessions")
        for n in ("n1", "n2", "n3"):
            st = (r.hget(keys.node(n), "state") or b"").decode()
            if st not in ("free", "offline"):
                problems.append(f"node {n} is {st} at the end")
        store = DirectoryStore(tmp_path / "store")
        for i in range(USERS):
            user = f"u{i}"
            versions = store.versions(user)
            if versions and not store.verify(user, versions[-1].version):
                problems.append(f"{user}: newest version does not verify")
            stats = (
                json.loads((tmp_path / f"{user}.json").read_text())
                if (tmp_path / f"{user}.json").exists()
                else {}
            )
            if i not in killed_clients and (clients[i].returncode != 0 or not stats.get("frames")):
                problems.append(
                    f"{user}: surviving client exit {clients[i].returncode}, frames {stats.get('frames')}"
                )
            drawn = drawn_at(procs.output(clients[i]))
            if drawn is None:
                if i in killed_clients:
                    say(f"{user}: client killed before it drew")
                continue
            rows: set[int] = set()
            if versions:
                dest = tmp_path / f"restore-{user}"
                store.restore(user, dest)
                if (dest / "canvas.npy").exists():
                    rows = ink_rows(np.load(dest / "canvas.npy"))
            if row(i) not in rows:
                # allowed only if the node that held the stroke died after it was drawn, before a
                # save that came late enough to hold it
                sids = set(re.findall(r"session (s\d+) on node", procs.output(clients[i])))
                held = [
                    (t, o.removeprefix("node:"))
                    for t, o, to, why in events
                    if o.startswith("node:") and to == "assigned" and why.split()[-1] in sids
                ]
                holder = max((x for x in held if x[0] <= drawn), default=(0.0, ""))[1]
                saves = [t for t, o, to, _ in events if to == "saved" and o.removeprefix("session:") in sids]
                dead = [
                    (t, n)
                    for t, n in node_deaths
                    if n == holder and t > drawn and not any(drawn + SAVE_SLACK <= s < t for s in saves)
                ]
                # or it was sent to its node after that node died, before the sweeper declared it
                # offline and the session moved (a new node reads input from its own start: what
                # was meant for the dead node's screen is not replayed on another one)
                sent_to_dead = [
                    (t, n) for t, n in node_deaths if n == holder and drawn - DETECTED_WITHIN <= t <= drawn
                ]
                if dead:
                    say(f"{user}: stroke lost with node {holder} (allowed within --autosave)")
                elif sent_to_dead:
                    say(f"{user}: stroke sent to node {holder} after it died, before the move (lost)")
                else:
                    problems.append(
                        f"{user}: stroke at row {row(i)} (drawn on {holder or '?'} at {drawn:.2f}) not in"
                        f" the saved data (saves as of {[round(s, 2) for s in saves]}, deaths {dead or node_deaths})"
                    )
        say(f"checked: {USERS} users' data, clients and nodes; problems: {problems or 'none'}")
        assert not problems, "\n".join(log + problems)
    finally:
        procs.stop_all()
        server.stop()
