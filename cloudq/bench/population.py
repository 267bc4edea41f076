"""A population of simulated users against a real pool: the engine of ``cloudq bench cost`` and
``cloudq demo``.

:func:`run_population` starts everything for one run on this machine: its own embedded Valkey, a
central server, an RQ worker and M ``cloudq node`` processes (:class:`~cloudq.procs.ProcessGroup`),
then lets U users act on their habits for a fixed time, each on a thread of this process with the
real client code: :class:`~cloudq.client.launcher.Launcher` (login, queue, activity, logout) and
:class:`~cloudq.client.kernel.Kernel` (heartbeat thread, player thread decoding every frame, input
pump). A :class:`Mode` says which clocks the run uses and whether nodes always encode, so one
function runs both sides of the comparison.

Habits (:class:`Habits`, drawn from one seeded RNG per user, so both modes of one seed replay the
same people): a visit starts with a login (waiting in the queue if no node is free), then bursts
of input (mouse strokes in ``paint``) alternate with idle gaps; a gap is now and then a long break
(the user stays logged in and walks away) or a dropped connection (the kernel stops: no more
heartbeats, no player; the user logs in again within the reconnect grace). A visit ends with a
logout, and the user comes back later as a new session. Human times are in simulated seconds and
divided by ``time_scale``; the network clocks (heartbeat) and the frame rate are not scaled.

What it measures (every figure over the same window: from the moment the users start to the end):
CPU seconds of every process from ``/proc/<pid>/stat`` (utime + stime, plus reaped and live
children: the worker's forked work horses), by role, with this process (every simulated client)
counted apart; each node's peak resident memory (``VmHWM``); the node state timeline from the
``events`` stream (so the share of node-time spent sleeping); each new session's queue wait as the
client saw it (login request -> node assigned); distinct sessions served; user presence time
(login request -> logout, the user-hours everything is divided by).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from cloudq.central.auth import Users
from cloudq.client.kernel import Kernel
from cloudq.client.launcher import ClientError, Launcher, Ticket
from cloudq.client.sinks import CallbackSink, Sink
from cloudq.embedded import EmbeddedServer
from cloudq.keys import Keys
from cloudq.percentile import percentile
from cloudq.procs import ProcessGroup
from cloudq.procstat import children_map, cpu_seconds, peak_rss_mib, tree_cpu
from cloudq.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "cqp:"
PASSWORD = "population-pw"
STARTUP_TIMEOUT = 60.0
FIRST_FRAME_TIMEOUT = 15.0
POLL = 0.25
"""How often an idle client looks at its session's state (as ``ClientSession`` does)."""
ROLES = ("valkey", "media", "central", "worker", "node")
"""The server's roles: ``valkey`` is the control server (sessions, nodes, queue, heartbeats, RQ),
``media`` the media servers (the sessions' streams; none with ``media_servers=0``)."""
CONTROL = ("valkey", "central", "worker")
"""The control plane's roles."""


# -- what a run is -----------------------------------------------------------------------------
@dataclass
class Habits:
    """How the simulated people behave. Times in simulated seconds (divided by ``time_scale``)."""

    activity: float = 0.3
    """Share of a visit spent giving input: mean burst = mean gap x activity / (1 - activity)."""
    idle_gap: float = 180.0
    """Mean ordinary idle gap between two bursts (exponential)."""
    p_break: float = 0.12
    """Chance that a gap is a long break (the user stays logged in and walks away)."""
    long_break: tuple[float, float] = (480.0, 1500.0)
    """A long break lasts uniformly this long."""
    p_drop: float = 0.08
    """Chance that a gap is a dropped connection; the user is back within the reconnect grace."""
    visit: float = 900.0
    """Mean visit (exponential, at least ``min_visit``): the user logs out after the first burst and
    gap that end past it (whole cycles, so the share of input stays ``activity``)."""
    min_visit: float = 240.0
    away: float = 2400.0
    """Mean time away between two visits (exponential)."""
    input_hz: float = 30.0
    """Mouse events per second while drawing (real seconds: a hand does not speed up)."""

    def __post_init__(self) -> None:
        if not 0 < self.activity < 1:
            raise ValueError(f"activity must be in (0, 1), got {self.activity}")
        if self.p_break < 0 or self.p_drop < 0 or self.p_break + self.p_drop >= 1:
            raise ValueError("p_break and p_drop must be >= 0 and sum below 1")

    def mean_gap(self, drop_sim: float) -> float:
        lo, hi = self.long_break
        return (
            (1 - self.p_break - self.p_drop) * self.idle_gap
            + self.p_break * (lo + hi) / 2
            + self.p_drop * drop_sim
        )


@dataclass
class Mode:
    """One side of the comparison."""

    name: str
    settings: Settings
    always_encode: bool

    @classmethod
    def on(cls, time_scale: float) -> Mode:
        """The method: idle nodes sleep, dropped clients get a reconnect grace, abandoned sessions
        close. The human clocks (idle 30 s, grace 120 s, idle-close 15 min) are scaled down."""
        return cls(
            "on",
            Settings(
                idle_timeout=30.0 / time_scale,
                grace=120.0 / time_scale,
                idle_close=900.0 / time_scale,
                max_session=0,
                max_warning=0,
            ),
            always_encode=False,
        )

    @classmethod
    def off(cls) -> Mode:
        """No method: nodes encode every frame tick, sessions never sleep and end only when their
        user logs out (no heartbeat deadline, no idle timeout, no grace or idle close)."""
        return cls(
            "off",
            Settings(heartbeat_ttl=0, idle_timeout=0, grace=0, idle_close=0, max_session=0, max_warning=0),
            always_encode=True,
        )


@dataclass
class PopulationConfig:
    users: int = 8
    nodes: int = 4
    duration: float = 150.0
    """Real seconds that users act (the measured window)."""
    seed: int = 1
    time_scale: float = 30.0
    size: tuple[int, int] = (320, 240)
    fps: float = 30.0
    app: str = "paint"
    freeze: bool = False
    """Method on: nodes run with ``--freeze`` (an ``x11:`` program is stopped while asleep)."""
    media_servers: int = 1
    """Media servers (:mod:`cloudq.media`): the sessions' streams (video, input) live on these, the
    control plane on its own server, as the documented deployment runs them; 0: one server holds both."""
    habits: Habits = field(default_factory=Habits)
    user_habits: dict[str, Habits] = field(default_factory=dict)
    """Habits of particular users (``u1``, ``u2``...), e.g. the demo's scripted three; others get ``habits``."""
    sinks: Callable[[str], list[Sink]] | None = None
    """Extra sinks for each kernel a user starts (e.g. an MP4 recorder), by user name; called again
    after every reconnection, since a dropped client starts a new kernel."""

    def habits_of(self, name: str) -> Habits:
        return self.user_habits.get(name, self.habits)

    def report(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("sinks", "user_habits", "habits")},
            "habits": asdict(self.habits),
            "user_habits": {k: asdict(v) for k, v in self.user_habits.items()},
        }

    def __post_init__(self) -> None:
        if self.users < 1 or self.nodes < 1:
            raise ValueError("users and nodes must be at least 1")
        if self.duration <= 0 or self.time_scale <= 0:
            raise ValueError("duration and time_scale must be positive")
        if self.media_servers < 0:
            raise ValueError("media_servers must be at least 0")


def strokes(
    send: Callable[..., None],
    size: tuple[int, int],
    pen: random.Random,
    seconds: float,
    input_hz: float,
    stop: threading.Event,
    going: Callable[[], bool] = lambda: True,
) -> None:
    """A hand drawing in ``paint`` for ``seconds``: mouse strokes (down, moves at ``input_hz``,
    up), a colour key now and then; ``send(type, **fields)`` delivers each event."""
    w, h = size
    end = time.monotonic() + seconds
    period = 1.0 / input_hz
    while time.monotonic() < end and not stop.is_set() and going():
        x, y = pen.uniform(0, w), pen.uniform(0, h)
        ang, speed = pen.uniform(0, 2 * math.pi), pen.uniform(60, 240)  # px/s
        stroke_end = min(end, time.monotonic() + pen.uniform(0.3, 1.2))
        if pen.random() < 0.2:
            send("key", key=pen.choice("12345678"))
        send("mouse_down", x=int(x), y=int(y))
        while time.monotonic() < stroke_end and not stop.is_set():
            ang += pen.uniform(-0.4, 0.4)
            x = min(max(0.0, x + math.cos(ang) * speed * period), w - 1)
            y = min(max(0.0, y + math.sin(ang) * speed * period), h - 1)
            send("mouse_move", x=int(x), y=int(y))
            stop.wait(period)
        send("mouse_up", x=int(x), y=int(y))


# -- one simulated user ------------------------------------------------------------------------
@dataclass
class UserRecord:
    name: str
    waits: list[float] = field(default_factory=list)
    """Queue wait of each new session (login request -> node assigned), seconds."""
    unserved_waits: list[float] = field(default_factory=list)
    """Waits still unanswered when the run ended (a lower bound of the real wait)."""
    sessions: list[str] = field(default_factory=list)
    presence_s: float = 0.0
    wait_s: float = 0.0
    """All time spent in login (queue waits, reconnections)."""
    session_s: float = 0.0
    """Time holding a session (node assigned -> logout or close seen), drops included."""
    input_s: float = 0.0
    inputs: int = 0
    frames: int = 0
    drops: int = 0
    reconnects: int = 0
    closed_by_server: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


class SimUser(threading.Thread):
    """One person: visits, bursts, gaps, breaks, drops, logouts (see the module docstring)."""

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        name: str,
        cfg: PopulationConfig,
        grace_real: float,
        hb_ttl_real: float,
        t_end: float,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"user-{name}", daemon=True)
        self.r, self.keys, self.cfg = r, keys, cfg
        self.rec = UserRecord(name)
        self.rng = random.Random(f"{cfg.seed}:{name}")  # the schedule: same in both modes
        self.pen = random.Random(f"{cfg.seed}:{name}:pen")  # stroke shapes
        self.t_end = t_end
        self.stop = stop
        self.launcher = Launcher(r, keys)
        self.kernel: Kernel | None = None
        self.ticket: Ticket | None = None
        self.assigned_at: float | None = None
        self.frames = 0
        s = cfg.time_scale
        h = self.habits = cfg.habits_of(name)
        # a drop lasts until the server noticed (heartbeat TTL) plus part of the grace
        self.drop_fraction = (0.2, 0.7)
        self.grace_real, self.hb_ttl_real = grace_real, hb_ttl_real
        drop_sim = (hb_ttl_real + 0.45 * grace_real) * s
        self.burst_mean = h.mean_gap(drop_sim) * h.activity / (1 - h.activity) / s
        self.scale = s

    # -- helpers ------------------------------------------------------------------------------
    def _left(self) -> float:
        return self.t_end - time.monotonic()

    def _pause(self, seconds: float) -> bool:
        """Wait (real seconds, bounded by the run); False when the run is over."""
        return not self.stop.wait(max(0.0, min(seconds, self._left())))

    def _on_frame(self, *_: Any) -> None:
        self.frames += 1

    def _start_kernel(self) -> None:
        assert self.ticket is not None
        sid = self.ticket.sid
        self.kernel = Kernel(
            self.r,
            self.keys,
            sid,
            self.launcher.settings,
            [CallbackSink(self._on_frame), *(self.cfg.sinks(self.rec.name) if self.cfg.sinks else [])],
            on_input=lambda: self.launcher.mark_activity(sid),
            media=self.launcher.media(sid),
        ).start()

    def _stop_kernel(self) -> None:
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None

    def _session_closed(self) -> str:
        """The server's close reason if our session was closed, else ''."""
        if self.ticket is None:
            return "none"
        # as the real client does (client/session.py): what the kernel's heartbeat last read, else
        # the server itself
        fields = self.kernel.heartbeat.session() if self.kernel is not None else None
        if fields is not None:
            state, reason = fields["state"], fields["close_reason"]
        else:
            state, reason = (
                (v or b"").decode()
                for v in self.r.hmget(self.keys.session(self.ticket.sid), "state", "close_reason")
            )
        if not state or state == "closed":
            return reason or "closed"
        return reason

    def _login(self) -> bool:
        """Log in (a new session, or back to ours); wait in the queue up to the run's end."""
        t0 = time.monotonic()
        old = self.ticket.sid if self.ticket else None
        try:
            t = self.launcher.login(self.rec.name, PASSWORD, wait=max(0.5, self._left()))
        except ClientError as exc:
            if "gave up" in str(exc):
                self.rec.unserved_waits.append(time.monotonic() - t0)
            else:
                self.rec.errors.append(str(exc))
            return False
        waited = time.monotonic() - t0
        self.rec.wait_s += waited
        self.ticket = t
        if t.sid != old:
            self._end_session()
            self.assigned_at = time.monotonic()
            self.rec.sessions.append(t.sid)
            self.rec.waits.append(waited)
        else:
            self.rec.reconnects += 1
        self._start_kernel()
        if t.sid != old:  # a person looks at the picture before drawing
            end = time.monotonic() + min(FIRST_FRAME_TIMEOUT, max(0.0, self._left()))
            f0 = self.frames
            while self.frames == f0 and time.monotonic() < end and not self.stop.is_set():
                self.stop.wait(0.02)
        return True

    def _end_session(self) -> None:
        if self.assigned_at is not None:
            self.rec.session_s += time.monotonic() - self.assigned_at
            self.assigned_at = None

    def _logout(self) -> None:
        self._stop_kernel()
        self._end_session()
        if self.ticket is not None:
            with contextlib.suppress(ClientError, redis.RedisError):
                self.launcher.logout(self.ticket.token)
        self.ticket = None

    def _burst(self, seconds: float) -> None:
        t0 = time.monotonic()
        seconds = min(seconds, self._left())
        h = self.habits
        strokes(
            self._send,
            self.cfg.size,
            self.pen,
            seconds,
            h.input_hz,
            self.stop,
            lambda: self.kernel is not None,
        )
        self.rec.input_s += time.monotonic() - t0

    def _send(self, type: str, **kw: object) -> None:
        if self.kernel is not None:
            self.kernel.pump.put(type, **kw)
            self.rec.inputs += 1

    def _idle(self, seconds: float) -> bool:
        """Stay logged in without input, watching the session; False if the server closed it."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and self._left() > 0 and not self.stop.is_set():
            self.stop.wait(min(POLL, left, max(0.0, self._left())))
            if self.ticket is not None and (reason := self._session_closed()):
                self.rec.closed_by_server[reason] += 1
                self._stop_kernel()  # the client shows why and stops; the person comes back later
                self._end_session()
                self.ticket = None
                self.stop.wait(max(0.0, min(end - time.monotonic(), self._left())))
                return False
        return True

    # -- the person ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._live()
        except Exception as exc:  # a bench user must not take the run down; it is reported
            log.exception("simulated user %s failed", self.rec.name)
            self.rec.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                self._logout()

    def _live(self) -> None:
        h, s, rng = self.habits, self.scale, self.rng
        # the run starts mid-day in the steady state, not at opening time: a user is in a visit
        # with the probability a visit has in the day (and starts it now), else away for a
        # residual time away (exponential, so the residual has the same law). Arrivals spread
        # uniformly over one mean time away instead would pile up in the first minute.
        if rng.random() >= h.visit / (h.visit + h.away) and not self._pause(rng.expovariate(1 / h.away) / s):
            return
        while self._left() > 0 and not self.stop.is_set():
            visit = max(h.min_visit, rng.expovariate(1 / h.visit)) / s
            away = rng.expovariate(1 / h.away) / s
            arrived = time.monotonic()
            if self._login():
                visit_end = time.monotonic() + visit
                while time.monotonic() < visit_end and self._left() > 0 and not self.stop.is_set():
                    burst = rng.expovariate(1 / self.burst_mean)
                    u = rng.random()
                    if u < h.p_drop:
                        kind, gap = (
                            "drop",
                            self.hb_ttl_real + rng.uniform(*self.drop_fraction) * self.grace_real,
                        )
                    elif u < h.p_drop + h.p_break:
                        kind, gap = "break", rng.uniform(*h.long_break) / s
                    else:
                        kind, gap = "idle", rng.expovariate(1 / h.idle_gap) / s
                    if self.ticket is None and not self._login():  # the server closed it meanwhile
                        break
                    self._burst(burst)
                    if kind == "drop":
                        self.rec.drops += 1
                        self._stop_kernel()  # connection gone: no heartbeats, no player
                        if not self._pause(gap):
                            break
                        self._login()  # back within grace: the same session and node
                    elif not self._idle(gap):
                        continue  # closed by the server; back at the next burst (if the visit goes on)
            self._logout()
            self.rec.presence_s += time.monotonic() - arrived
            if not self._pause(away):
                return


# -- the rig -----------------------------------------------------------------------------------
class Rig:
    """Embedded Valkey + central + worker + M nodes for one mode; every process is reaped."""

    def __init__(self, cfg: PopulationConfig, mode: Mode, log_dir: str | None = None) -> None:
        self.cfg, self.mode = cfg, mode
        self.keys = Keys(PREFIX)
        self.tmp = tempfile.mkdtemp(prefix=f"cloudq-population-{mode.name}-")
        self.server = EmbeddedServer().start()
        self.media: list[EmbeddedServer] = []
        try:
            for _ in range(cfg.media_servers):
                self.media.append(EmbeddedServer().start())
            self.r = redis.Redis.from_url(self.server.url)
            self.group = ProcessGroup(
                self.server.url,
                PREFIX,
                log_dir=log_dir or self.tmp,
                env={
                    "CLOUDQ_WORKSPACE": os.path.join(self.tmp, "workspace"),
                    "CLOUDQ_STORE": os.path.join(self.tmp, "store"),
                },
            )
            mode.settings.publish(self.r, self.keys)
            clocks = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(mode.settings).items()]
            media = [a for m in self.media for a in ("--media-url", m.url)]
            self.central = self.group.start("central", *clocks, *media)
            self.worker = self.group.start("worker", "--host", "bench")
            w, h = cfg.size
            extra = ["--always-encode"] if mode.always_encode else (["--freeze"] if cfg.freeze else [])
            self.nodes = {
                f"n{i + 1}": self.group.start(
                    "node", "--id", f"n{i + 1}", "--host", "bench", "--app", cfg.app,
                    "--size", f"{w}x{h}", "--fps", str(cfg.fps), *extra,
                )
                for i in range(cfg.nodes)
            }  # fmt: skip
            users = Users(self.r, self.keys)
            for i in range(cfg.users):
                users.add(f"u{i + 1}", PASSWORD, cost=4)
            self._wait(lambda: self.r.zcard(self.keys.pool) == cfg.nodes, "every node in the pool")
        except BaseException:
            self.close()
            raise

    def _wait(self, cond: Callable[[], Any], what: str) -> None:
        end = time.monotonic() + STARTUP_TIMEOUT
        while not cond():
            for p in self.group.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"population: {p.args[3:5]} exited with {p.returncode} ({what})")
            if time.monotonic() > end:
                raise RuntimeError(f"population: timed out waiting for {what}")
            time.sleep(0.05)

    def roles(self) -> dict[str, int]:
        """Each server process's pid: ``valkey`` (the control server), ``media:m1``..., ``central``,
        ``worker``, ``node:n1``..."""
        pids = {"valkey": self.server.proc.pid if self.server.proc else 0}
        for i, m in enumerate(self.media):
            pids[f"media:m{i + 1}"] = m.proc.pid if m.proc else 0
        pids["central"] = self.central.pid
        pids["worker"] = self.worker.pid
        for n, p in self.nodes.items():
            pids[f"node:{n}"] = p.pid
        return pids

    def cpu(self) -> dict[str, float]:
        kids = children_map()
        out = {role: tree_cpu(pid, kids) for role, pid in self.roles().items()}
        out["clients"] = cpu_seconds([os.getpid()])
        return out

    def cpu_by_role(self) -> dict[str, float]:
        """CPU-seconds so far of each role, its processes summed (:data:`ROLES`)."""
        return _by_role({k: v for k, v in self.cpu().items() if k != "clients"}, ROLES)

    def server_time(self) -> float:
        sec, usec = self.r.time()
        return sec + usec / 1e6

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.group.stop_all()
        self.server.stop()
        for m in self.media:
            m.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def node_timeline(
    r: redis.Redis, keys: Keys, nodes: list[str], t0: float, t1: float
) -> dict[str, list[tuple[float, float, str]]]:
    """Each node's states as (start, end, state) intervals within [t0, t1], seconds from t0."""
    state = dict.fromkeys(nodes, "free")
    since = dict.fromkeys(nodes, t0)
    out: dict[str, list[tuple[float, float, str]]] = {n: [] for n in nodes}
    for _, f in r.xrange(keys.events):
        obj = f.get(b"obj", b"").decode()
        if not obj.startswith("node:") or obj[5:] not in state:
            continue
        n, t, to = obj[5:], float(f[b"t"]), f[b"to"].decode()
        if t > t1:
            break
        if t > t0 and to != state[n]:
            out[n].append((since[n] - t0, t - t0, state[n]))
            since[n] = t
        elif t <= t0:
            since[n] = t0
        state[n] = to
    for n in nodes:
        out[n].append((since[n] - t0, t1 - t0, state[n]))
    return out


def run_population(
    cfg: PopulationConfig,
    mode: Mode,
    log_dir: str | None = None,
    on_tick: Callable[[Rig, float], None] | None = None,
) -> dict[str, Any]:
    """Run one mode: start the rig, let the users act for ``cfg.duration`` s, measure, clean up.

    ``on_tick(rig, elapsed)`` is called about once a second during the run (a live table)."""
    rig = Rig(cfg, mode, log_dir)
    stop = threading.Event()
    users: list[SimUser] = []
    try:
        plan = Mode.on(cfg.time_scale).settings  # the people's schedule is the same in both modes
        cpu0, w0, m0 = rig.cpu(), rig.server_time(), time.monotonic()
        t_end = m0 + cfg.duration
        users = [
            SimUser(rig.r, rig.keys, f"u{i + 1}", cfg, plan.grace, plan.heartbeat_ttl, t_end, stop)
            for i in range(cfg.users)
        ]
        for u in users:
            u.start()
        while (left := t_end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            if on_tick:
                on_tick(rig, time.monotonic() - m0)
            for role, p in (("central", rig.central), ("worker", rig.worker), *rig.nodes.items()):
                if p.poll() is not None:
                    raise RuntimeError(f"population: {role} exited with {p.returncode} during the run")
        cpu1, w1, m1 = rig.cpu(), rig.server_time(), time.monotonic()
        mem = {n: peak_rss_mib(p.pid) for n, p in rig.nodes.items()}
        stop.set()
        for u in users:
            u.join(15)
        timeline = node_timeline(rig.r, rig.keys, list(rig.nodes), w0, w1)
    finally:
        stop.set()
        rig.close()
    window = m1 - m0
    recs = [u.rec for u in users]
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
    server_cpu = sum(v for k, v in cpu.items() if k != "clients")
    presence_h = sum(r.presence_s for r in recs) / 3600
    waits = [w for r in recs for w in r.waits]
    all_waits = waits + [w for r in recs for w in r.unserved_waits]
    states: Counter[str] = Counter()
    for spans in timeline.values():
        for a, b, st in spans:
            states[st] += b - a
    node_time = sum(states.values()) or float("nan")
    sessions = {s for r in recs for s in r.sessions}
    return {
        "mode": mode.name,
        "always_encode": mode.always_encode,
        "settings": asdict(mode.settings),
        "config": cfg.report(),
        "window_s": window,
        "cpu_s": cpu,
        "cpu_by_role": _by_role(cpu),
        "server_cpu_s": server_cpu,
        "client_cpu_s": cpu["clients"],
        "user_hours": presence_h,
        "server_cpu_per_user_hour": server_cpu / presence_h if presence_h else float("nan"),
        "client_cpu_per_user_hour": cpu["clients"] / presence_h if presence_h else float("nan"),
        "peak_rss_mib": mem,
        "sessions": len(sessions),
        "users_served": sum(1 for r in recs if r.sessions),
        "users_per_node": len(sessions) / cfg.nodes,
        "queue_wait_s": {
            "p50": percentile(all_waits, 50),
            "p95": percentile(all_waits, 95),
            "max": max(all_waits, default=float("nan")),
            "n": len(waits),
            "unserved_at_end": len(all_waits) - len(waits),
        },
        "node_state_share": {k: v / node_time for k, v in sorted(states.items())},
        "sleep_share": states.get("sleeping", 0.0) / node_time,
        "timeline": timeline,
        # input time over the time users wanted the app and had it (presence minus waiting to log in)
        "activity_measured": sum(r.input_s for r in recs)
        / max(1e-9, sum(r.presence_s - r.wait_s for r in recs)),
        "session_hours": sum(r.session_s for r in recs) / 3600,
        "inputs": sum(r.inputs for r in recs),
        "frames_decoded": sum(u.frames for u in users),
        "drops": sum(r.drops for r in recs),
        "reconnects": sum(r.reconnects for r in recs),
        "closed_by_server": dict(sum((r.closed_by_server for r in recs), Counter())),
        "errors": [f"{r.name}: {e}" for r in recs for e in r.errors],
        "users": [
            {
                "name": r.name,
                "sessions": len(r.sessions),
                "waits_s": [round(w, 3) for w in r.waits],
                "presence_s": round(r.presence_s, 3),
                "drops": r.drops,
                "reconnects": r.reconnects,
            }
            for r in recs
        ],
    }


def _by_role(cpu: dict[str, float], roles: tuple[str, ...] = (*ROLES, "clients")) -> dict[str, float]:
    out: Counter[str] = Counter()
    for k, v in cpu.items():
        out[k.split(":")[0]] += v
    return {k: out[k] for k in roles}
