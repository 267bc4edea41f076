"""The media plane spread over several servers (:mod:`cloudq.media`): sessions' streams on three
media servers, the control plane on the main one, and ``kill -9`` of one media server while six
users watch. Real processes: a central server, six nodes, a worker, three embedded Valkeys."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from helpers import FAST, Procs, clock_args, publish, session_field, wait_for

from cloudq.central import acl
from cloudq.central.auth import Users
from cloudq.central.metrics import CentralCollector
from cloudq.client.kernel import Kernel
from cloudq.client.launcher import Launcher
from cloudq.client.sinks import Sink
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.local.cluster import setup_acl
from cloudq.media import LOST_FIELD

pytestmark = pytest.mark.slow

N_MEDIA, N_SESSIONS = 3, 6
NODE_ARGS = ("--size", "96x64", "--fps", "10", "--always-encode")  # a frame every 0.1 s, cheap
CLOCKS = {**FAST, "idle_timeout": 60.0, "grace": 30.0}


class FrameTimes(Sink):
    """When each decoded frame arrived (monotonic)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.lock = threading.Lock()

    def on_frame(self, frame: object, vp: object) -> None:
        with self.lock:
            self.times.append(time.monotonic())

    def count(self) -> int:
        with self.lock:
            return len(self.times)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without a frame between ``start`` and ``end``."""
        with self.lock:
            ts = [start, *(t for t in self.times if start < t < end), end]
        return max(b - a for a, b in itertools.pairwise(ts))


def _passwords(role_urls: dict[str, str]) -> acl.Passwords:
    """The suite server's role passwords (the ACL file every server of a deployment shares)."""
    return acl.passwords_of(role_urls)


@pytest.fixture
def media_servers(role_urls: dict[str, str], keys: Keys) -> Iterator[list[EmbeddedServer]]:
    if "central" not in role_urls:
        pytest.skip("needs the suite's own server (role users)")
    servers = [EmbeddedServer().start() for _ in range(N_MEDIA)]
    try:
        for s in servers:
            setup_acl(s.url, keys, _passwords(role_urls))
        yield servers
    finally:
        for s in servers:
            s.stop()


def deploy(r: redis.Redis, keys: Keys, procs: Procs, media: list[EmbeddedServer], nodes: int) -> None:
    """A central server with these media servers, ``nodes`` nodes (n1..), a worker; all ready."""
    publish(r, keys, **CLOCKS)
    media_args = [a for s in media for a in ("--media-url", s.url)]
    procs.start("central", *clock_args(**CLOCKS), *media_args, "--media-check", "0.3")
    wait_for(lambda: r.hget(keys.settings, "media"), 20, what="the media servers published")
    for i in range(nodes):
        procs.node(f"n{i + 1}", "h1", "paint", *NODE_ARGS)
    procs.worker()
    wait_for(lambda: r.zcard(keys.pool) == nodes, 30, what="nodes registered")


def test_sessions_spread_over_media_servers_and_losing_one_stops_only_its_sessions(
    r: redis.Redis,
    keys: Keys,
    procs: Procs,
    role_urls: dict[str, str],
    media_servers: list[EmbeddedServer],
) -> None:
    deploy(r, keys, procs, media_servers, N_SESSIONS)

    clients: list[tuple[str, str, Kernel, FrameTimes]] = []
    try:
        for i in range(N_SESSIONS):
            Users(r, keys).add(f"u{i}", "pw", cost=4)
            launcher = Launcher(redis.Redis.from_url(role_urls["login"]), keys)
            t = launcher.login(f"u{i}", "pw")
            sink = FrameTimes()
            kernel = Kernel(
                launcher.sr, keys, t.sid, launcher.settings, [sink], media=launcher.media(t.sid)
            ).start()
            clients.append((t.sid, t.node, kernel, sink))

        # two sessions on each media server; their streams there, nothing of them on the main one
        placed = {sid: session_field(r, keys, sid, "media") for sid, *_ in clients}
        assert sorted(placed.values()) == sorted(s.url for s in media_servers for _ in range(2))
        wait_for(lambda: all(sink.count() >= 5 for *_, sink in clients), 60, what="frames for every user")
        assert not any(r.exists(keys.video(sid)) for sid in placed)
        for s in media_servers:
            here = [sid for sid, url in placed.items() if url == s.url]
            m = redis.Redis.from_url(acl.role_urls(s.url, _passwords(role_urls))["admin"])
            assert all(m.xlen(keys.video(sid)) for sid in here), f"{s.url} holds its sessions' video"
            m.close()

        # a client flooding its input on a media server is closed there; its neighbour on the same
        # server keeps streaming (the node's guard reads the media server like any other)
        (sid_f, _, kernel_f, _), (sid_n, _, _, sink_n) = [
            c for c in clients if placed[c[0]] == media_servers[2].url
        ]
        n0, t_flood = sink_n.count(), time.monotonic()
        kernel_f.player.r.xadd(keys.input(sid_f), {"m": b"x" * (4 * 2**20)})  # past close_entry
        wait_for(
            lambda: session_field(r, keys, sid_f, "close_reason") == "input_flood",
            15,
            what="the flooder closed",
        )
        wait_for(lambda: sink_n.count() > n0 + 10, 10, what="the neighbour's frames")
        assert (
            sink_n.longest_gap(t_flood, time.monotonic()) < 1.5 and session_field(r, keys, sid_n) == "active"
        )
        clients = [c for c in clients if c[0] != sid_f]
        kernel_f.close()

        # on its media server a session user reaches its own streams only
        (sid_a, _, kernel_a, _), (sid_b, *_) = [c for c in clients if placed[c[0]] == media_servers[0].url]
        assert kernel_a.player.r.xrevrange(keys.video(sid_a), count=1)
        with pytest.raises(redis.exceptions.NoPermissionError):
            kernel_a.player.r.xrevrange(keys.video(sid_b), count=1)

        lost = media_servers[1]
        victims = [c for c in clients if placed[c[0]] == lost.url]
        others = [c for c in clients if placed[c[0]] != lost.url]
        killed = time.monotonic()
        lost.kill()

        # the victims' nodes say so; their sessions stay where they are
        for sid, *_ in victims:
            wait_for(lambda sid=sid: session_field(r, keys, sid, LOST_FIELD), 10, what=f"{sid} media_lost")
        frozen = {sid: sink.count() for sid, _, _, sink in victims}
        time.sleep(
            2.0
        )  # an outage window to judge the others by (nothing to await: time passing is the point)
        window_end = time.monotonic()
        for sid, _, _, sink in others:
            gap = sink.longest_gap(killed, window_end)
            assert gap < 1.5, (
                f"{sid} (on {placed[sid]}) went {gap:.2f} s without a frame while another server was down"
            )
        for sid, node, _, _ in clients:
            assert session_field(r, keys, sid) in ("active", "sleeping"), f"{sid} kept"
            assert session_field(r, keys, sid, "node") == node, f"{sid} not moved"
        assert r.sismember(keys.media_down, lost.url)
        gauges = {m.name: m.samples[0].value for m in CentralCollector(r, keys, {}).collect() if m.samples}
        assert gauges["cloudq_media_servers_down"] == 1 and gauges["cloudq_sessions_media_lost"] == len(
            victims
        )

        # back (empty: no persistence; the shared ACL file gives it the role users again)
        lost.start()
        setup_acl(lost.url, keys, _passwords(role_urls))
        back = time.monotonic()
        for sid, _, _, sink in victims:
            wait_for(
                lambda sid=sid, sink=sink: sink.count() > frozen[sid] + 3, 20, what=f"{sid} frames again"
            )
            assert not session_field(r, keys, sid, LOST_FIELD)
        recovered = time.monotonic() - back
        wait_for(lambda: not r.sismember(keys.media_down, lost.url), 10, what="the server no longer down")
        for sid, node, kernel, _ in clients:
            assert session_field(r, keys, sid, "node") == node and kernel.failure() is None
        print(f"victims streaming again {recovered:.2f} s after their media server came back")
    finally:
        for *_, kernel, _ in clients:
            kernel.close()


def test_a_browser_session_on_a_media_server_waits_out_its_loss_on_the_same_socket(
    r: redis.Redis,
    keys: Keys,
    procs: Procs,
    role_urls: dict[str, str],
    media_servers: list[EmbeddedServer],
) -> None:
    """Through the gateway: the page's video comes from the session's media server; when that
    server dies the page is told (``media: lost``) on the socket it has, which stays open, and
    after the server returns it is told so and gets video again."""
    import asyncio

    import aiohttp

    from cloudq.embedded import free_port

    server = media_servers[0]
    port = free_port()
    procs.start("gateway", "--host", "127.0.0.1", "--port", str(port))
    deploy(r, keys, procs, [server], 1)
    Users(r, keys).add("alice", "pw", cost=4)
    url = f"http://127.0.0.1:{port}"
    origin = {"Origin": url}

    async def until(ws: aiohttp.ClientWebSocketResponse, want: str) -> None:
        """Read the socket until a binary video message (``video``) or ``{"t": "media"...}``."""
        while True:
            msg = await asyncio.wait_for(ws.receive(), 20)
            assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
            if want == "video" and msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == 1:
                return
            if msg.type == aiohttp.WSMsgType.TEXT and msg.json().get("t") == "media":
                assert msg.json()["state"] == want
                return

    async def browser() -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            for _ in range(100):  # the gateway may still be starting
                try:
                    async with s.post(
                        url + "/login", json={"user": "alice", "password": "pw"}, headers=origin
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            async with s.ws_connect(url + "/ws", headers=origin) as ws:
                await until(ws, "video")
                server.kill()
                await until(ws, "lost")
                server.start()
                await asyncio.to_thread(setup_acl, server.url, keys, _passwords(role_urls))
                await until(ws, "ok")
                await until(ws, "video")
                assert not ws.closed

    asyncio.run(browser())
    sid = r.smembers(keys.sessions).pop().decode()
    assert session_field(r, keys, sid, "media") == server.url
    assert session_field(r, keys, sid, "node") == "n1" and session_field(r, keys, sid) == "active"


def test_bench_scale_measures_the_media_servers_cost_of_real_packet_sizes() -> None:
    """``cloudq bench scale``'s measurement, tiny: real encodes give IDRs far larger than
    P-frames; two active sessions on two servers are read back and cost each server CPU."""
    from cloudq.bench import scale

    keyframes, deltas = scale.desktop_packets(frames=20)
    assert keyframes and deltas and min(keyframes) > 2 * max(deltas)
    servers = [EmbeddedServer().start() for _ in range(2)]
    try:
        row = scale.measure(servers, 2, "active", (keyframes, deltas), window=0.6, generators=1, warmup=0.3)
    finally:
        for s in servers:
            s.stop()
    assert row["latency_ms"]["n"] >= 20, row  # 2 sessions x 30 fps, read back
    assert len(row["per_server_cpu"]) == 2 and all(c > 0 for c in row["per_server_cpu"]), row
    assert row["mem_per_session_kib"] > 0


def test_a_session_starting_while_its_media_server_is_down_waits_on_a_live_node_and_its_close_releases_its_streams(
    r: redis.Redis,
    keys: Keys,
    procs: Procs,
    role_urls: dict[str, str],
    media_servers: list[EmbeddedServer],
) -> None:
    """The node cannot open a session whose media server is down: it keeps retrying the start,
    stays registered and alive (not declared offline, the session not moved), and the session
    starts once the server is back. Its close then releases its streams on that server."""
    from helpers import node_state

    server = media_servers[0]
    deploy(r, keys, procs, [server], 1)
    Users(r, keys).add("alice", "pw", cost=4)
    server.kill()
    wait_for(lambda: r.sismember(keys.media_down, server.url), 10, what="the server marked down")
    r.srem(keys.media_down, server.url)  # the only server: placed there anyway (nothing else to take)
    launcher = Launcher(redis.Redis.from_url(role_urls["login"]), keys)
    t = launcher.login("alice", "pw")
    assert session_field(r, keys, t.sid, "media") == server.url
    time.sleep(3 * CLOCKS["node_ttl"])  # several liveness periods (the point: time passing)
    assert node_state(r, keys, "n1") != "offline", "the node kept its liveness while retrying"
    assert session_field(r, keys, t.sid) == "starting" and session_field(r, keys, t.sid, "node") == "n1"
    server.start()
    setup_acl(server.url, keys, _passwords(role_urls))
    wait_for(lambda: session_field(r, keys, t.sid) == "active", 20, what="the session active once it is back")

    # and its close releases the streams where they are: the video kept a minute there (a late
    # reader learns why it ended), the input emptied; nothing is left to grow there for good
    m = redis.Redis.from_url(acl.role_urls(server.url, _passwords(role_urls))["admin"])
    try:
        wait_for(lambda: m.xlen(keys.video(t.sid)) > 0, 20, what="video on the media server")
        m.xadd(keys.input(t.sid), {"x": "1"})  # something for the release to empty
        assert m.ttl(keys.video(t.sid)) == -1
        launcher.logout(t.token)
        wait_for(lambda: session_field(r, keys, t.sid) == "closed", 20, what="the session closed")
        wait_for(lambda: 0 < m.ttl(keys.video(t.sid)) <= 60, 5, what="the video expiring")
        assert m.ttl(keys.input(t.sid)) <= 2 and not m.xlen(keys.input(t.sid))
    finally:
        m.close()
