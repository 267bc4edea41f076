"""Every long-running process serves Prometheus metrics over HTTP, and they move as sessions come
and go: scraped from real ``cloudq central``, ``node`` and ``worker`` processes."""

from __future__ import annotations

import asyncio
import threading
import urllib.request

import redis
from helpers import FAST, Procs, clock_args, node_state, publish, start_pool, wait_for
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


def series(port: int, name: str, **labels: str) -> float | None:
    """The sample's value, or None while the process serves no such series (a labelled counter
    appears at its first increment): a wait can poll for it."""
    return scrape(port).get((name, tuple(sorted(labels.items()))))


def value(port: int, name: str, **labels: str) -> float:
    """The sample's value; a series the process does not serve fails, so a metric that does not
    exist never reads as 0."""
    samples = scrape(port)
    got = samples.get((name, tuple(sorted(labels.items()))))
    assert got is not None, f"no series {name}{labels} in {sorted({n for n, _ in samples})}"
    return got


def test_central_node_and_worker_metrics_follow_sessions(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    # bob's queue beat is a thread of this busy process: a 2 s TTL, not 0.8 s, so a loaded
    # machine does not drop him from the queue before the node frees
    # (alice's heartbeat, not her input, must lapse first: idle_timeout above heartbeat_ttl)
    clocks = {**FAST, "heartbeat_ttl": 2.0, "idle_timeout": 3.0, "grace": 30}
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
        lambda: series(pw, "cloudq_jobs_total", kind="mount", result="started") == 1, 10, what="mount job"
    )
    # alice's client sends no heartbeat and no input: the node sleeps and its sleeping seconds grow
    wait_for(lambda: node_state(r, keys, "n1") == "sleeping", 10, what="node asleep")
    wait_for(
        lambda: value(pn, "cloudq_node_sleeping_seconds_total", node="n1") > 0.2, 5, what="sleep counted"
    )
    assert value(pc, "cloudq_sessions", state="disconnected") == 1
    # alice leaves: the close job runs, bob gets the node and his wait is in the histogram
    launcher.logout(t.token)
    wait_for(
        lambda: series(pw, "cloudq_jobs_total", kind="close", result="closed") == 1, 15, what="close job"
    )
    th.join(20)
    assert got, "bob never got the node"
    wait_for(lambda: value(pc, "cloudq_queue_wait_seconds_count") == 1, 10, what="queue wait observed")
    assert value(pc, "cloudq_queue_wait_seconds_sum") > 0
    assert value(pc, "cloudq_queue_length") == 0
    assert value(pw, "cloudq_job_duration_seconds_count", kind="close") == 1


def test_the_gateway_serves_metrics_that_count_logins_and_sockets(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    import aiohttp

    port, mport = free_port(), free_port()
    procs.start(
        "gateway", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(mport), "--metrics-addr", "127.0.0.1",
    )  # fmt: skip
    start_pool(r, keys, procs, nodes=1, users=("alice",), grace=30, idle_timeout=30)  # meanwhile
    wait_for(lambda: _reachable(mport), 20, what="gateway metrics up")
    assert value(mport, "cloudq_gateway_sockets") == 0
    url = f"http://127.0.0.1:{port}"
    origin = {"Origin": url}

    def gauge_is(n: int) -> bool:
        return value(mport, "cloudq_gateway_sockets") == n

    async def browser() -> str:
        # a cookie jar that keeps cookies of an IP address, like a browser's
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            for password, status in (("wrong", 401), ("pw", 200)):
                async with s.post(
                    url + "/login", json={"user": "alice", "password": password}, headers=origin
                ) as resp:
                    assert resp.status == status, await resp.text()
            async with s.ws_connect(url + "/ws", headers=origin) as ws:
                hello = await asyncio.wait_for(ws.receive_json(), 10)
                assert hello["t"] == "hello", hello
                await asyncio.to_thread(wait_for, lambda: gauge_is(1), 5, what="the open socket counted")
                beats = lambda: value(mport, "cloudq_gateway_heartbeats_total") >= 2  # noqa: E731
                await asyncio.to_thread(wait_for, beats, 5, what="the socket's heartbeats counted")
            return str(hello["rights"])

    rights = asyncio.run(browser())
    wait_for(lambda: gauge_is(0), 5, what="the closed socket no longer counted")
    assert value(mport, "cloudq_gateway_sockets_opened_total", rights=rights) == 1
    assert value(mport, "cloudq_gateway_logins_total", result="invalid") == 1
    assert value(mport, "cloudq_gateway_logins_total", result="ok") == 1


def _reachable(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True
