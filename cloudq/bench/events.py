"""What each session event costs the control plane (Valkey + central server + RQ worker), measured
one event at a time on the rig ``cloudq bench cost`` uses, for the projection at real event rates
(:mod:`cloudq.bench.projection`).

One embedded Valkey, central server, worker and one node (the population's app); one user with the
real client (launcher + kernel). First the control plane's idle rate (no session) is measured;
then, ``repeats`` times, each event alone, with the CPU of every control-plane process read from
``/proc`` just before and just after it, minus the idle rate over its duration:

- **login**: login request → the first decoded frame, and :data:`SETTLE` s more (bcrypt check at
  the population's cost 4, the session user, the mount job, the node's activation, the program's
  start);
- **sleep**: the user's idle clock runs out after a stroke → the node asleep and its sleep save
  recorded (the sweep, the sleep command, the save job: the node flushes, the store writes);
- **wake**: a stroke on the sleeping node → the node active again (``wake.lua``);
- **close**: logout → the session closed (the close job: the node stops, the final save, the
  release); the user had drawn since the sleep save, so it writes a version.

A save alone is what a sleep costs above one whose save finds nothing new: both are measured (the
second sleep of each repeat follows only the wake's pointer move, so the store finds the content
unchanged and writes no version).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from rq.registry import StartedJobRegistry

from cloudq.bench.population import CONTROL, PASSWORD, PopulationConfig, Rig, strokes
from cloudq.bench.population import Mode as PopulationMode
from cloudq.client.kernel import Kernel
from cloudq.client.launcher import Launcher
from cloudq.client.sinks import CallbackSink
from cloudq.jobs import queue_for
from cloudq.percentile import percentile

ROLES = (*CONTROL, "media", "node")
"""The node's and the media servers' CPU per event are measured too (a login starts the app, a
close saves its state, both send frames); they are not control plane, and the projection counts
the node's apart."""
EVENTS = ("login", "sleep (saved)", "sleep (unchanged)", "wake", "close")
IDLE_TIMEOUT = 1.5
SETTLE = 2.0
"""A login is measured until this long after the first frame: a program (and its sound server)
is still starting then; so is the node's awake-idle state in :mod:`cloudq.bench.nodecost`."""
TIMEOUT = 30.0


def _wait(cond: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> None:
    """Wait for a condition of this process (no server round trip in it: it is polled)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"bench events: timed out waiting for {what}")
        time.sleep(0.01)


def _jobs_done(rig: Rig) -> Callable[[], bool]:
    """Whether the worker has finished every job of the rig's host (its queue empty, none started):
    a save or a close job goes on after the event the bench waits for (its bookkeeping, a close's
    stream release and unmount), and that is part of the event's cost. Polled every 10 ms as one
    round trip of two plain reads (``StartedJobRegistry.count`` would run RQ's registry cleanup,
    a script, on every poll: load on the server being measured)."""
    queue = queue_for(rig.r, rig.keys, "bench")
    started = StartedJobRegistry(queue=queue)

    def done() -> bool:
        pipe = rig.r.pipeline(transaction=False)
        pipe.llen(queue.key)
        pipe.zcard(started.key)
        return not any(pipe.execute())

    return done


class EventWatch:
    """Waits for state changes by blocking on the events stream, one read per entry that comes.

    The bench must not load the server it measures: polling a hash every 10 ms for the second a
    sleep takes cost the server more than the sleep itself (each command a wake-up of its loop)."""

    def __init__(self, r: Any, stream: str) -> None:
        self.r, self.stream = r, stream
        last = r.xrevrange(stream, count=1)
        self.last = last[0][0] if last else b"0-0"

    def until(self, obj: str, to: Iterable[str], what: str, timeout: float = TIMEOUT) -> None:
        """Block until an event of ``obj`` going ``to`` one of ``to`` comes after the last one seen."""
        want, end = {t.encode() for t in to}, time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            got = self.r.xread({self.stream: self.last}, count=100, block=max(1, int(min(left, 1.0) * 1000)))
            for _, entries in got or ():
                for eid, f in entries:
                    self.last = eid
                    if f.get(b"obj") == obj.encode() and f.get(b"to") in want:
                        return
        raise RuntimeError(f"bench events: timed out waiting for {what}")


def measure(cfg: PopulationConfig, repeats: int = 6) -> dict[str, Any]:
    """Control-plane CPU per event (ms: median and all samples; the median of each role apart), and
    the idle rate (ms/s)."""
    base = PopulationMode.on(cfg.time_scale)
    settings = replace(base.settings, idle_timeout=IDLE_TIMEOUT, idle_close=0.0, grace=30.0, autosave=0.0)
    rig = Rig(replace(cfg, users=1, nodes=1), PopulationMode("on", settings, False))
    watch, jobs_done = EventWatch(rig.r, rig.keys.events), _jobs_done(rig)
    samples: dict[str, list[float]] = {e: [] for e in EVENTS}
    by_role: dict[str, dict[str, list[float]]] = {e: {r: [] for r in ROLES} for e in EVENTS}

    def cpu() -> dict[str, float]:
        return rig.cpu_by_role()

    try:
        c0, t0 = cpu(), time.monotonic()
        time.sleep(3.0)
        dt0 = time.monotonic() - t0
        idle = {r: (v - c0[r]) / dt0 for r, v in cpu().items()}
        idle_rate = sum(idle[r] for r in CONTROL)

        def timed(event: str, fn: Callable[[], None]) -> None:
            c, t = cpu(), time.monotonic()
            fn()
            dt, after = time.monotonic() - t, cpu()
            for r in ROLES:
                by_role[event][r].append(max(0.0, (after[r] - c[r] - idle[r] * dt) * 1000))
            control = sum(after[r] - c[r] for r in CONTROL)
            samples[event].append(max(0.0, (control - idle_rate * dt) * 1000))

        pen = random.Random(f"{cfg.seed}:events")
        for _ in range(repeats):
            launcher = Launcher(rig.r, rig.keys)
            frames = [0]
            state: dict[str, Any] = {}

            def login(
                launcher: Launcher = launcher, frames: list[int] = frames, state: dict[str, Any] = state
            ) -> None:
                t = state["ticket"] = launcher.login("u1", PASSWORD, wait=TIMEOUT)
                state["kernel"] = Kernel(
                    rig.r, rig.keys, t.sid, launcher.settings,
                    [CallbackSink(lambda *_: frames.__setitem__(0, frames[0] + 1))],
                    on_input=lambda: launcher.mark_activity(t.sid), media=launcher.media(t.sid),
                ).start()  # fmt: skip
                _wait(lambda: frames[0] > 0, "the first frame")
                time.sleep(SETTLE)  # the program's start goes on after its first picture

            timed("login", login)
            kernel, sid = state["kernel"], state["ticket"].sid
            try:

                def draw(k: Kernel = kernel) -> None:
                    strokes(k.pump.put, cfg.size, pen, 0.5, cfg.habits.input_hz, _never())

                for event in ("sleep (saved)", "sleep (unchanged)"):
                    if event == "sleep (saved)":
                        draw()

                    def sleep(sid: str = sid) -> None:
                        # the node goes to sleep first, then its save is recorded; the wake's
                        # pointer move counts as input: the second save runs too, and the store
                        # finds the content unchanged (an "unchanged" event, no version)
                        watch.until(f"session:{sid}", ("saved", "unchanged"), "the sleep save recorded")
                        _wait(jobs_done, "the save job finished")

                    timed(event, sleep)

                    def wake(k: Kernel = kernel) -> None:
                        k.pump.put("mouse_move", x=5, y=5)
                        watch.until("node:n1", ("active",), "the node awake")

                    timed("wake", wake)
                draw()

                def close(launcher: Launcher = launcher, t: Any = state["ticket"]) -> None:
                    launcher.logout(t.token)
                    # the release frees the node and closes the session in one script
                    watch.until("node:n1", ("free",), "the node free")
                    _wait(jobs_done, "the close job finished")

                timed("close", close)
            finally:
                kernel.close()
    finally:
        rig.close()
    return {
        "idle_ms_per_s": idle_rate * 1000,
        "ms": {e: percentile(v, 50) for e, v in samples.items()},
        "role_ms": {e: {r: percentile(v, 50) for r, v in roles.items()} for e, roles in by_role.items()},
        "samples_ms": samples,
        "repeats": repeats,
    }


class _never:
    """A stop event that is never set (``strokes`` wants one)."""

    def is_set(self) -> bool:
        return False

    def wait(self, t: float) -> bool:
        time.sleep(t)
        return False
