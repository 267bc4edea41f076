"""Every long-running process serves Prometheus metrics over HTTP, and they move as sessions come
and go: scraped from real ``cloudq central``, ``node`` and ``worker`` processes."""

from __future__ import annotations

import threading
import urllib.request

import redis
from helpers import FAST, Procs, clock_args, node_state, publish, wait_for
from prometheus_client.parser import text_string_to_metric_families

from cloudq.central.auth import Users
from cloudq.client.launcher import Launcher
from cloudq.embedded import free_port
from cloudq.keys import Keys


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(port: int, name: str, **labels: str) -> float:
    return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)


def test_central_node_and_worker_metrics_follow_sessions(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    clocks = {**FAST, "idle_timeout": 1.0, "grace": 30}
    publish(r, keys, **clocks)
    pc, pn, pw = free_port(), free_port(), free_port()
    procs.start("central", *clock_args(**clocks), "--metrics-port", str(pc), "--metrics-addr", "127.0.0.1")
    procs.start(
        "node", "--id", "n1", "--host", "h1", "--app", "probe", "--size", "320x240",
        "--metrics-port", str(pn), "--metrics-addr", "127.0.0.1",
    )  # fmt: skip
    procs.start("worker", "--host", "h1", "--metrics-port", str(pw), "--metrics-addr", "127.0.0.1")
    wait_for(lambda: r.zcard(keys.pool) == 1, 20, what="node registered")
    Users(r, keys).add("alice", "pw", cost=4)
    Users(r, keys).add("bob", "pw", cost=4)
    wait_for(lambda: value(pc, "cloudq_nodes", state="free") == 1, 10, what="central reports the free node")
    assert value(pc, "cloudq_sessions", state="active") == 0

    launcher = Launcher(r, keys)
    t = launcher.login("alice", "pw")
    wait_for(lambda: node_state(r, keys, "n1") == "active", 15, what="node active")
    wait_for(lambda: value(pc, "cloudq_sessions", state="active") == 1, 5, what="active session counted")
    assert value(pc, "cloudq_nodes", state="active") == 1
    assert value(pc, "cloudq_logins_total", result="assigned") == 1
    # bob waits: the queue length shows, then the wait is observed once he gets the node
    bob = Launcher(r, keys)
    got: list[object] = []
    th = threading.Thread(target=lambda: got.append(bob.login("bob", "pw", wait=30)), daemon=True)
    th.start()
    wait_for(lambda: value(pc, "cloudq_queue_length") == 1, 10, what="bob queued")
    # the node encodes: frames, bytes and the fps gauge move; the mount job is counted by the worker
    wait_for(lambda: value(pn, "cloudq_node_frames_total", node="n1") > 10, 10, what="frames counted")
    assert value(pn, "cloudq_node_video_bytes_total", node="n1") > 0
    assert value(pn, "cloudq_node_encode_seconds_count", node="n1") > 0
    wait_for(lambda: value(pn, "cloudq_node_fps", node="n1") > 0, 10, what="fps gauge")
    wait_for(
        lambda: value(pw, "cloudq_jobs_total", kind="mount", result="started") == 1, 10, what="mount job"
    )
    # alice's client sends no heartbeat and no input: the node sleeps and its sleeping seconds grow
    wait_for(lambda: node_state(r, keys, "n1") == "sleeping", 10, what="node asleep")
    wait_for(
        lambda: value(pn, "cloudq_node_sleeping_seconds_total", node="n1") > 0.2, 5, what="sleep counted"
    )
    assert value(pc, "cloudq_sessions", state="disconnected") == 1
    # alice leaves: the close job runs, bob gets the node and his wait is in the histogram
    launcher.logout(t.token)
    wait_for(lambda: value(pw, "cloudq_jobs_total", kind="close", result="closed") == 1, 15, what="close job")
    th.join(20)
    assert got, "bob never got the node"
    wait_for(lambda: value(pc, "cloudq_queue_wait_seconds_count") == 1, 10, what="queue wait observed")
    assert value(pc, "cloudq_queue_wait_seconds_sum") > 0
    assert value(pc, "cloudq_queue_length") == 0
    assert value(pw, "cloudq_job_duration_seconds_count", kind="close") == 1


def test_the_gateway_serves_metrics_that_count_logins_and_sockets(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    import json as _json
    import urllib.error

    publish(r, keys, **FAST)
    procs.central(**FAST)
    port, mport = free_port(), free_port()
    procs.start(
        "gateway", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(mport), "--metrics-addr", "127.0.0.1",
    )  # fmt: skip
    Users(r, keys).add("alice", "pw", cost=4)
    wait_for(lambda: _reachable(mport), 20, what="gateway metrics up")
    assert value(mport, "cloudq_gateway_sockets") == 0
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/login",
        data=_json.dumps({"user": "alice", "password": "wrong"}).encode(),
        headers={"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}"},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
    wait_for(lambda: value(mport, "cloudq_gateway_logins_total", result="invalid") == 1, 5, what="counted")


def _reachable(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True
