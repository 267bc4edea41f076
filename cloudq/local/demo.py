"""``cloudq demo``: the whole method on one machine in about a minute, with proof at the end.

It starts an embedded Valkey with cloudq's ACL users (:class:`cloudq.local.cluster.Cluster`), the central
server, 2 ``paint`` nodes, an RQ worker and the browser gateway (its URL is printed first, so a
person can join while it runs), then three scripted users, each a real ``cloudq connect
--headless`` child recording what it receives into ``OUT/<user>.mp4``:

- ``drawer`` draws for the whole run;
- ``idler`` draws, stops long enough for its node to fall asleep, then draws again (the node wakes),
  and logs out after about a third of the run;
- ``dropper`` arrives while both nodes are taken, so it waits in the queue until ``idler`` leaves;
  once it draws, its client is killed (SIGKILL: no logout, the heartbeats just stop), and a new
  client for the same user logs in within the grace and gets the same session back.

Every second a plain-text table (:mod:`cloudq.central.status`) and the CPU of each node process
(``/proc``) are printed. The summary says who waited in the queue and how long, how often nodes
slept and woke (the ``events`` stream), each user's saved data versions (the store), the MP4s, and
the node CPU saved by sleeping: node-seconds asleep x (CPU/s of an ``--always-encode`` node with an
awake session - CPU/s of a sleeping node), both rates measured in this run (the always-encoding
one on a third node started after the users left, see :meth:`Demo._baseline`).

:func:`run_demo` returns the list of failed checks (empty = every step it claims happened did).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from cloudq.central.auth import Users
from cloudq.central.status import format_text, gather, rates
from cloudq.connection import connect
from cloudq.keys import Keys
from cloudq.local.cluster import Cluster
from cloudq.procs import ProcessGroup, cloudq_command
from cloudq.procstat import tree_cpu
from cloudq.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "cloudq:"
USERS = ("drawer", "idler", "dropper")
GUEST = "guest"
"""A user for a person in a browser (the gateway)."""
MIN_DURATION = 15.0
TICK = 0.2
SAVE_TIMEOUT = 30.0
"""Bound on waiting, after the users left, for every user's data to be saved."""
SIZE = (320, 240)
BASELINE_S = 6.0
"""The measured window of the always-encoding baseline node."""


def demo_settings() -> Settings:
    """Clocks short enough to see everything in a minute (the real ones are human-sized)."""
    return Settings(
        heartbeat_interval=0.5,
        heartbeat_ttl=1.5,
        idle_timeout=2.0,
        grace=30.0,
        idle_close=60.0,
        node_ttl=3.0,
        autosave=0,
    )


@dataclass
class DemoConfig:
    duration: float = 60.0
    out: str = "cloudq-demo-out"
    host: str = "127.0.0.1"
    port: int = 8080
    """Gateway port (0 = any free port)."""

    def __post_init__(self) -> None:
        if self.duration < MIN_DURATION:
            raise ValueError(f"--duration must be at least {MIN_DURATION:g} s, got {self.duration:g}")


@dataclass
class Checks:
    failed: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        (self.passed if ok else self.failed).append(what)
        return ok


def strokes(start: float, end: float, row: int) -> str:
    """Script lines drawing zig-zag strokes from ``start`` to ``end`` s (10 moves a second)."""
    w, h = SIZE
    lines, t, k = [], start, 0
    while t < end:
        y = 10 + (row * 37 + k * 13) % (h - 20)
        lines.append(f"{t:.2f} key {1 + (k + row) % 8}")
        lines.append(f"{t + 0.05:.2f} mouse_down 10 {y}")
        for i in range(1, 10):
            lines.append(f"{t + 0.05 + i * 0.1:.2f} mouse_move {10 + i * (w - 20) // 9} {(y + i * 7) % h}")
        lines.append(f"{t + 1.0:.2f} mouse_up {w - 10} {(y + 63) % h}")
        t, k = t + 1.1, k + 1
    return "\n".join(lines) + "\n"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mp4_frames(path: str) -> int:
    """Frames decoded from an MP4 (0 if it is missing or does not decode)."""
    import av

    try:
        with av.open(path) as c:
            return sum(1 for _ in c.decode(video=0))
    except (OSError, av.error.FFmpegError, ValueError):
        return 0


class Demo:
    def __init__(self, cfg: DemoConfig, say: Callable[[str], None]) -> None:
        self.cfg, self.say = cfg, say
        self.keys = Keys(PREFIX)
        self.settings = demo_settings()
        self.out = os.path.abspath(cfg.out)
        self.tmp = tempfile.mkdtemp(prefix="cloudq-demo-")
        self.store = os.path.join(self.tmp, "store")
        self.checks = Checks()
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}
        self.assigned: dict[str, float] = {}
        self.queued: set[str] = set()
        self.sids: dict[str, set[str]] = {u: set() for u in USERS}
        self.node_cpu: dict[str, dict[str, float]] = {}  # node -> state -> CPU seconds
        self.node_time: dict[str, dict[str, float]] = {}  # node -> state -> seconds
        self.dropped_sid = ""
        self.drop_phase = "waiting"  # waiting -> drawing -> killed -> back
        self.drop_at = 0.0

    # -- processes ------------------------------------------------------------------------------
    def _connect(self, user: str, duration: float, script: str, record: str, tag: str) -> None:
        path = os.path.join(self.tmp, f"{user}-{tag}.script")
        with open(path, "w") as fh:
            fh.write(script)
        pw = os.path.join(self.tmp, f"{user}.pw")
        group = self.cluster.group
        self.clients[user] = group.start(
            "connect", "--user", user, "--password-file", pw, "--headless",
            "--duration", f"{duration:.1f}", "--queue-wait", f"{self.cfg.duration + 30:.0f}",
            "--script", path, "--record", record,
            "--stats-json", os.path.join(self.tmp, f"{user}-{tag}.json"),
            name=f"{user}-{tag}", CLOUDQ_HEADLESS="1",
        )  # fmt: skip
        self.started.setdefault(user, time.monotonic())

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> list[str]:
        os.makedirs(self.out, exist_ok=True)
        for u in USERS:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.out, f"{u}.mp4"))
        port = self.cfg.port or free_port(self.cfg.host)
        self.cluster = Cluster(
            prefix=PREFIX, nodes=2, workers=1, app="paint", settings=self.settings, data_dir=self.tmp
        )
        group = self.cluster.group
        group.log_dir = os.path.join(self.out, "logs")
        shutil.rmtree(group.log_dir, ignore_errors=True)
        group.extra_env["CLOUDQ_BCRYPT_COST"] = "4"
        try:
            self.cluster.start()
            group.urls["connect"] = self.cluster.client_url
            if "gateway" in self.cluster.urls:
                group.urls["gateway"] = self.cluster.urls["gateway"]
            self.r = connect(self.cluster.redis_url)
            users = Users(self.r, self.keys)
            users.add(GUEST, f"{GUEST}-pw", cost=4)
            for u in USERS:
                users.add(u, f"{u}-pw", cost=4)
                with open(os.path.join(self.tmp, f"{u}.pw"), "w") as fh:
                    fh.write(f"{u}-pw\n")
            gw = group.start("gateway", "--host", self.cfg.host, "--port", str(port), name="gateway")
            url = f"http://{self.cfg.host}:{port}/"
            self.say(
                f"gateway: {url}  (open it in a browser and log in as {GUEST} / {GUEST}-pw: you queue "
                "for a node like everyone; the checks are about the three scripted users)"
            )
            self.say(f"logs: {group.log_dir}")
            self._wait(lambda: self.r.zcard(self.keys.pool) == 2, 60, "both nodes in the pool")
            self.checks.check(
                self._wait(lambda: self._page(url), 30, "the gateway's page"), "the gateway served its page"
            )
            self._play()
            self.checks.check(gw.poll() is None, "the gateway ran for the whole demo")
            self._summary(url)
        except (RuntimeError, OSError, redis.RedisError, subprocess.SubprocessError, KeyError) as exc:
            self.checks.check(False, f"the demo ran to its end ({exc})")
        finally:
            self.cluster.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.checks.failed

    @staticmethod
    def _page(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def _wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        end = time.monotonic() + timeout
        while not (v := cond()):
            if time.monotonic() > end:
                raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.05)
        return v

    def _play(self) -> None:
        d = self.cfg.duration
        t0 = time.monotonic()
        idle_gap = self.settings.idle_timeout + 3.0  # long enough for the node to fall asleep
        idler_len = max(4.0 + idle_gap, d / 3)
        self._connect("drawer", d - 1, strokes(0, d, 0), os.path.join(self.out, "drawer.mp4"), "1")
        self._connect(
            "idler", idler_len, strokes(0, 2, 3) + strokes(2 + idle_gap, idler_len, 5),
            os.path.join(self.out, "idler.mp4"), "1",
        )  # fmt: skip
        self._wait(lambda: len(self._sessions()) == 2, 30, "drawer and idler to get their nodes")
        self._connect("dropper", d, strokes(0, d, 7), os.path.join(self.tmp, "dropper-before-drop.mp4"), "1")
        prev: dict[str, Any] | None = None
        cpu_prev: dict[str, float] = {}
        next_print = 0.0
        pids = {n: p.pid for n, p in self.cluster.group.names.items() if n.startswith("node")}

        # the users' time; the dropper's return may run past it (bounded by the grace)
        def playing(now: float) -> bool:
            if now < t0 + d:
                return True
            return self.drop_phase in ("drawing", "killed") and now < t0 + d + self.settings.grace

        while playing(now := time.monotonic()):
            st = gather(self.r, self.keys)
            self._observe(st, now, t0 + d)
            if now >= next_print:
                cpu = {n: tree_cpu(pid) for n, pid in pids.items()}
                states = {n["id"]: n["state"] for n in st["nodes"]}
                if cpu_prev:
                    dt = now - (next_print - 1.0)
                    for n, c in cpu.items():
                        s = states.get(n, "?")
                        self.node_cpu.setdefault(n, {}).setdefault(s, 0.0)
                        self.node_time.setdefault(n, {}).setdefault(s, 0.0)
                        self.node_cpu[n][s] += c - cpu_prev[n]
                        self.node_time[n][s] += dt
                cpu_line = "  ".join(f"{n}: {c - cpu_prev.get(n, c):.2f} s CPU" for n, c in cpu.items())
                self.say(
                    f"--- cloudq demo {now - t0:4.0f}/{d:.0f} s ---\n"
                    + format_text(st, rates(prev, st))
                    + f"\nCPU in the last second: {cpu_line}"
                )
                prev, cpu_prev, next_print = st, cpu, now + 1.0
            for name in ("central", "worker1", "node1", "node2", "gateway"):
                p = self.cluster.group.names[name]
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} during the demo")
            time.sleep(TICK)  # the table's and the script's pace, not a synchronisation
        self.say("--- the users are leaving; waiting for their data to be saved ---")
        for u, p in self.clients.items():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                self.checks.check(False, f"{u}'s client ended by itself")
                ProcessGroup.kill(p, signal.SIGTERM)

    def _sessions(self) -> dict[str, dict[str, Any]]:
        return {s["user"]: s for s in gather(self.r, self.keys)["sessions"] if s["state"] != "closed"}

    def _observe(self, st: dict[str, Any], now: float, t_end: float) -> None:
        for u in st["queue"]:
            self.queued.add(u)
        for s in st["sessions"]:
            u = s["user"]
            if u in self.sids and s["node"]:
                self.sids[u].add(s["id"])
                if u not in self.assigned and u in self.started:
                    self.assigned[u] = now
        # the dropper: draw a little, lose the client, come back within the grace
        sess = {s["user"]: s for s in st["sessions"]}
        me = sess.get("dropper")
        if self.drop_phase == "waiting" and me and me["state"] == "active":
            self.drop_phase, self.drop_at = "drawing", now + 3.0
        elif self.drop_phase == "drawing" and now >= self.drop_at and me:
            self.dropped_sid = me["id"]
            ProcessGroup.kill(self.clients["dropper"], signal.SIGKILL)
            self.say(f"=== dropper's client killed (SIGKILL) in session {self.dropped_sid} ===")
            self.drop_phase = "killed"
        elif self.drop_phase == "killed" and me and me["state"] == "disconnected":
            left = max(3.0, t_end - now - 1)
            self._connect("dropper", left, strokes(0, left, 9), os.path.join(self.out, "dropper.mp4"), "2")
            self.say("=== dropper's heartbeat lapsed (disconnected); a new client logs in ===")
            self.drop_phase = "back"

    # -- the summary ----------------------------------------------------------------------------
    def _events(self) -> tuple[int, int]:
        sleeps = wakes = 0
        state: dict[str, str] = {}
        for _, f in self.r.xrange(self.keys.events):
            obj = f.get(b"obj", b"").decode()
            if not obj.startswith("node:"):
                continue
            to = f.get(b"to", b"").decode()
            before = state.get(obj, "")
            if to == "sleeping" and before != "sleeping":
                sleeps += 1
            elif before == "sleeping" and to == "active":
                wakes += 1
            state[obj] = to
        return sleeps, wakes

    def _versions(self, user: str) -> list[dict[str, Any]]:
        res = self.cluster.group.run("data", "ls", "--store", self.store, user, "--json", timeout=30)
        if res.returncode != 0:
            log.debug("cloudq data ls %s failed: %s", user, res.stderr.strip()[-300:])
            return []
        try:
            return list(json.loads(res.stdout or "[]"))
        except ValueError:
            return []

    def _stats(self, user: str, tag: str) -> dict[str, Any]:
        try:
            with open(os.path.join(self.tmp, f"{user}-{tag}.json")) as fh:
                return dict(json.load(fh))
        except (OSError, ValueError):
            return {}

    def _summary(self, url: str) -> None:
        c, say = self.checks, self.say
        say("=== summary ===")
        for u in USERS:
            c.check(bool(self.sids[u]), f"{u} got a session")
        say("queue:")
        for u in USERS:
            if u in self.assigned:
                waited = self.assigned[u] - self.started[u]
                how = "waited in the queue" if u in self.queued else "got a node at once"
                say(f"  {u:<8} {how}: {waited:.1f} s from its client's start to a node")
            else:
                say(f"  {u:<8} never got a node")
        c.check("dropper" in self.queued, "dropper waited in the queue while both nodes were taken")
        sleeps, wakes = self._events()
        say(f"nodes: {sleeps} times asleep, {wakes} times woken (from the events stream)")
        c.check(sleeps >= 1 and wakes >= 1, "a node slept and woke")
        idler = self._stats("idler", "1")
        c.check(
            "sleeping" in idler.get("states", []) and idler.get("states", [])[-1:] != ["sleeping"],
            "idler's node slept while it was idle and woke when it drew again",
        )
        back = self._stats("dropper", "2")
        same = bool(self.dropped_sid) and back.get("sid") == self.dropped_sid
        say(
            f"dropper: client killed in session {self.dropped_sid or '-'}, "
            f"came back to session {back.get('sid') or '-'}"
        )
        c.check(same, "the dropper came back to the same session within the grace")
        _ = self._wait_saved()
        self._cpu_saved(self._baseline())
        say("saved data versions (the store):")
        for u in USERS:
            vs = self._versions(u)
            say(f"  {u:<8} {len(vs)} version(s): {', '.join(str(v.get('version')) for v in vs) or '-'}")
            c.check(len(vs) >= 1, f"{u} has a saved data version")
        say(f"recordings in {self.out}:")
        for u in USERS:
            path = os.path.join(self.out, f"{u}.mp4")
            n = mp4_frames(path)
            say(f"  {u}.mp4: {n} frames decoded")
            c.check(n >= 1, f"{u}.mp4 exists and decodes")
        say(f"gateway was at {url}")
        if c.failed:
            say("FAILED checks:")
            for f in c.failed:
                say(f"  FAIL: {f}")
        else:
            say(f"all {len(c.passed)} checks passed")

    def _wait_saved(self) -> bool:
        end = time.monotonic() + SAVE_TIMEOUT
        while time.monotonic() < end:
            if all(self._versions(u) for u in USERS) and not self._sessions():
                return True
            time.sleep(0.5)
        return False

    def _baseline(self) -> float | None:
        """CPU rate (CPU-s per s) of an ``--always-encode`` node with an awake session, measured
        here: the other nodes are drained, a third node starts with ``--always-encode`` and a
        user gives it one short stroke every 1.5 s (so it never falls asleep)."""
        group = self.cluster.group
        self.say(f"--- baseline: an --always-encode node, {BASELINE_S:g} s with a user who stays awake ---")
        env = group.child_env("node", CLOUDQ_REDIS_URL_FILE=self.cluster.admin_url_file())
        for n in ("node1", "node2"):
            subprocess.run(
                [*cloudq_command(), "node", "drain", n], env=env, capture_output=True, timeout=30, check=True
            )
        node = group.start(
            "node", "--id", "node3", "--host", "local", "--app", "paint", "--always-encode", name="node3"
        )
        self._wait(lambda: self.r.zscore(self.keys.pool, "node3") is not None, 60, "the baseline node")
        Users(self.r, self.keys).add("baseline", "baseline-pw", cost=4)
        with open(os.path.join(self.tmp, "baseline.pw"), "w") as fh:
            fh.write("baseline-pw\n")
        w, h = SIZE
        script = "".join(
            f"{t * 1.5:.2f} mouse_down {20 + t * 7 % (w - 40)} {h // 2}\n"
            f"{t * 1.5 + 0.1:.2f} mouse_up {24 + t * 7 % (w - 40)} {h // 2}\n"
            for t in range(int((BASELINE_S + 10) / 1.5))
        )
        self._connect("baseline", BASELINE_S + 8, script, os.path.join(self.tmp, "baseline.mp4"), "1")
        self._wait(
            lambda: self.r.hget(self.keys.node("node3"), "state") == b"active", 30, "the baseline session"
        )
        time.sleep(1.0)  # let the encoder settle (its first keyframe) before the window
        c0, m0 = tree_cpu(node.pid), time.monotonic()
        stayed_awake = True
        while time.monotonic() < m0 + BASELINE_S:
            stayed_awake &= self.r.hget(self.keys.node("node3"), "state") == b"active"
            time.sleep(0.25)  # sampling the node's state during the measured window
        rate = (tree_cpu(node.pid) - c0) / (time.monotonic() - m0)
        ProcessGroup.kill(self.clients["baseline"], signal.SIGTERM)
        if not self.checks.check(
            stayed_awake, "the always-encoding baseline node stayed awake while measured"
        ):
            return None
        return rate

    def _cpu_saved(self, always_rate: float | None) -> None:
        tot_cpu: dict[str, float] = {}
        tot_time: dict[str, float] = {}
        for n in self.node_cpu:
            for s, v in self.node_cpu[n].items():
                tot_cpu[s] = tot_cpu.get(s, 0.0) + v
                tot_time[s] = tot_time.get(s, 0.0) + self.node_time[n][s]
        self.say("node CPU by state (measured from /proc, sampled each second):")
        for s in sorted(tot_time):
            rate = tot_cpu[s] / tot_time[s] if tot_time[s] else 0.0
            self.say(
                f"  {s:<12} {tot_time[s]:6.1f} node-s  {tot_cpu[s]:6.2f} CPU-s  ({100 * rate:.1f}% of a core)"
            )
        asleep = tot_time.get("sleeping", 0.0)
        if always_rate is not None:
            self.say(
                f"  always-encoding node, awake (measured, baseline): {100 * always_rate:.1f}% of a core"
            )
        if asleep and always_rate is not None:
            r_sleep = tot_cpu.get("sleeping", 0.0) / asleep
            saved = asleep * (always_rate - r_sleep)
            self.say(
                f"CPU saved by sleeping: about {saved:.2f} CPU-s = {asleep:.1f} node-s asleep x "
                f"({100 * always_rate:.1f}% always-encoding - {100 * r_sleep:.1f}% asleep), "
                f"{always_rate / max(r_sleep, 1e-9):.0f}x less CPU per asleep node-second; both rates "
                "measured in this run, the node-seconds from the samples above"
            )
        else:
            self.say("CPU saved by sleeping: not measured (no node slept, or no baseline)")


def run_demo(cfg: DemoConfig, say: Callable[[str], None]) -> list[str]:
    """Run the demo; returns the failed checks (empty: everything it claims happened)."""
    return Demo(cfg, say).run()
