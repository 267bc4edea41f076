"""``cloudq bench cost``: what the management method saves, measured on a simulated population.

The same population (:mod:`cloudq.bench.population`: U users, same seed, same habits) runs twice
in one invocation against M real nodes, each run with its own embedded Valkey, central server,
worker and nodes:

- **on** (the method): nodes encode only frames that changed (plus keyframes), converting only the
  rows the app's damage covers; a node sleeps when
  its user gives no input for ``idle_timeout`` or its client's heartbeat lapses; a dropped client
  has a reconnect grace; an idle session closes after ``idle_close`` (saving the user's data) and
  its node goes to the next user in the queue. Human clocks scaled by ``time_scale``.
- **off** (no method): the same app on nodes started with ``--always-encode`` (every frame tick
  is converted and encoded in full, as a conventional streamer does), and clocks that never sleep or close a session:
  no heartbeat deadline, no idle timeout, no grace, no idle close. A session ends when its user
  logs out.

Figures: CPU seconds per user-hour (server side: Valkey + central + worker with its work horses +
nodes; the client side apart), ``cpu_ratio`` = off / on of the server side, peak memory per
node, users served per node (distinct sessions / M), queue wait p50/p95 (login request -> node
assigned, as the clients saw it), share of node-time asleep.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from cloudq.bench import events, nodecost, projection
from cloudq.bench.population import CONTROL, ROLES, Habits, Mode, PopulationConfig, run_population
from cloudq.bench.report import machine, write_section

log = logging.getLogger(__name__)

SECTION = "What the method saves: CPU per user-hour"
DEFAULT_SIZE = (1280, 720)
"""The picture ``bench cost`` measures by default: a node's own default (``cloudq node --size``)."""
PLOT = "docs/bench-cost.png"
STATE_COLOURS = {
    "active": "#d62728",
    "sleeping": "#1f77b4",
    "free": "#dddddd",
    "assigned": "#ff7f0e",
    "closing": "#9467bd",
    "offline": "#000000",
}


def run(cfg: PopulationConfig, state_seconds: float = 15.0, event_repeats: int = 6) -> dict[str, Any]:
    """Both modes, method on first, then one node's cost in each state (``state_seconds`` each,
    0 = skip) and the control plane's per event (``event_repeats`` of each, 0 = skip), and from
    those the projection at real event rates; the result holds all of it and the headline figures."""
    on = run_population(cfg, Mode.on(cfg.time_scale))
    off = run_population(cfg, Mode.off())
    states = nodecost.measure(cfg, state_seconds) if state_seconds > 0 else None
    per_event = events.measure(cfg, event_repeats) if event_repeats > 0 else None
    return result_of(cfg, on, off, states, per_event)


def result_of(
    cfg: PopulationConfig,
    on: dict[str, Any],
    off: dict[str, Any],
    states: dict[str, Any] | None = None,
    per_event: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The headline figures, targets and tables of the two runs (and, if measured, the per-state
    and per-event figures with the projection)."""
    ratio = (
        off["server_cpu_per_user_hour"] / on["server_cpu_per_user_hour"]
        if on["server_cpu_per_user_hour"]
        else float("nan")
    )
    target = 4.0 if cfg.app.startswith("x11:") else 3.0  # a real program: its frozen sleep saves more
    result: dict[str, Any] = {
        "cpu_ratio": ratio,
        "users_per_node": on["users_per_node"],
        "queue_wait_p95_s": on["queue_wait_s"]["p95"],
        "control_plane_share": _control_share(on),
        "media_share": _share(on, ("media",)),
        "valkey_central_worker_share": _share(on, (*CONTROL, "media")),
        "client_cpu_ratio": (
            off["client_cpu_per_user_hour"] / on["client_cpu_per_user_hour"]
            if on["client_cpu_per_user_hour"]
            else float("nan")
        ),
        "targets": {
            "cpu_ratio_min": target,
            "users_per_node_min": 2.5,
            "queue_wait_p95_max_s": 10.0,
            "control_plane_share_max": 0.15,
        },
        "machine": machine(),
        "on": on,
        "off": off,
        "node_states": states,
        # the best ratio the method could reach at this activity if only drawing cost anything
        "cpu_ratio_ceiling": nodecost.ceiling(states, on["activity_measured"]) if states else None,
        "activity_for_3x": nodecost.break_even(states, 3.0) if states else None,
        "events": per_event,
        "projection": projection.project(cfg.habits, per_event, states) if states and per_event else None,
    }
    result["targets_met"] = {
        "cpu_ratio": ratio >= target,
        "users_per_node": on["users_per_node"] >= 2.5,
        "queue_wait_p95": on["queue_wait_s"]["p95"] <= 10.0,
        "control_plane_share": _control_share(on) <= 0.15,
    }
    result["table"] = table(result)
    if result["projection"]:
        result["table"] += "\n\n" + events_table(per_event) + "\n\n" + projection.table(result["projection"])
    return result


def events_table(ev: dict[str, Any]) -> str:
    """The control plane's CPU per session event (medians of the repeats)."""
    roles = ev.get("role_ms", {})

    def split(e: str) -> str:
        return " | ".join(f"{roles[e][r]:.1f}" if r in roles.get(e, {}) else "—" for r in events.ROLES)

    lines = [
        "| session event (one at a time) | control plane CPU (Valkey + central + worker), median "
        "| valkey | central | worker | media server (not control plane) | node (not control plane) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {e} | {ms:.1f} ms | {split(e)} |" for e, ms in ev["ms"].items()),
        f"| idle, no session (per second) | {ev['idle_ms_per_s']:.1f} ms | — | — | — | — | — |",
    ]
    return "\n".join(lines)


def _f(x: float, fmt: str = ".1f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def table(x: dict[str, Any]) -> str:
    on, off = x["on"], x["off"]

    def row(name: str, get: Any, fmt: str = ".1f", ratio: bool = False) -> str:
        a, b = get(on), get(off)
        r = _f(b / a, ".2f") + "x" if ratio and a else ""
        return f"| {name} | {_f(a, fmt)} | {_f(b, fmt)} | {r} |"

    label = {
        "valkey": "Valkey (the control server)",
        "worker": "worker (work horses included)",
        "media": "media servers (the sessions' streams; not control plane)",
    }
    lines = [
        "| per run (same users, same seed) | method on | method off | off / on |",
        "|---|---:|---:|---:|",
        row("**server CPU-seconds per user-hour**", lambda m: m["server_cpu_per_user_hour"], ratio=True),
        *[
            row(
                f"… of which {label.get(role, role)}",
                lambda m, role=role: m["cpu_by_role"].get(role, 0.0) / m["user_hours"] if m["user_hours"] else math.nan,
                ratio=True,
            )
            for role in ROLES
        ],
        row("control plane (Valkey + central + worker), % of server CPU",
            lambda m: 100 * _control_share(m), ".1f"),
        row("client CPU-seconds per user-hour (all simulated clients, one process)",
            lambda m: m["client_cpu_per_user_hour"], ratio=True),
        row("server CPU seconds in the window", lambda m: m["server_cpu_s"]),
        row("user-hours (presence, login → logout)", lambda m: m["user_hours"], ".4f"),
        row("measured activity, % (input time / presence without login waits)", lambda m: 100 * m["activity_measured"], ".0f"),
        row("peak memory per node, MiB (max VmHWM)", lambda m: max(m["peak_rss_mib"].values())),
        row("sessions served", lambda m: m["sessions"], ".0f"),
        row("**users served per node** (sessions / nodes)", lambda m: m["users_per_node"], ".2f"),
        row("queue wait p50, s", lambda m: m["queue_wait_s"]["p50"], ".2f"),
        row("**queue wait p95, s**", lambda m: m["queue_wait_s"]["p95"], ".2f"),
        row("queue wait max, s", lambda m: m["queue_wait_s"]["max"], ".2f"),
        row("still queued at the end", lambda m: m["queue_wait_s"]["unserved_at_end"], ".0f"),
        row("share of node-time asleep, %", lambda m: 100 * m["sleep_share"], ".0f"),
        row("share of node-time active, %", lambda m: 100 * m["node_state_share"].get("active", 0.0), ".0f"),
        row("frames decoded by the clients", lambda m: m["frames_decoded"], ".0f"),
        row("dropped connections / reconnections", lambda m: m["drops"], ".0f"),
    ]  # fmt: skip
    return "\n".join(lines)


def plot(x: dict[str, Any], path: str | Path) -> Path:
    """CPU per user-hour by role (on vs off) and both runs' node-state timelines, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    on, off = x["on"], x["off"]
    fig = plt.figure(figsize=(10, 6.5), dpi=100)
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 2.2])
    ax = fig.add_subplot(grid[:, 0])
    roles = ("node", "media", "valkey", "worker", "central")
    colours = ("#d62728", "#ff9896", "#2ca02c", "#9467bd", "#8c564b")
    for i, m in enumerate((on, off)):
        bottom = 0.0
        for role, c in zip(roles, colours, strict=True):
            v = m["cpu_by_role"].get(role, 0.0) / m["user_hours"] if m["user_hours"] else 0.0
            ax.bar(i, v, bottom=bottom, color=c, label=role if i == 0 else None)
            bottom += v
        ax.text(i, bottom, f"{bottom:.0f}", ha="center", va="bottom")
    ax.set_xticks([0, 1], ["method on", "method off"])
    ax.set_ylabel("server CPU-seconds per user-hour")
    ax.set_title(f"{x['cpu_ratio']:.1f}x less CPU with the method")
    ax.legend(loc="upper left", fontsize=8)
    for row, m in enumerate((on, off)):
        axt = fig.add_subplot(grid[row, 1])
        nodes = sorted(m["timeline"])
        for y, n in enumerate(nodes):
            for a, b, st in m["timeline"][n]:
                axt.broken_barh([(a, b - a)], (y - 0.4, 0.8), color=STATE_COLOURS.get(st, "#7f7f7f"))
        axt.set_yticks(range(len(nodes)), nodes)
        axt.set_xlim(0, m["window_s"])
        axt.set_title(
            f"method {m['mode']}: node states ({100 * m['sleep_share']:.0f}% asleep, "
            f"{m['sessions']} sessions)",
            fontsize=10,
        )
        if row == 1:
            axt.set_xlabel("seconds into the run")
    fig.legend(
        handles=[Patch(color=c, label=s) for s, c in STATE_COLOURS.items() if s != "offline"],
        loc="lower right",
        ncol=5,
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p


def by_activity(results: list[dict[str, Any]]) -> str:
    """Several invocations' headline figures side by side, one row per activity."""
    lines = [
        "| activity (measured) | server CPU off / on | nodes alone off / on | ceiling (drawing only) "
        "| Valkey + central + worker, share of server CPU with the method | node-time asleep |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for x in results:
        on = x["on"]
        node = _role_ratio(x, "node")
        lines.append(
            f"| {100 * on['activity_measured']:.0f} % | {_f(x['cpu_ratio'], '.2f')}x | {_f(node, '.2f')}x "
            f"| {_f(x.get('cpu_ratio_ceiling') or math.nan, '.2f')}x | {100 * _control_share(on):.0f} % "
            f"| {100 * on['sleep_share']:.0f} % |"
        )
    return "\n".join(lines)


def _role_ratio(x: dict[str, Any], role: str) -> float:
    on, off = x["on"], x["off"]
    if not (on["cpu_by_role"][role] and on["user_hours"] and off["user_hours"]):
        return math.nan
    return (off["cpu_by_role"][role] / off["user_hours"]) / (on["cpu_by_role"][role] / on["user_hours"])


def _share(m: dict[str, Any], roles: tuple[str, ...]) -> float:
    """The share of a run's server CPU that ``roles`` took."""
    r = m["cpu_by_role"]
    return sum(r.get(k, 0.0) for k in roles) / m["server_cpu_s"] if m["server_cpu_s"] else math.nan


def _control_share(m: dict[str, Any]) -> float:
    """The control plane's share (Valkey, the control server + central + worker)."""
    return _share(m, CONTROL)


def write_markdown(
    x: dict[str, Any], path: str, draw: bool = True, others: list[dict[str, Any]] | None = None
) -> None:
    """The table into ``path``'s section and the plot next to it (``docs/bench-cost.png``;
    ``draw=False`` keeps the plot already there, e.g. rewriting the text of a saved result);
    ``others``: further invocations at other activities, compared in one more table."""
    if draw:
        plot(x, Path(os.path.dirname(os.path.abspath(path))) / _plot(x))
    c = x["on"]["config"]
    h = c["habits"]
    s = x["on"]["settings"]
    t = x["targets_met"]
    on, off = x["on"], x["off"]
    node_ratio = _role_ratio(x, "node")
    fixed = _control_share

    media = c.get("media_servers", 0)
    layout = (
        f"an embedded Valkey as the control server, {media} more as media server"
        f"{'s' if media > 1 else ''} for the sessions' video and input streams as the documented "
        "deployment places them ([Media servers](README.md#media-servers))"
        if media
        else "one embedded Valkey holding the control plane and the sessions' streams"
    )
    whose = "media servers'" if media > 1 else "media server's"
    split = (
        f"; the {whose} CPU (frames and input in flight) is not control plane: "
        f"{100 * x.get('media_share', math.nan):.1f} % of server CPU with the method, so Valkey + central + "
        f"worker + media servers come to {100 * x.get('valkey_central_worker_share', math.nan):.1f} %"
        if media
        else ""
    )
    body = f"""The same simulated population runs twice against real processes ({layout},
central server, RQ worker, {c["nodes"]} `cloudq node` processes with `{c["app"]}` at
{c["size"][0]}x{c["size"][1]}, {c["fps"]:g} fps): {c["users"]} users, seed {c["seed"]}, each a thread
of the benchmark process running the real client (launcher + kernel: heartbeat, player decoding
every frame, input pump), for {c["duration"]:g} s per run.

- **method on**: nodes encode only frames that changed (paint changes only under input) plus
  keyframes, and convert to YUV only the rows the app's damage covers; idle nodes sleep after {s["idle_timeout"]:g} s without input or when heartbeats lapse
  (TTL {s["heartbeat_ttl"]:g} s); dropped clients have a {s["grace"]:g} s reconnect grace; a
  session idle for {s["idle_close"]:g} s closes (data saved) and its node goes to the next queued
  user. These are the defaults (30 s, 120 s, 15 min) divided by the time scale {c["time_scale"]:g};
  the heartbeat and the frame rate are not scaled.
- **method off**: the same app on nodes started with `--always-encode` (every frame tick converted
  and encoded in full, like a conventional streamer), and no heartbeat deadline, idle timeout, grace or idle close:
  sessions never sleep and end only when their user logs out.

Habits (simulated time, divided by the time scale): visits of {h["visit"] / 60:g} min on average
(exponential, at least {h["min_visit"] / 60:g} min), {h["away"] / 60:g} min away between visits;
during a visit, bursts of mouse strokes ({h["input_hz"]:g} events/s) alternate with idle gaps
(mean {h["idle_gap"]:g} s); a gap is a long break ({h["long_break"][0] / 60:g}-{h["long_break"][1] / 60:g}
min, still logged in) with probability {h["p_break"]:g} and a dropped connection (back within the
grace) with probability {h["p_drop"]:g}; bursts are sized for {100 * h["activity"]:.0f} % activity; first
arrivals are spread uniformly over one mean time away (the run starts mid-day, not at opening time).
CPU: utime + stime from `/proc` of every process (the worker with its work horse), over
the window in which users act; the clients (one process) apart. A user-hour is an hour of a
user's presence (login request → logout, queue included). Queue wait: login request → node
assigned, as each client measured it (a user still queued at the end counts with the time
waited so far).

{x["table"]}

**Headline (method on):** server CPU per user-hour off / on = **{_f(x["cpu_ratio"], ".2f")}x**
(target ≥ {x["targets"]["cpu_ratio_min"]:g}: {"met" if t["cpu_ratio"] else "NOT met"}), **{_f(x["users_per_node"], ".2f")}** users
served per node (target ≥ 2.5: {"met" if t["users_per_node"] else "NOT met"}), queue wait p95
**{_f(x["queue_wait_p95_s"], ".2f")} s** (target ≤ 10 s: {"met" if t["queue_wait_p95"] else "NOT met"}, in the run's seconds; see below),
control plane (Valkey + central + worker) **{100 * x["control_plane_share"]:.1f} %** of server CPU
(target ≤ 15 %: {"met" if t["control_plane_share"] else "NOT met"}){split}.

Where the CPU goes: the nodes alone use {_f(node_ratio, ".2f")}x less with the method (active
{100 * on["node_state_share"].get("active", 0.0):.0f} % and asleep {100 * on["sleep_share"]:.0f} % of node-time, against
{100 * off["node_state_share"].get("active", 0.0):.0f} % active without it). The rest — Valkey, the
central server and the worker, which does more with the method (a save job on every
sleep, a close and a mount per idle-closed session) — is {100 * fixed(on):.0f} % of the server CPU with the
method and {100 * fixed(off):.0f} % without. The queue wait percentiles come from
{on["queue_wait_s"]["n"]} and {off["queue_wait_s"]["n"]} logins: one long wait moves the p95. A wait for a
free node lasts until another user leaves or an idle session closes, which are human times: they
are scaled like the rest, so a wait of s seconds here stands for about {c["time_scale"]:g}·s seconds of a
real day (the login and the dispatch themselves are not scaled: the p50 is that part alone).
Time scaling makes the method look worse than it is: what it costs per event (a save job
run by the worker on every sleep, waking with a keyframe, closing and mounting) comes {c["time_scale"]:g}x
more often per real hour than with real people, while encoding costs the same per second.
{states_text(x)}{projection_text(x)}{others_text(x, others or [])}

![CPU per user-hour and node states, method on and off]({_plot(x)})

Machine: {x["machine"]}; shared with other work, so compare the ratio, not the absolute seconds.
Rerun: `pip install '.[bench]' && cloudq bench cost --activity {",".join(_act(m) for m in [x, *(others or [])])}{_app_opt(x)} --write BENCHMARKS.md`
(the first activity is the headline and the plot; options: `--users`, `--nodes`, `--duration`,
`--activity`, `--seed`, `--time-scale`, `--state-seconds`, `--size`, `--media-servers`, `--json`)."""
    app = x["on"]["config"]["app"]
    title = SECTION if app == "paint" else f"{SECTION}, with `{app}`"
    write_section(title + ("" if _default_size(x) else " at {}x{}".format(*_size(x))), body, path)


def _size(x: dict[str, Any]) -> tuple[int, int]:
    w, h = x["on"]["config"]["size"]
    return int(w), int(h)


def _default_size(x: dict[str, Any]) -> bool:
    return _size(x) == DEFAULT_SIZE


def _app_opt(x: dict[str, Any]) -> str:
    app = x["on"]["config"]["app"]
    size = "" if _default_size(x) else " --size {}x{}".format(*_size(x))
    media = x["on"]["config"].get("media_servers", 0)  # a result from before the option: one server
    return (
        ("" if app == "paint" else f" --app '{app}'")
        + size
        + ("" if media == 1 else f" --media-servers {media}")
    )


def _plot(x: dict[str, Any]) -> str:
    """The plot's path: one per app and size (``paint``'s at the default size is the README's)."""
    app = x["on"]["config"]["app"]
    path = PLOT if app == "paint" else PLOT.replace(".png", "-" + app.split(":", 1)[-1].split()[0] + ".png")
    return path if _default_size(x) else path.replace(".png", "-{}x{}.png".format(*_size(x)))


def projection_text(x: dict[str, Any]) -> str:
    """The per-event costs and the projection for 100 nodes at real event rates."""
    p, ev = x.get("projection"), x.get("events")
    if not p or not ev:
        return ""
    t = x["targets"]
    return f"""
**At real event rates (projection).** The run above scales human time {x["on"]["config"]["time_scale"]:g}x,
so its logins, sleeps and closes come that much more often per hour than with real people. Each
session event's control-plane CPU, measured alone in the same invocation ({ev["repeats"]} of each,
medians; the idle rate subtracted; the bench waits on the events stream, so its own waiting costs
the server one read per event; the node's part apart, a login counting the program's start until
{events.SETTLE:g} s after its first frame):

{events_table(ev)}

Put at the rates the same habits give with the real clocks (idle 30 s, grace 120 s, idle close
15 min), with the node's per-state CPU above and Valkey's media traffic in each state (its CPU
above a free node's), for a pool of 100 nodes (`cloudq/bench/projection.py` shows the arithmetic):

{projection.table(p)}

Projected: off / on = **{_f(p["cpu_ratio"], ".2f")}x** (target ≥ {t["cpu_ratio_min"]:g}), the control
plane **{100 * p["control_plane_share"]:.1f} %** of server CPU with the method, Valkey + central +
worker with the media traffic **{100 * p.get("valkey_central_worker_share", float("nan")):.1f} %**
(target ≤ {100 * t["control_plane_share_max"]:.0f} %). The headline stays the measured run; the
projection says what its event costs come to when they come at a human pace.
"""


def states_text(x: dict[str, Any]) -> str:
    """One node's cost state by state (same invocation) and the ceiling it puts on the ratio."""
    st = x.get("node_states")
    if not st:
        return ""
    a = x["on"]["activity_measured"]
    d_on, d_off = st["on"]["drawing"]["node"], st["off"]["drawing"]["node"]
    s_off = st["off"]["awake idle"]["node"]
    a3 = x.get("activity_for_3x") or math.nan
    reach = (
        "a 3x ceiling holds at any activity, even users drawing all the time"
        if not a3 < 1  # a drawing node with the method costs under a third of an always-encoding one
        else f"a 3x ratio is within reach only below {100 * a3:.0f} % activity"
    )
    return f"""
Why the ratio stops where it does: one node, state by state, in the same invocation (% of one
core, each state held {st["seconds"]:g} s; the control plane's figures are the whole server's in that
state, one session at most):

{nodecost.table(st)}

With the method, a node costs almost nothing unless its user gives input — and then it costs
less than a conventional streamer only by what converting just the changed rows saves: drawing is
{d_on:.1f} % with the method and {d_off:.1f} % without,
while an always-encoding node with an unchanged picture costs {s_off:.1f} %. So at the measured
activity ({100 * a:.0f} %) the best ratio the method could reach, if sleeping, waking, saving, free
nodes and the control plane cost nothing at all, is
(a·{d_off:.1f} + (1 - a)·{s_off:.1f}) / (a·{d_on:.1f}) = **{_f(x["cpu_ratio_ceiling"], ".2f")}x**; {reach}. The measured
ratio is what is left of that ceiling after the real costs of those parts.
"""


def _act(x: dict[str, Any]) -> str:
    return format(x["on"]["config"]["habits"]["activity"], "g")


def others_text(x: dict[str, Any], others: list[dict[str, Any]]) -> str:
    if not others:
        return ""
    return f"""
At other activities (same users, seed and clocks; each activity its own two runs and
its own per-state table):

{by_activity([x, *others])}

The less the users give input, the more the nodes save, and the more of what is left is the
control plane: Valkey and the central server cost about the same whatever the users do, and the
worker runs a save job on every sleep, which time scaling makes {x["on"]["config"]["time_scale"]:g}x
more frequent than with real people.
"""


def config(
    users: int,
    nodes: int,
    duration: float,
    activity: float,
    seed: int,
    time_scale: float,
    app: str = "paint",
    size: tuple[int, int] = DEFAULT_SIZE,
    media_servers: int = 1,
) -> PopulationConfig:
    """The population of one invocation; an ``x11:`` app runs with ``--freeze`` (method on)."""
    return PopulationConfig(
        users=users,
        nodes=nodes,
        duration=duration,
        seed=seed,
        time_scale=time_scale,
        app=app,
        size=size,
        freeze=app.startswith("x11:"),
        media_servers=media_servers,
        habits=Habits(activity=activity),
    )
