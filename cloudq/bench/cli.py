"""``cloudq bench …``: each benchmark prints its table; ``--write PATH`` also rewrites that
benchmark's section of a markdown file (BENCHMARKS.md in this repository). Nothing is written
unless asked. The benchmark modules are imported only when their command runs."""

from __future__ import annotations

import json
from typing import Any

import click

write_option = click.option(
    "--write",
    "write_path",
    metavar="PATH",
    default=None,
    help="Also write the table into this markdown file's section (e.g. BENCHMARKS.md). Default: print only.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the raw results as JSON.")


def _emit(result: dict[str, Any], table: str, as_json: bool) -> None:
    click.echo(json.dumps(result, indent=2, default=str) if as_json else table)


@click.group()
def bench() -> None:
    """Benchmarks: print a table; --write PATH also writes it into a markdown file."""


@bench.command("control")
@click.option(
    "--redis-url",
    envvar="CLOUDQ_REDIS_URL",
    show_envvar=True,
    help="Measure this server (default: embedded).",
)
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


@bench.command("security")
@click.option("--logins", type=click.IntRange(min=4), default=24, show_default=True, help="Logins per run.")
@click.option(
    "--users", type=click.IntRange(min=100), default=10_000, show_default=True, help="Session users."
)
@json_option
@write_option
def bench_security(logins: int, users: int, as_json: bool, write_path: str | None) -> None:
    """Logins/s with 1 and 2 central replicas (bcrypt 12); session user create/delete; 10k users vs none."""
    from cloudq.bench.security import run, write_markdown

    result = run(logins=logins, users=users)
    if write_path:
        write_markdown(result, write_path)
    _emit(result, result["table"], as_json)
