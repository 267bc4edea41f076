"""``cloudq bench security --flood``: a real user's login while anonymous logins flood in.

On an embedded server with cloudq's ACL users, one real ``cloudq central`` (bcrypt cost 12, its
default budget: 2 checking threads, 32 waiting). Real users log in one after another through the
public login user, as ``cloudq connect`` does (request, reply, the session's Redis user), each on
a free (registered, fake) node: the login time is request to usable session. Measured quiet,
then while another process pushes ``rate`` login requests a second for random names (the
anonymous flood of the abuse issue), then quiet again; the quiet runs are the baseline.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import secrets
import time
from typing import Any

import redis

from cloudq.bench.report import machine, write_section
from cloudq.central.auth import Users
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.local.cluster import setup_acl
from cloudq.loginflow import login_request
from cloudq.percentile import percentile
from cloudq.procs import ProcessGroup
from cloudq.settings import Settings
from cloudq.state import StateMachine

log = logging.getLogger(__name__)

PREFIX = "cqf:"
COST = 12


def _flooder(url: str, rate: float, seconds: float) -> None:
    """Push ``rate`` login requests a second for random names, paced, for ``seconds``."""
    r = redis.Redis.from_url(url)
    keys = Keys(PREFIX)
    t0 = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - t0 < seconds:
        due = int((now - t0) * rate) - sent
        if due > 0:
            r.rpush(
                keys.requests,
                *(login_request(f"x{secrets.token_hex(6)}", "guess").pack() for _ in range(due)),
            )
            sent += due
        time.sleep(0.01)
    r.close()


def _logins(urls: dict[str, str], users: list[str]) -> list[float]:
    from cloudq.client.launcher import Launcher

    times = []
    for name in users:
        r = redis.Redis.from_url(urls["login"])
        t = time.perf_counter()
        Launcher(r, Keys(PREFIX), reply_timeout=30).login(name, "pw", wait=0)
        times.append(time.perf_counter() - t)
        r.close()
    return times


def run(rate: float = 100.0, per_phase: int = 15) -> dict[str, Any]:
    server = EmbeddedServer().start()
    keys = Keys(PREFIX)
    try:
        urls = setup_acl(server.url, keys)
        admin = redis.Redis.from_url(urls["admin"])
        Settings(lockout_limit=0, node_ttl=0).publish(admin, keys)  # fake nodes: never offline
        names = [f"u{i}" for i in range(3 * per_phase)]
        users = Users(admin, keys, cost=COST)
        for name in names:
            users.add(name, "pw")
        sm = StateMachine(admin, keys)
        for i in range(len(names)):
            sm.register_node(f"n{i}", "bench", "paint", "x")
        group = ProcessGroup(urls["central"], PREFIX, env={"CLOUDQ_BCRYPT_COST": str(COST)})
        try:
            group.start("central", "--no-notifications", "--node-ttl", "0", "--lockout-limit", "0")
            end = time.monotonic() + 30
            while admin.zcard(keys.centrals) < 1:
                if time.monotonic() > end:
                    raise RuntimeError("the central server did not start")
                time.sleep(0.05)
            quiet = _logins(urls, names[:per_phase])
            flooder = mp.get_context("spawn").Process(target=_flooder, args=(urls["login"], rate, 3600.0))
            flooder.start()
            try:
                time.sleep(2.0)  # the flood is on before the first measured login
                flooded = _logins(urls, names[per_phase : 2 * per_phase])
            finally:
                flooder.terminate()
                flooder.join(10)
            after = _logins(urls, names[2 * per_phase :])
        finally:
            group.stop_all()
        admin.close()
    finally:
        server.stop()
    q = quiet + after
    result: dict[str, Any] = {
        "machine": machine(),
        "rate": rate,
        "per_phase": per_phase,
        "quiet_p50": percentile(q, 50),
        "quiet_p95": percentile(q, 95),
        "flood_p50": percentile(flooded, 50),
        "flood_p95": percentile(flooded, 95),
        "runs": {"quiet": quiet, "flood": flooded, "after": after},
    }
    result["table"] = format_table(result)
    return result


def format_table(m: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| a real user's login (request → session) | p50 | p95 | baseline p50 / p95 (quiet, same run) | ratio p95 |",
            "|---|---|---|---|---|",
            f"| while {m['rate']:.0f} anonymous logins/s for random names arrive | {m['flood_p50']:.3f} s | "
            f"{m['flood_p95']:.3f} s | {m['quiet_p50']:.3f} s / {m['quiet_p95']:.3f} s | "
            f"{m['flood_p95'] / m['quiet_p95']:.2f} |",
        ]
    )


def write_markdown(result: dict[str, Any], path: str) -> None:
    body = (
        "`cloudq bench security --flood --write BENCHMARKS.md` (embedded Valkey with cloudq's ACL "
        f"users, one `cloudq central` at bcrypt cost {COST}; {result['per_phase']} real logins per phase, "
        "one after another, quiet, flooded, quiet again).\n"
        f"Machine: {result['machine']} (shared with other jobs while measured).\n\n"
        + result["table"]
        + "\n\nAn unknown name costs no bcrypt: its refusal is held back for as long as a real check "
        "takes (measured by the server), so the flood costs the central server a request parse "
        "and a timer each, and its answers still do not tell which names exist. Known names are "
        "checked on a budget (2 threads, 32 waiting, then `busy`)."
    )
    write_section("Security: a real login under an anonymous login flood", body, path)
