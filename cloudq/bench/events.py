"""What each session event costs the control plane (Valkey + central server + RQ worker), measured
one event at a time on the rig ``cloudq bench cost`` uses, for the projection at real event rates
(:mod:`cloudq.bench.projection`).

One embedded Valkey, central server, worker and one node (the population's app); one user with the
real client (launcher + kernel). First the control plane's idle rate (no session) is measured;
then, ``repeats`` times, each event alone, with the CPU of every control-plane process read from
``/proc`` just before and just after it, minus the idle rate over its duration:

- **login**: login request → the first decoded frame (bcrypt check at the population's cost 4, the
  session user, the mount job, the node's activation);
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
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cloudq.bench.population import PASSWORD, PopulationConfig, Rig, strokes
from cloudq.bench.population import Mode as PopulationMode
from cloudq.client.kernel import Kernel
from cloudq.client.launcher import Launcher
from cloudq.client.sinks import CallbackSink
from cloudq.percentile import percentile
from cloudq.procstat import children_map, tree_cpu

CONTROL = ("valkey", "central", "worker")
EVENTS = ("login", "sleep (saved)", "sleep (unchanged)", "wake", "close")
IDLE_TIMEOUT = 1.5
TIMEOUT = 30.0


def _wait(cond: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"bench events: timed out waiting for {what}")
        time.sleep(0.01)


def measure(cfg: PopulationConfig, repeats: int = 6) -> dict[str, Any]:
    """Control-plane CPU per event (ms: median and all samples), and the idle rate (ms/s)."""
    base = PopulationMode.on(cfg.time_scale)
    settings = replace(base.settings, idle_timeout=IDLE_TIMEOUT, idle_close=0.0, grace=30.0, autosave=0.0)
    rig = Rig(replace(cfg, users=1, nodes=1), PopulationMode("on", settings, False))
    samples: dict[str, list[float]] = {e: [] for e in EVENTS}
    node = rig.keys.node("n1")

    def cpu() -> float:
        kids = children_map()
        roles = rig.roles()
        return sum(tree_cpu(roles[r], kids) for r in CONTROL)

    try:
        c0, t0 = cpu(), time.monotonic()
        time.sleep(3.0)
        idle_rate = (cpu() - c0) / (time.monotonic() - t0)

        def timed(event: str, fn: Callable[[], None]) -> None:
            c, t = cpu(), time.monotonic()
            fn()
            dt = time.monotonic() - t
            samples[event].append(max(0.0, (cpu() - c - idle_rate * dt) * 1000))

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
                    on_input=lambda: launcher.mark_activity(t.sid),
                ).start()  # fmt: skip
                _wait(lambda: frames[0] > 0, "the first frame")

            timed("login", login)
            kernel, sid = state["kernel"], state["ticket"].sid
            try:

                def draw(k: Kernel = kernel) -> None:
                    strokes(k.pump.put, cfg.size, pen, 0.5, cfg.habits.input_hz, _never())

                def saved_count(sid: str = sid) -> int:
                    return sum(
                        1
                        for _, f in rig.r.xrange(rig.keys.events)
                        if f[b"obj"] == f"session:{sid}".encode() and f[b"to"] in (b"saved", b"unchanged")
                    )

                for event in ("sleep (saved)", "sleep (unchanged)"):
                    if event == "sleep (saved)":
                        draw()
                    n = saved_count()

                    def sleep(n: int = n) -> None:
                        _wait(lambda: rig.r.hget(node, "state") == b"sleeping", "the node asleep")
                        # the wake's pointer move counts as input: the second save runs too, and
                        # the store finds the content unchanged (an "unchanged" event, no version)
                        _wait(lambda: saved_count() > n, "the sleep save recorded")

                    timed(event, sleep)

                    def wake(k: Kernel = kernel) -> None:
                        k.pump.put("mouse_move", x=5, y=5)
                        _wait(lambda: rig.r.hget(node, "state") == b"active", "the node awake")

                    timed("wake", wake)
                draw()

                def close(launcher: Launcher = launcher, t: Any = state["ticket"]) -> None:
                    launcher.logout(t.token)
                    _wait(lambda: rig.r.hget(rig.keys.session(t.sid), "state") == b"closed", "the close")
                    _wait(lambda: rig.r.hget(node, "state") == b"free", "the node free")

                timed("close", close)
            finally:
                kernel.close()
    finally:
        rig.close()
    return {
        "idle_ms_per_s": idle_rate * 1000,
        "ms": {e: percentile(v, 50) for e, v in samples.items()},
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
