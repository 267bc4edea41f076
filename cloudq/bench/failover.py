"""``cloudq bench failover``: what replica acknowledgements cost, and how long a failover is.

A primary, one replica and three Sentinels (:class:`cloudq.local.ha.EmbeddedHA`, Sentinel
``down-after-milliseconds`` 300), one real ``cloudq central`` on the ``redis+sentinel://`` URL,
fake nodes, users at bcrypt cost 4 (so the password check does not hide the rest).

- **Login latency** (request → reply, through the login user), one login after another, with the
  central server waiting for a replica's acknowledgement of each (``--replica-wait 1``, ``WAIT 1``)
  and without (``--replica-wait 0``); interleaved runs, same servers.
- **Failover**: ``kill -9`` of the primary, then logins are tried until one is answered: the
  time from the kill to that answer is what a user logging in at the worst moment waits.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import redis

from cloudq.bench.report import machine, write_section
from cloudq.central.auth import Users
from cloudq.client.launcher import ClientError, Launcher
from cloudq.connection import connect
from cloudq.keys import Keys
from cloudq.local.ha import EmbeddedHA
from cloudq.percentile import percentile
from cloudq.procs import ProcessGroup
from cloudq.settings import Settings
from cloudq.state import StateMachine

PREFIX = "cqv:"
COST = 4


def _logins(url: str, names: list[str]) -> list[float]:
    keys = Keys(PREFIX)
    out = []
    r = connect(url, socket_timeout=5, socket_connect_timeout=2)
    for name in names:
        t = time.perf_counter()
        Launcher(r, keys, reply_timeout=10).login(name, "pw", wait=0)
        out.append((time.perf_counter() - t) * 1000)
    r.close()
    return out


def run(logins: int = 40, rounds: int = 2, frame_runs: int = 0) -> dict[str, Any]:
    keys = Keys(PREFIX)
    ha = EmbeddedHA(replicas=1, sentinels=3, keys=keys, down_after_ms=300, failover_timeout_ms=2000).start()
    urls = ha.role_urls()
    admin = connect(urls["admin"], socket_timeout=5)
    group = ProcessGroup(urls["central"], PREFIX, log_dir=tempfile.mkdtemp(prefix="cloudq-bench-failover-"))
    total = logins * rounds * 2 + 50
    waited: list[float] = []
    direct: list[float] = []
    try:
        Settings(lockout_limit=0, node_ttl=0).publish(admin, keys)
        users, sm = Users(admin, keys, cost=COST), StateMachine(admin, keys)
        for i in range(total):
            users.add(f"u{i}", "pw")
            sm.register_node(f"n{i}", "bench", "paint", "x")
        n = 0
        for _ in range(rounds):
            for wait, out in (("1", waited), ("0", direct)):
                c = group.start(
                    "central",
                    "--no-notifications",
                    "--node-ttl",
                    "0",
                    "--lockout-limit",
                    "0",
                    "--replica-wait",
                    wait,
                )
                out += _logins(urls["login"], [f"u{i}" for i in range(n, n + logins)])
                n += logins
                group.stop(c)
        group.start("central", "--no-notifications", "--node-ttl", "0", "--lockout-limit", "0")
        _logins(urls["login"], [f"u{n}"])  # the central server is up and answering
        n += 1
        killed = time.monotonic()
        ha.primary.kill()  # type: ignore[union-attr]
        r = connect(urls["login"], socket_timeout=2, socket_connect_timeout=1)
        while True:
            try:
                Launcher(r, keys, reply_timeout=2).login(f"u{n}", "pw", wait=0)
                break
            except (ClientError, redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
                if time.monotonic() - killed > 60:
                    raise RuntimeError("no login was answered within 60 s of the kill") from None
                n += 1
                time.sleep(0.05)
        downtime = time.monotonic() - killed
        r.close()
    finally:
        group.stop_all()
        admin.close()
        ha.stop()
    result: dict[str, Any] = {
        "machine": machine(),
        "logins": logins * rounds,
        "wait_p50": percentile(waited, 50),
        "wait_p95": percentile(waited, 95),
        "direct_p50": percentile(direct, 50),
        "direct_p95": percentile(direct, 95),
        "downtime_s": downtime,
    }
    if frame_runs:
        from cloudq.bench import failover_frames

        result["frames"] = failover_frames.run(frame_runs)
    result["table"] = format_table(result)
    return result


def format_table(m: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| measure | value | baseline (same run) | ratio |",
            "|---|---|---|---|",
            f"| login, answered after a replica has it (`WAIT 1`), p50 / p95 | {m['wait_p50']:.2f} / "
            f"{m['wait_p95']:.2f} ms | without waiting: {m['direct_p50']:.2f} / {m['direct_p95']:.2f} ms | "
            f"{m['wait_p50'] / m['direct_p50']:.2f} (p50) |",
            f"| `kill -9` of the primary → the next login answered | {m['downtime_s']:.2f} s | "
            "Sentinel down-after 300 ms | |",
            *(
                [
                    f"| `kill -9` of the primary → each watching user's first new frame, p50 / max "
                    f"({f['runs']} runs, 2 users each) | {f['frame_delay_p50_s']:.2f} / {f['frame_delay_max_s']:.2f} s "
                    "| Sentinel down-after 1000 ms | |",
                    f"| acknowledged logins lost by the failover (`WAIT 1`) | {f['lost_logins']} | | |",
                    f"| events stream entries written before the kill and gone after (no `WAIT`), per run "
                    f"| {', '.join(map(str, f['lost_events']))} | | |",
                ]
                if (f := m.get("frames"))
                else []
            ),
        ]
    )


def write_markdown(result: dict[str, Any], path: str) -> None:
    body = (
        "`cloudq bench failover --write BENCHMARKS.md` (a primary, one replica and three Sentinels, all "
        f"embedded; one `cloudq central` on the `redis+sentinel://` URL; {result['logins']} logins per "
        "case, one after another, bcrypt cost 4).\n"
        f"Machine: {result['machine']} (shared with other jobs while measured).\n\n" + result["table"]
    )
    write_section("Failover: replica acknowledgements and a primary's loss", body, path)
