"""``cloudq bench …``: each benchmark prints its table; ``--write PATH`` also rewrites that
benchmark's section of a markdown file (BENCHMARKS.md in this repository). Nothing is written
unless asked. The benchmark modules are imported only when their command runs."""

from __future__ import annotations

import json
from typing import Any

import click

from cloudq.bench.report import json_safe
from cloudq.cli.common import parse_wxh, redis_url_option

write_option = click.option(
    "--write",
    "write_path",
    metavar="PATH",
    default=None,
    help="Also write the table into this markdown file's section (e.g. BENCHMARKS.md). Default: print only.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the raw results as JSON.")


def _emit(result: dict[str, Any], table: str, as_json: bool) -> None:
    if as_json:
        out = json_safe({k: v for k, v in result.items() if k != "table"})
        out["null_means"] = "not measured, or (latencies) did not arrive within the benchmark's window"
        click.echo(json.dumps(out, indent=2, default=str, allow_nan=False))
    else:
        click.echo(table)


@click.group()
def bench() -> None:
    """Benchmarks: print a table; --write PATH also writes it into a markdown file."""


@bench.command("central")
@click.option("--sessions", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--window", type=click.FloatRange(min=1), default=20.0, show_default=True, help="Seconds.")
@json_option
@write_option
def bench_central(sessions: int, window: float, as_json: bool, write_path: str | None) -> None:
    """An idle central server's CPU with N beating sessions vs none (same run)."""
    from cloudq.bench import centralidle

    result = centralidle.run(sessions=sessions, window=window)
    if write_path:
        centralidle.write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("failover")
@click.option(
    "--logins", type=click.IntRange(min=5), default=40, show_default=True, help="Per case and round."
)
@click.option(
    "--frame-runs",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Failovers with two users watching: kill -9 of the primary -> each one's first new frame (0: skip).",
)
@json_option
@write_option
def bench_failover(logins: int, frame_runs: int, as_json: bool, write_path: str | None) -> None:
    """Login latency with and without a replica's acknowledgement (WAIT 1); kill -9 of the primary →
    next login, and → each watching user's first new frame."""
    from cloudq.bench import failover

    result = failover.run(logins=logins, frame_runs=frame_runs)
    if write_path:
        failover.write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("scale")
@click.option("--sessions", type=click.IntRange(min=1), default=60, show_default=True,
              help="Sessions per state row.")  # fmt: skip
@click.option("--loads", default="20,60,120", show_default=True, help="Active session counts on one server.")
@click.option(
    "--window", type=click.FloatRange(min=1), default=8.0, show_default=True, help="Seconds measured per row."
)
@click.option(
    "--generators", type=click.IntRange(min=1), default=2, show_default=True, help="Load processes."
)
@json_option
@write_option
def bench_scale(
    sessions: int, loads: str, window: float, generators: int, as_json: bool, write_path: str | None
) -> None:
    """Media servers' CPU and memory per session (active, idle, asleep), split over 1-3 servers."""
    from cloudq.bench import scale

    try:
        counts = tuple(int(x) for x in loads.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter("a comma-separated list of numbers", param_hint="--loads") from None
    result = scale.run(sessions=sessions, loads=counts, window=window, generators=generators)
    if write_path:
        scale.write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("audio")
@click.option("--seconds", type=click.FloatRange(min=2), default=10.0, show_default=True, help="Per phase.")
@json_option
@write_option
def bench_audio(seconds: float, as_json: bool, write_path: str | None) -> None:
    """A program's sound: write → node packet → page (decoded, speakers); node CPU with sound playing."""
    from cloudq.bench import audio

    result = audio.run(seconds=seconds)
    if write_path:
        audio.write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("control")
@redis_url_option  # measure this server (default: embedded)
@click.option("--sessions", "counts", multiple=True, type=int, default=[1000, 10000], show_default=True)
@click.option("--background-keys", type=int, default=100_000, show_default=True)
@click.option("--sample", type=int, default=200, show_default=True, help="Sessions stopped per run.")
@json_option
@write_option
def bench_control(
    redis_url: str | None,
    counts: list[int],
    background_keys: int,
    sample: int,
    as_json: bool,
    write_path: str | None,
) -> None:
    """Deadline → node sleeping, vs keyspace notifications alone."""
    from cloudq.bench.control import run, write_markdown

    result = run(redis_url, list(counts), background_keys, sample)
    if write_path:
        write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("media")
@json_option
@write_option
@click.option("--latency-samples", type=click.IntRange(min=10), default=300, show_default=True)
@click.option("--cpu-window", type=click.FloatRange(min=1), default=10.0, show_default=True, help="Seconds.")
def bench_media(as_json: bool, write_path: str | None, latency_samples: int, cpu_window: float) -> None:
    """Input→frame latency vs floor, fps/CPU at 30/60 fps, sleep vs active CPU, wake, bytes/s."""
    from cloudq.bench.media import run, write_markdown

    result = run(latency_samples=latency_samples, cpu_window=cpu_window)
    if write_path:
        write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("x11")
@json_option
@write_option
@click.option("--latency-samples", type=click.IntRange(min=10), default=200, show_default=True)
@click.option("--cpu-window", type=click.FloatRange(min=1), default=10.0, show_default=True, help="Seconds.")
def bench_x11(as_json: bool, write_path: str | None, latency_samples: int, cpu_window: float) -> None:
    """A real X11 program: key→frame latency vs floor at 1280x720; CPU awake, asleep, frozen."""
    from cloudq.bench.x11 import run, write_markdown

    result = run(latency_samples=latency_samples, cpu_window=cpu_window)
    if write_path:
        write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("data")
@click.option("--sizes", default="1,10,100", show_default=True, help="MiB of user data per case.")
@click.option("--workdir", default=None, help="Where to create the files (default: a temp dir).")
@json_option
@write_option
def bench_data(sizes: str, workdir: str | None, as_json: bool, write_path: str | None) -> None:
    """Mount (restore) and save time vs tar extracting and creating the same files."""
    from cloudq.bench import data

    result = data.run(tuple(float(s) for s in sizes.split(",")), workdir)
    if write_path:
        data.write_markdown(result, write_path)
    _emit(result, data.format_table(result), as_json)


@bench.command("reader")
@click.option(
    "--rate",
    type=click.FloatRange(min=1, max=1000),
    default=30.0,
    show_default=True,
    help="Input events a second.",
)
@click.option("--seconds", type=click.FloatRange(min=1), default=8.0, show_default=True, help="Per phase.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Per reader.")
@json_option
@write_option
def bench_reader(rate: float, seconds: float, rounds: int, as_json: bool, write_path: str | None) -> None:
    """Valkey's CPU per input event: the node's reader with its bounded script on every read vs
    between script runs the XREAD alone (same server, alternating phases)."""
    from cloudq.bench import inputread

    result = inputread.run(rate=rate, seconds=seconds, rounds=rounds)
    if write_path:
        inputread.write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("jobs")
@click.option("--jobs", "n", type=click.IntRange(min=10), default=200, show_default=True, help="Per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True, help="Per mode.")
@json_option
@write_option
def bench_jobs(n: int, rounds: int, as_json: bool, write_path: str | None) -> None:
    """The worker's CPU per job: a work horse forked per job vs one long-lived horse (same run)."""
    from cloudq.bench import jobs

    result = jobs.run(jobs_per_mode=n, rounds=rounds)
    if write_path:
        jobs.write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("browser")
@json_option
@write_option
@click.option("--samples", type=click.IntRange(min=10), default=300, show_default=True, help="Per client.")
@click.option(
    "--blocks", type=click.IntRange(min=2), default=6, show_default=True, help="Alternating blocks."
)
@click.option("--clipboard-samples", type=click.IntRange(min=0), default=20, show_default=True,
              help="Pastes and copies timed through an x11:xterm session (0 = skip).")  # fmt: skip
@click.option("--audio-seconds", type=click.FloatRange(min=0), default=8.0, show_default=True,
              help="Seconds of sound bursts timed to the page (`bench audio`; 0 = skip).")  # fmt: skip
def bench_browser(
    as_json: bool,
    write_path: str | None,
    samples: int,
    blocks: int,
    clipboard_samples: int,
    audio_seconds: float,
) -> None:
    """Input→decoded frame in headless Chromium via `cloudq gateway`, next to the Python client;
    paste→remote selection, copy→page and sound→page."""
    from cloudq.bench.browser import run, write_markdown

    try:
        result = run(
            samples=samples, blocks=blocks, clipboard_samples=clipboard_samples, audio_seconds=audio_seconds
        )
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    if write_path:
        write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


def _activities(value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma list of numbers") from None
    if not out or not all(0 < a < 1 for a in out):
        raise click.BadParameter(f"{value!r}: every activity must be between 0 and 1 (exclusive)")
    return out


@bench.command("cost")
@click.option(
    "--users", envvar="CLOUDQ_BENCH_USERS", type=click.IntRange(min=1), default=8, show_default=True
)
@click.option(
    "--nodes", envvar="CLOUDQ_BENCH_NODES", type=click.IntRange(min=1), default=4, show_default=True
)
@click.option(
    "--duration",
    envvar="CLOUDQ_BENCH_DURATION",
    type=click.FloatRange(min=5),
    default=150.0,
    show_default=True,
    help="Seconds the users act, per run (two runs).",
)
@click.option(
    "--activity",
    envvar="CLOUDQ_BENCH_ACTIVITY",
    default="0.3",
    show_default=True,
    callback=lambda _ctx, _param, v: _activities(v),
    help="Share of a visit the users give input; a comma list runs each (the first is the headline).",
)
@click.option("--seed", envvar="CLOUDQ_BENCH_SEED", type=int, default=1, show_default=True)
@click.option(
    "--time-scale",
    envvar="CLOUDQ_BENCH_TIME_SCALE",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Human times (idle gaps, visits, idle/grace clocks) are divided by this.",
)
@click.option(
    "--state-seconds",
    type=click.FloatRange(min=0),
    default=15.0,
    show_default=True,
    help="Seconds one node is held in each state for the per-state table and the projection "
    "(0 = skip both; 5-second windows moved the projection by a third between invocations).",
)
@click.option(
    "--event-repeats",
    type=click.IntRange(min=0),
    default=6,
    show_default=True,
    help="Each session event timed this often for the projection at real rates (0 = skip both).",
)
@click.option(
    "--app",
    default="paint",
    show_default=True,
    help="The nodes' app, e.g. 'x11:xclock -update 1' (an x11: program runs with --freeze, method on).",
)
@click.option(
    "--size",
    default="1280x720",
    show_default=True,
    callback=parse_wxh,
    help="WxH of every node's picture (the default is a node's own).",
)
@click.option(
    "--media-servers",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Media servers for the sessions' streams, apart from the control server, as the "
    "documented deployment runs them (0 = one server holds both; its CPU then counts as control plane).",
)
@json_option
@write_option
def bench_cost(
    users: int,
    nodes: int,
    duration: float,
    activity: list[float],
    seed: int,
    time_scale: float,
    state_seconds: float,
    event_repeats: int,
    app: str,
    size: tuple[int, int],
    media_servers: int,
    as_json: bool,
    write_path: str | None,
) -> None:
    """CPU per user-hour with the method on vs off, users per node, queue wait, sleep share; the
    control plane's cost per event and the projection for 100 nodes at real event rates."""
    import signal
    import sys

    from cloudq.bench import cost

    # SIGTERM unwinds like Ctrl-C: every run's processes and embedded server are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if write_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--write draws a plot: pip install 'cloudq[bench]' (matplotlib)") from None
    result, *others = (
        cost.run(
            cost.config(users, nodes, duration, a, seed, time_scale, app, size, media_servers),
            state_seconds,
            event_repeats,
        )
        for a in activity
    )
    if others:
        result["by_activity"] = [
            {k: v for k, v in x.items() if k not in ("on", "off", "table")} for x in others
        ]
        result["table"] += "\n\n" + cost.by_activity([result, *others])
    if write_path:
        cost.write_markdown(result, write_path, others=others)
    if as_json:
        out = {k: v for k, v in result.items() if k not in ("on", "off")}
        out["on"] = {k: v for k, v in result["on"].items() if k != "timeline"}
        out["off"] = {k: v for k, v in result["off"].items() if k != "timeline"}
        _emit(out, result["table"], as_json)
    else:
        _emit(result, result["table"], as_json)


@bench.command("security")
@click.option("--logins", type=click.IntRange(min=4), default=24, show_default=True, help="Logins per run.")
@click.option(
    "--users", type=click.IntRange(min=100), default=10_000, show_default=True, help="Session users."
)
@click.option(
    "--flood",
    "flood_rate",
    type=click.FloatRange(min=0),
    default=None,
    is_flag=False,
    flag_value=100.0,
    help="Only: a real user's login p50/p95 while RATE anonymous logins/s arrive (default 100), vs quiet.",
)
@json_option
@write_option
def bench_security(
    logins: int, users: int, flood_rate: float | None, as_json: bool, write_path: str | None
) -> None:
    """Logins/s with 1 and 2 central replicas (bcrypt 12); session user create/delete; 10k users vs none."""
    if flood_rate is not None:
        from cloudq.bench import loginflood

        result = loginflood.run(rate=flood_rate)
        if write_path:
            loginflood.write_markdown(result, write_path)
        _emit(result, result["table"], as_json)
        return
    from cloudq.bench.security import run, write_markdown

    result = run(logins=logins, users=users)
    if write_path:
        write_markdown(result, write_path)
    _emit(result, result["table"], as_json)


@bench.command("gateway")
@click.option(
    "--tries", type=click.IntRange(min=4), default=1000, show_default=True, help="Early closes in all."
)
@click.option("--concurrency", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@write_option
def bench_gateway(tries: int, concurrency: int, as_json: bool, write_path: str | None) -> None:
    """WebSockets closed early (oversized, bad message, close after hello, reset): the gateway's
    sockets, tasks and Redis connections until they are back to the baseline."""
    from cloudq.bench.gateway import run, write_markdown

    result = run(tries=tries, concurrency=concurrency)
    if write_path:
        write_markdown(result, write_path)
    _emit(result, result["table"], as_json)
