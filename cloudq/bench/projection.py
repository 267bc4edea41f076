"""``cloudq bench cost``'s second table: the per-user-hour server CPU of a pool of 100 nodes at
real (unscaled) event rates, projected from costs measured in the same invocation.

The measured run has to scale human times down (``time_scale``), so per-event costs (a login, a
sleep with its save, a close) come ``time_scale`` times more often per hour than with real people,
while encoding costs the same per second. The projection puts each measured cost at its real rate:

- **events per user-hour** from the population's habits with the real clocks (idle timeout 30 s,
  grace 120 s, idle close 15 min): logins and closes per visit, a sleep (and a wake) per gap longer
  than the idle timeout, a sleep per dropped connection, an idle close (and a new login) per long
  break longer than the idle close; each times its control-plane CPU and, apart, the node's
  (:mod:`cloudq.bench.events`: a login counts the program's start);
- **node-seconds per user-hour** in each state (drawing, awake without input, asleep) times the
  node's CPU in that state (:mod:`cloudq.bench.nodecost`);
- the **media traffic** in each state: Valkey's CPU in that state above its CPU with the node free
  (frames written and read, input, heartbeats), times the same node-seconds;
- the control plane's **idle rate** (measured with one node) shared by the pool's 100 users.

``control_plane_share`` counts the events and the idle rate; ``valkey_central_worker_share`` adds
the media traffic (the issue's definition for the measured run, where one Valkey carries both).

A user-hour is an hour of a user's presence (login → logout), as in the measured run. The habits'
distributions are used as they are defined (exponential gaps and visits, uniform long breaks).
"""

from __future__ import annotations

import math
from typing import Any

from cloudq.bench.population import Habits

POOL = 100
IDLE_TIMEOUT, GRACE, IDLE_CLOSE, HB_TTL = 30.0, 120.0, 900.0, 3.0  # the real clocks (defaults)


def rates(h: Habits) -> dict[str, float]:
    """Events per user-hour and node-seconds per state per user-hour, method on and off."""
    drop_s = HB_TTL + 0.45 * GRACE  # how long a dropped client stays away (as the population)
    gap = h.mean_gap(drop_s)
    burst = gap * h.activity / (1 - h.activity)
    cycles = 3600 / (burst + gap)  # burst + gap pairs per presence-hour
    visit = h.min_visit + h.visit * math.exp(-h.min_visit / h.visit)  # E[max(min_visit, Exp(visit))]
    visits = 3600 / visit
    p_idle = 1 - h.p_break - h.p_drop
    lo, hi = h.long_break
    p_closing_break = max(0.0, min(1.0, (hi - max(lo, IDLE_CLOSE)) / (hi - lo)))  # a break past idle close
    idle_sleeps = cycles * p_idle * math.exp(-IDLE_TIMEOUT / h.idle_gap)
    break_sleeps = cycles * h.p_break
    drop_sleeps = cycles * h.p_drop
    idle_closes = cycles * h.p_break * p_closing_break
    sleeps = idle_sleeps + break_sleeps + drop_sleeps
    # awake without input after each burst: until the idle clock runs out or the gap ends
    awake_idle = cycles * (
        p_idle * h.idle_gap * (1 - math.exp(-IDLE_TIMEOUT / h.idle_gap))
        + h.p_break * IDLE_TIMEOUT
        + h.p_drop * HB_TTL
    )
    drawing = 3600 * h.activity
    # a long break past the idle close frees the node: that time costs no node
    freed = idle_closes * ((hi - max(lo, IDLE_CLOSE)) / 2)
    asleep = max(0.0, 3600 - drawing - awake_idle - freed)
    return {
        "on": {
            "login": visits + idle_closes + drop_sleeps,  # a dropped client logs in again (same session)
            "close": visits + idle_closes,
            "sleep (saved)": sleeps,
            "wake": sleeps - idle_closes,
            "drawing_s": drawing,
            "awake idle_s": awake_idle,
            "asleep_s": asleep,
        },
        "off": {
            "login": visits + drop_sleeps,
            "close": visits,
            "drawing_s": drawing,
            "awake idle_s": 3600 - drawing,  # always encoding, never asleep, never closed for idleness
        },
    }


def _servers(cpu: dict[str, float]) -> float:
    """Valkey's CPU in one state: the control server's and the media servers' (% of a core)."""
    return cpu.get("valkey", 0.0) + cpu.get("media", 0.0)


def project(h: Habits, events: dict[str, Any], states: dict[str, Any]) -> dict[str, Any]:
    """Per user-hour server CPU-seconds, on and off, component by component."""
    r = rates(h)
    idle_share = events["idle_ms_per_s"] / 1000 * 3600 / POOL  # CPU-s per user-hour
    out: dict[str, Any] = {"rates": r, "pool": POOL, "rows": {}, "total": {}}
    for mode in ("on", "off"):
        rows = {}
        for ev in ("login", "sleep (saved)", "wake", "close"):
            if ev in r[mode]:
                n, ms = r[mode][ev], events["ms"][ev]
                rows[f"{ev}: {n:.2f}/h x {ms:.1f} ms"] = n * ms / 1000
                node_ms = events.get("role_ms", {}).get(ev, {}).get("node")
                if node_ms is not None:
                    rows[f"node {ev}: {n:.2f}/h x {node_ms:.1f} ms"] = n * node_ms / 1000
        free_valkey = _servers(states[mode]["free"])
        for st in ("drawing", "awake idle", "asleep"):
            if f"{st}_s" in r[mode]:
                secs, pct = r[mode][f"{st}_s"], states[mode][st]["node"]
                rows[f"node {st}: {secs:.0f} s/h x {pct:.2f} %"] = secs * pct / 100
                media = max(0.0, _servers(states[mode][st]) - free_valkey)
                rows[f"media {st} (Valkey): {secs:.0f} s/h x {media:.2f} %"] = secs * media / 100
        rows[f"control plane idle, shared by {POOL} users"] = idle_share
        out["rows"][mode] = rows
        out["total"][mode] = sum(rows.values())
        out[f"control_{mode}"] = sum(v for k, v in rows.items() if not k.startswith(("node ", "media ")))
        out[f"media_{mode}"] = sum(v for k, v in rows.items() if k.startswith("media "))
    on, off = out["total"]["on"], out["total"]["off"]
    out["cpu_ratio"] = off / on if on else math.nan
    out["control_plane_share"] = out["control_on"] / on if on else math.nan
    out["valkey_central_worker_share"] = (out["control_on"] + out["media_on"]) / on if on else math.nan
    return out


def table(p: dict[str, Any]) -> str:
    lines = [
        f"| projected, {p['pool']} nodes, real event rates | CPU-s per user-hour |",
        "|---|---:|",
    ]
    for mode, label in (("on", "method on"), ("off", "method off")):
        for k, v in p["rows"][mode].items():
            lines.append(f"| {label}: {k} | {v:.2f} |")
        lines.append(f"| **{label}: total** | **{p['total'][mode]:.1f}** |")
    lines.append(f"| **off / on** | **{p['cpu_ratio']:.2f}x** |")
    lines.append(f"| control plane share with the method | {100 * p['control_plane_share']:.1f} % |")
    if "valkey_central_worker_share" in p:
        lines.append(
            "| Valkey + central + worker share with the method (media traffic included) "
            f"| {100 * p['valkey_central_worker_share']:.1f} % |"
        )
    return "\n".join(lines)
