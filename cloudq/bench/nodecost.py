"""What one node costs in each state, measured on the rig ``cloudq bench cost`` uses: the per-state
figures that explain the population's CPU ratio.

One embedded Valkey, central server, worker and one node per mode; one user (the real client:
launcher + kernel) walks the node through its states, each held for ``seconds`` while the CPU of
every process is read from ``/proc``:

- method on: ``free`` (no session), ``awake idle`` (a session, no input: paint encodes nothing;
  from ``SETTLE`` s after the first frame, once the program has started),
  ``drawing`` (mouse strokes at the population's input rate), ``asleep`` (the user's idle clock ran
  out);
- method off (``--always-encode``): ``free``, ``awake idle`` (every tick encoded, unchanged canvas),
  ``drawing``.

From these, :func:`ceiling` gives the best CPU ratio the method could reach at an activity ``a``
if everything but drawing cost nothing with it on: ``(a*D_off + (1-a)*S_off) / (a*D_on)``, and
:func:`break_even` the activity at which that ceiling is a given ratio.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cloudq.bench.events import SETTLE
from cloudq.bench.population import PASSWORD, PopulationConfig, Rig, strokes
from cloudq.bench.population import Mode as PopulationMode
from cloudq.client.kernel import Kernel
from cloudq.client.launcher import Launcher
from cloudq.client.sinks import CallbackSink

STATE_TIMEOUT = 30.0
IDLE_MARGIN = 1.5
"""With the method on, the idle clock is this much longer than the longer of ``SETTLE`` and a
state's window: the node stays awake through each, and sleeps this soon after the drawing."""


def _wait(cond: Callable[[], bool], what: str, timeout: float = STATE_TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"node cost: timed out waiting for {what}")
        time.sleep(0.05)


def measure_mode(cfg: PopulationConfig, on: bool, seconds: float = 5.0) -> dict[str, dict[str, float]]:
    """CPU (% of one core) of every server role in each state of one node, for one mode."""
    base = PopulationMode.on(cfg.time_scale) if on else PopulationMode.off()
    # on: the idle clock outlasts the settling and the awake-idle window (activity is marked at the
    # start of each), then puts the node to sleep soon after the drawing stops; nothing closes
    idle = max(SETTLE, seconds) + IDLE_MARGIN
    settings = replace(base.settings, idle_timeout=idle, idle_close=0.0) if on else base.settings
    mode = PopulationMode(base.name, settings, base.always_encode)
    rig = Rig(replace(cfg, users=1, nodes=1), mode)
    out: dict[str, dict[str, float]] = {}

    def hold(state: str, action: Callable[[threading.Event], None] | None = None) -> None:
        c0 = rig.cpu_by_role()
        t0, stop = time.monotonic(), threading.Event()
        th = threading.Thread(target=action, args=(stop,), daemon=True) if action else None
        if th:
            th.start()
        time.sleep(seconds)
        stop.set()
        if th:
            th.join(5)
        dt = time.monotonic() - t0
        c1 = rig.cpu_by_role()
        out[state] = {role: 100 * (c1[role] - c0[role]) / dt for role in c0}

    try:
        hold("free")
        launcher = Launcher(rig.r, rig.keys)
        ticket = launcher.login("u1", PASSWORD, wait=STATE_TIMEOUT)
        frames = [0]
        kernel = Kernel(
            rig.r,
            rig.keys,
            ticket.sid,
            launcher.settings,
            [CallbackSink(lambda *_: frames.__setitem__(0, frames[0] + 1))],
            on_input=lambda: launcher.mark_activity(ticket.sid),
            media=launcher.media(ticket.sid),
        ).start()
        try:
            _wait(lambda: frames[0] > 0, "the first frame")
            time.sleep(SETTLE)  # a program's start is the login's cost (bench events), not idling
            launcher.mark_activity(ticket.sid)  # the idle clock runs from here, not from the login
            hold("awake idle")
            pen = random.Random(f"{cfg.seed}:calibration")
            hold(
                "drawing",
                lambda stop: strokes(kernel.pump.put, cfg.size, pen, seconds, cfg.habits.input_hz, stop),
            )
            if on:
                node = rig.keys.node("n1")
                _wait(lambda: rig.r.hget(node, "state") == b"sleeping", "the node to sleep")
                hold("asleep")
        finally:
            kernel.close()
            launcher.logout(ticket.token)
    finally:
        rig.close()
    return out


def measure(cfg: PopulationConfig, seconds: float = 5.0) -> dict[str, Any]:
    """Both modes: ``{"on": {state: {role: %}}, "off": {...}, "seconds": s}``."""
    return {
        "on": measure_mode(cfg, True, seconds),
        "off": measure_mode(cfg, False, seconds),
        "seconds": seconds,
    }


def _node(x: dict[str, Any], mode: str, state: str) -> float:
    return float(x[mode][state]["node"])


def ceiling(x: dict[str, Any], activity: float) -> float:
    """The CPU ratio off / on at ``activity`` if, with the method on, only drawing cost anything."""
    d_on, d_off, s_off = _node(x, "on", "drawing"), _node(x, "off", "drawing"), _node(x, "off", "awake idle")
    a = activity
    return (a * d_off + (1 - a) * s_off) / (a * d_on) if a > 0 and d_on > 0 else float("nan")


def break_even(x: dict[str, Any], ratio: float) -> float:
    """The activity at which :func:`ceiling` equals ``ratio`` (above it, ``ratio`` is out of reach)."""
    d_on, d_off, s_off = _node(x, "on", "drawing"), _node(x, "off", "drawing"), _node(x, "off", "awake idle")
    den = ratio * d_on - d_off + s_off
    return s_off / den if den > 0 else float("nan")


def table(x: dict[str, Any]) -> str:
    roles = ("node", "media", "valkey", "central", "worker")
    lines = [
        "| one node's state (held " + f"{x['seconds']:g} s) | " + " | ".join(roles) + " |",
        "|---|" + "---:|" * len(roles),
    ]
    for mode, label in (("on", "method on"), ("off", "method off (`--always-encode`)")):
        for state, cpu in x[mode].items():
            lines.append(f"| {label}: {state} | " + " | ".join(f"{cpu[r]:.2f}" for r in roles) + " |")
    return "\n".join(lines)
