"""``cloudq bench security``: what per-session Redis users cost.

On an embedded server with cloudq's ACL users (as ``cloudq up`` runs it):

- **Logins per second** at bcrypt cost 12 with 1 and 2 central replicas (real ``cloudq central``
  processes as ``cloudq-central``), clients logging in concurrently through the login user as
  ``cloudq connect`` does (request, reply, then authenticating as the session user). Free nodes
  are registered so every login creates a session and its ACL user. Baseline, same run: bcrypt
  checks per second in one thread of this process.
- **Session user create / delete**: ``SessionUsers.session_user`` (``ACL SETUSER`` + ``CLIENT
  KILL USER`` + the expiry entry) and ``drop`` (``CLIENT KILL USER`` + ``ACL DELUSER`` + ``ZREM``),
  median per call; baseline: a ``SET`` round trip.
- **10,000 session users vs none**: server memory (``used_memory``), the median latency of a
  session user's ``SET`` of its heartbeat and ``XADD`` to its input, of a new connection's
  ``AUTH``, and of one central reconcile pass (``ACL USERS`` against the live sessions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import bcrypt
import redis

from cloudq.bench.report import machine, write_section
from cloudq.central import acl
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.local.cluster import setup_acl
from cloudq.percentile import percentile
from cloudq.procs import ProcessGroup
from cloudq.settings import Settings
from cloudq.state import StateMachine
from cloudq.tokens import SESSION_ACL_PREFIX, new_token, session_acl_password, session_acl_user

log = logging.getLogger(__name__)

PREFIX = "cqs:"
COST = 12


def _median_ms(fn: Callable[[], Any], n: int) -> float:
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t) * 1000)
    return percentile(xs, 50)


def _logins(urls: dict[str, str], replicas: int, logins: int, threads: int) -> float:
    """Logins per second with ``replicas`` central servers (a fresh set of users and nodes)."""
    from cloudq.client.launcher import Launcher

    keys = Keys(PREFIX)
    admin = redis.Redis.from_url(urls["admin"])
    admin.flushdb()
    Settings(node_ttl=0).publish(admin, keys)  # the nodes are fake: liveness off
    sm = StateMachine(admin, keys)
    pw = bcrypt.hashpw(b"pw", bcrypt.gensalt(COST))
    pipe = admin.pipeline(transaction=False)
    for i in range(logins):
        pipe.hset(keys.user(f"u{i}"), mapping={"hash": pw, "disabled": "0"})
        pipe.sadd(keys.users, f"u{i}")
    pipe.execute()
    for i in range(logins):
        sm.register_node(f"n{i}", "bench", "paint", "x")
    group = ProcessGroup(urls["central"], PREFIX, env={"CLOUDQ_BCRYPT_COST": str(COST)})
    try:
        for _ in range(replicas):
            group.start(
                "central", "--no-notifications", "--node-ttl", "0"
            )  # the nodes are fake: never offline
        # every replica ready (beating in the centrals set) before the clock starts
        end = time.monotonic() + 30
        while admin.zcard(keys.centrals) < replicas:
            if time.monotonic() > end:
                raise RuntimeError("central servers did not start")
            time.sleep(0.05)
        todo = list(range(logins))
        lock = threading.Lock()
        errors: list[str] = []

        def client() -> None:
            r = redis.Redis.from_url(urls["login"])
            launcher = Launcher(r, keys, reply_timeout=120)
            while True:
                with lock:
                    if not todo:
                        break
                    i = todo.pop()
                try:
                    t = launcher.login(f"u{i}", "pw")
                    assert t.acl_user == session_acl_user(t.sid)
                except Exception as exc:  # reported in the result
                    errors.append(f"{type(exc).__name__}: {exc}")
            r.close()

        ths = [threading.Thread(target=client) for _ in range(threads)]
        t0 = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        elapsed = time.perf_counter() - t0
        if errors:
            raise RuntimeError(f"{len(errors)} logins failed, e.g. {errors[0]}")
        return logins / elapsed
    finally:
        group.stop_all()
        admin.close()


def _user_costs(urls: dict[str, str], n: int, users: int, samples: int) -> dict[str, Any]:
    keys = Keys(PREFIX)
    admin = redis.Redis.from_url(urls["admin"])
    admin.flushdb()
    for name in admin.execute_command("ACL", "USERS"):
        if name.startswith(SESSION_ACL_PREFIX.encode()):
            admin.execute_command("ACL", "DELUSER", name)
    su = acl.SessionUsers(admin, keys, token_ttl=3600)
    out: dict[str, Any] = {"set_ms": _median_ms(lambda: admin.set("bench", "1"), n)}
    pw_hash = acl.session_password_hash("bench-token")
    i = iter(range(10**9))
    names: list[str] = []

    def create() -> None:
        names.append(su.session_user(f"c{next(i)}", pw_hash))

    out["create_ms"] = _median_ms(create, n)
    out["delete_ms"] = _median_ms(lambda: su.drop(names.pop()), n)

    def measure(tag: str) -> None:
        token = new_token()
        sid = "probe"
        su.session_user(sid, acl.session_password_hash(token))
        admin.sadd(keys.sessions, sid)
        admin.hset(keys.session(sid), mapping={"state": "active", "acl": acl.session_password_hash(token)})
        url = acl.with_user(urls["admin"], session_acl_user(sid), session_acl_password(token))
        s = redis.Redis.from_url(url)
        out[f"{tag}_set_hb_ms"] = _median_ms(lambda: s.set(keys.heartbeat(sid), "1", px=3000), samples)
        out[f"{tag}_xadd_ms"] = _median_ms(
            lambda: s.xadd(keys.input(sid), {"m": b"x" * 40}, maxlen=1000, approximate=True), samples
        )

        def auth() -> None:
            c = redis.Redis.from_url(url)
            c.ping()
            c.close()

        out[f"{tag}_connect_auth_ms"] = _median_ms(auth, max(50, samples // 10))
        out[f"{tag}_reconcile_ms"] = _median_ms(su.reconcile, 20)
        out[f"{tag}_reconcile_quick_ms"] = _median_ms(lambda: su.reconcile(full=False), 20)
        s.close()
        admin.execute_command("MEMORY", "PURGE")
        out[f"{tag}_used_memory"] = int(admin.info("memory")["used_memory"])

    measure("none")
    log.info("creating %d session users", users)
    pipe = admin.pipeline(transaction=False)
    for k in range(users):
        sid = f"b{k}"
        pipe.execute_command(
            "ACL",
            "SETUSER",
            session_acl_user(sid),
            "reset",
            "on",
            f"#{pw_hash}",
            *acl.session_rules(keys, sid),
        )
        pipe.sadd(keys.sessions, sid)
        if k % 1000 == 999:
            pipe.execute()
    pipe.execute()
    measure("many")
    log.info("deleting them")
    pipe = admin.pipeline(transaction=False)
    for k in range(users):
        pipe.execute_command("ACL", "DELUSER", session_acl_user(f"b{k}"))
        pipe.srem(keys.sessions, f"b{k}")
        if k % 1000 == 999:
            pipe.execute()
    pipe.execute()
    measure("after")
    out["users"] = users
    out["bytes_per_user"] = (out["many_used_memory"] - out["none_used_memory"]) / users
    admin.close()
    return out


def _flooder(url: str, key: str, seconds: float) -> None:
    """As session user A: XADD input as fast as one connection can (pipelines of 200)."""
    r = redis.Redis.from_url(url)
    end = time.monotonic() + seconds
    fields = {"m": b"x" * 40}
    while time.monotonic() < end:
        pipe = r.pipeline(transaction=False)
        for _ in range(200):
            pipe.xadd(key, fields)
        pipe.execute()
    r.close()


def _flood(urls: dict[str, str], samples: int) -> dict[str, float]:
    """B's XADD latency (median) while session user A floods its own input stream vs quiet.

    This is the Redis-level share a flooding client takes before its node closes the session
    (the close itself is tested: ``test_a_flooding_client_is_closed_...``)."""
    import multiprocessing as mp

    keys = Keys(PREFIX)
    admin = redis.Redis.from_url(urls["admin"])
    su = acl.SessionUsers(admin, keys, token_ttl=0)
    conns = {}
    for sid in ("fa", "fb"):
        token = new_token()
        su.session_user(sid, acl.session_password_hash(token))
        conns[sid] = acl.with_user(urls["admin"], session_acl_user(sid), session_acl_password(token))
    b = redis.Redis.from_url(conns["fb"])
    send = lambda: b.xadd(keys.input("fb"), {"m": b"x" * 40}, maxlen=1000, approximate=True)  # noqa: E731
    quiet = _median_ms(send, samples)
    proc = mp.get_context("spawn").Process(target=_flooder, args=(conns["fa"], keys.input("fa"), 60.0))
    proc.start()
    try:
        end = time.monotonic() + 10
        while admin.xlen(keys.input("fa")) < 10_000 and time.monotonic() < end:
            time.sleep(0.05)
        flooded = _median_ms(send, samples)
    finally:
        proc.terminate()
        proc.join(10)
    quiet_after = _median_ms(send, samples)
    b.close()
    admin.close()
    return {"flood_quiet_ms": quiet, "flood_ms": flooded, "flood_quiet_after_ms": quiet_after}


def _used(admin: redis.Redis) -> int:
    """Server memory (``used_memory``), the median of a few readings."""
    xs = []
    for _ in range(5):
        xs.append(int(admin.info("memory")["used_memory"]))
        time.sleep(0.05)
    return int(percentile(xs, 50))


def session_memory(urls: dict[str, str], sessions: int = 2, app: str = "probe") -> dict[str, float]:
    """Server memory per session (issue 20), through real processes (central, ``sessions`` nodes
    running ``app`` at 1280x720 30 fps, a worker): ``used_memory`` with the sessions active (input
    20/s, streaming) and then idle (asleep), minus the pool's without sessions, per session; and
    one session that floods its input with 4 MiB entries until its node closes it: the peak, how
    long to ``closed``, and the memory once it is closed."""
    import tempfile

    from cloudq.central.auth import Users
    from cloudq.client.launcher import Launcher
    from cloudq.wire import InputEvent

    keys = Keys(PREFIX)
    admin = redis.Redis.from_url(urls["admin"])
    admin.flushdb()
    Settings(heartbeat_interval=1, heartbeat_ttl=60, idle_timeout=2, grace=60, node_ttl=5).publish(
        admin, keys
    )
    logs = tempfile.mkdtemp(prefix="cloudq-bench-mem-")
    roles = {"central": urls["central"], "node": urls["node"], "worker": urls["worker"]}
    group = ProcessGroup(urls["admin"], PREFIX, logs, urls=roles, env={"CLOUDQ_BCRYPT_COST": "4"})
    clocks = ["--heartbeat-interval", "1", "--heartbeat-ttl", "60", "--idle-timeout", "2", "--grace", "60"]
    conns: list[redis.Redis] = []

    def wait(cond: Callable[[], Any], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise RuntimeError(f"bench: timed out waiting for {what} (logs: {logs})")
            time.sleep(0.05)

    try:
        group.start("central", *clocks, "--node-ttl", "5")
        for i in range(sessions + 1):  # one more for the flooding session
            group.start("node", "--id", f"m{i}", "--host", "bench", "--app", app)
        group.start("worker", "--host", "bench")
        wait(lambda: admin.zcard(keys.pool) == sessions + 1, 60, "nodes registered")
        for i in range(sessions + 1):
            Users(admin, keys).add(f"m{i}", "pw", cost=4)
        base = _used(admin)
        tickets = []
        for i in range(sessions):
            launcher = Launcher(redis.Redis.from_url(urls["login"]), keys)
            tickets.append((launcher.login(f"m{i}", "pw"), launcher.sr))
            conns.append(launcher.sr)
        wait(lambda: all(admin.xlen(keys.video(t.sid)) > 0 for t, _ in tickets), 30, "sessions streaming")
        end, seq = time.monotonic() + 5, 0  # two GOPs and more: the video streams at their length
        while time.monotonic() < end:
            seq += 1
            for t, sr in tickets:
                sr.xadd(keys.input(t.sid), InputEvent("key", seq, time.time(), key="a").pack())
                sr.set(keys.activity(t.sid), "1", px=2000)
            time.sleep(0.05)
        active = _used(admin)
        video = sum(admin.memory_usage(keys.video(t.sid), samples=0) or 0 for t, _ in tickets) / sessions
        wait(
            lambda: all(admin.hget(keys.session(t.sid), "state") == b"sleeping" for t, _ in tickets),
            30,
            "asleep",
        )
        time.sleep(0.5)
        idle = _used(admin)
        # the flood: 4 MiB entries as fast as one connection goes, until its node closes the session
        launcher = Launcher(redis.Redis.from_url(urls["login"]), keys)
        ft = launcher.login(f"m{sessions}", "pw")
        conns.append(launcher.sr)
        wait(lambda: admin.xlen(keys.video(ft.sid)) > 0, 30, "flooding session streaming")
        before = _used(admin)
        peak, stop = [before], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak.append(int(admin.info("memory")["used_memory"]))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        big, t0 = {"m": b"x" * (4 * 2**20)}, time.monotonic()
        sent = 0
        while time.monotonic() - t0 < 30:
            pipe = launcher.sr.pipeline(transaction=False)
            for _ in range(5):
                pipe.xadd(keys.input(ft.sid), big)
            try:
                pipe.execute()
                sent += 5
            except (redis.AuthenticationError, redis.ResponseError):
                break  # its user is gone
            except redis.ConnectionError:
                continue
        wait(lambda: admin.hget(keys.session(ft.sid), "state") == b"closed", 30, "flooding session closed")
        closed_s = time.monotonic() - t0
        time.sleep(0.3)
        stop.set()
        sampler.join(5)
        after = _used(admin)
        return {
            "mem_sessions": sessions,
            "mem_base": base,
            "mem_active_per_session": (active - base) / sessions,
            "mem_idle_per_session": (idle - base) / sessions,
            "mem_video_per_session": video,
            "flood_sent_mib": sent * 4,
            "flood_peak_over_base": max(peak) - before,
            "flood_closed_s": closed_s,
            "flood_after_over_base": after - before,
            "flood_reason": (admin.hget(keys.session(ft.sid), "close_reason") or b"").decode(),
        }
    finally:
        group.stop_all()
        for c in conns:
            c.close()
        admin.close()


MEMORY_NOTE = (
    "\n\nServer memory per session: `used_memory` with real sessions (central, nodes, worker) minus"
    " the pool's without them (idle is measured after the active phase, so it also holds the save"
    " jobs' results of falling asleep). A session's input is bounded by its node (issue 20): reads"
    " of at most 100 entries and ~1 MiB that never carry an entry over 64 KiB, what was read"
    " trimmed, the session closed `input_flood` past 8 MiB or at the first oversized entry, its"
    " stream emptied at each read from then on and shut (no more entries) by the close. The peak"
    " is the flood's in-flight entries and its connection's buffers; it is bounded by how fast the"
    " close completes (the central server's sweep)."
)


def format_memory(m: dict[str, Any]) -> str:
    """The rows of :func:`session_memory` (a table of their own, under the security table)."""
    mib = 2**20
    return "\n".join(
        [
            "| server memory per session | value |",
            "|---|---|",
            f"| pool without sessions (central, {m['mem_sessions'] + 1} nodes, worker) | {m['mem_base'] / mib:.1f} MiB |",
            f"| per active session (probe 1280x720 at 30 fps, input 20/s) | {m['mem_active_per_session'] / 1024:.0f} KiB "
            f"(its video stream: {m['mem_video_per_session'] / 1024:.0f} KiB) |",
            f"| per idle session (asleep) | {m['mem_idle_per_session'] / 1024:.0f} KiB |",
            f"| one session flooding its input with 4 MiB entries ({m['flood_sent_mib']} MiB sent): peak over "
            f"the memory before | {m['flood_peak_over_base'] / mib:.1f} MiB |",
            f"| ... closed (`{m['flood_reason']}`) after | {m['flood_closed_s']:.2f} s |",
            f"| ... memory once closed, over the memory before | {m['flood_after_over_base'] / mib:.2f} MiB |",
        ]
    )


def run(
    logins: int = 24, threads: int = 8, n: int = 500, users: int = 10_000, samples: int = 2000
) -> dict[str, Any]:
    server = EmbeddedServer().start()
    try:
        urls = setup_acl(server.url, Keys(PREFIX))
        t = time.perf_counter()
        checks = 0
        h = bcrypt.hashpw(b"pw", bcrypt.gensalt(COST))
        while time.perf_counter() - t < 3 or checks < 5:
            bcrypt.checkpw(b"pw", h)
            checks += 1
        bcrypt_per_s = checks / (time.perf_counter() - t)
        log.info("bcrypt: %.2f checks/s", bcrypt_per_s)
        one, two = [], []
        for _ in range(2):  # interleaved, so load from elsewhere hits both alike
            one.append(_logins(urls, 1, logins, threads))
            two.append(_logins(urls, 2, logins, threads))
            log.info("logins/s: 1 replica %.2f, 2 replicas %.2f", one[-1], two[-1])
        costs = _user_costs(urls, n, users, samples)
        costs.update(_flood(urls, samples))
        costs.update(session_memory(urls))
    finally:
        server.stop()
    result: dict[str, Any] = {
        "machine": machine(),
        "bcrypt_per_s": bcrypt_per_s,
        "logins_1": percentile(one, 50),
        "logins_2": percentile(two, 50),
        "logins_runs": {"1": one, "2": two},
        "logins": logins,
        **costs,
    }
    result["table"] = format_table(result) + "\n\n" + format_memory(result)
    return result


def format_table(x: dict[str, Any]) -> str:
    m = x
    rows = [
        "| measure | value | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| logins/s, 1 central replica, bcrypt cost {COST} | {m['logins_1']:.2f} | "
        f"{m['bcrypt_per_s']:.2f} bcrypt checks/s, one thread | {m['logins_1'] / m['bcrypt_per_s']:.2f} |",
        f"| logins/s, 2 central replicas | {m['logins_2']:.2f} | 1 replica: {m['logins_1']:.2f} | "
        f"{m['logins_2'] / m['logins_1']:.2f} |",
        f"| create a session user (median) | {m['create_ms']:.3f} ms | SET round trip {m['set_ms']:.3f} ms | "
        f"{m['create_ms'] / m['set_ms']:.1f} |",
        f"| delete a session user (median) | {m['delete_ms']:.3f} ms | SET round trip {m['set_ms']:.3f} ms | "
        f"{m['delete_ms'] / m['set_ms']:.1f} |",
        f"| server memory, {m['users']:,} session users | {m['many_used_memory'] / 2**20:.1f} MiB | "
        f"none: {m['none_used_memory'] / 2**20:.1f} MiB | +{m['bytes_per_user']:.0f} B/user |",
    ]
    for tag, what in (
        ("set_hb", "session user SET heartbeat (median)"),
        ("xadd", "session user XADD input (median)"),
        ("connect_auth", "new connection + AUTH + PING (median)"),
        ("reconcile", "central full reconcile pass (median)"),
        ("reconcile_quick", "central incremental reconcile pass (median)"),
    ):
        a, b, c = m[f"none_{tag}_ms"], m[f"many_{tag}_ms"], m[f"after_{tag}_ms"]
        rows.append(
            f"| {what}, {m['users']:,} users | {b:.3f} ms | none: {a:.3f} ms before, {c:.3f} ms after "
            f"| {b / ((a + c) / 2):.2f} |"
        )
    q = (m["flood_quiet_ms"] + m["flood_quiet_after_ms"]) / 2
    rows.append(
        f"| B's XADD input (median) while A floods its own input | {m['flood_ms']:.3f} ms | quiet: "
        f"{m['flood_quiet_ms']:.3f} ms before, {m['flood_quiet_after_ms']:.3f} ms after | {m['flood_ms'] / q:.2f} |"
    )
    return "\n".join(rows)


def write_markdown(result: dict[str, Any], path: str) -> None:
    body = (
        "`cloudq bench security --write BENCHMARKS.md` (embedded Valkey with cloudq's ACL users; "
        f"{result['logins']} concurrent logins per run, median of 2 runs per replica count; "
        "medians over 500 user creations/deletions and 2000 commands).\n"
        f"Machine: {result['machine']} (shared with other jobs while measured).\n\n"
        + result["table"]
        + "\n\nLogins are bound by bcrypt (cost 12): a replica checks one password per login, so "
        "replicas add throughput up to the cores they get. Per-command latency does not depend on "
        "the number of ACL users (the spread between the two baselines is noise of the shared "
        "machine); what grows is memory per user and the central server's full reconcile pass "
        "(`ACL USERS` against the live sessions), still every 0.25 s; the incremental part (closed sessions, expired tokens) "
        "is measured apart, as the cost of a pass that does not grow with the number of users." + MEMORY_NOTE
    )
    write_section("Security: logins and session users", body, path)
