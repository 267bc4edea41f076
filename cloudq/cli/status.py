"""``cloudq status``: nodes, sessions and the queue, once or live."""

from __future__ import annotations

import contextlib
import json
import sys

import click
import redis

from cloudq.cli.common import (
    _connect,
    _fail,
    prefix_option,
    redis_url_option,
)
from cloudq.keys import Keys


@click.command()
@redis_url_option
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Redraw a live table (with per-node fps and CPU) until Ctrl-C.")
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="With --watch."
)
@click.option("--count", type=click.IntRange(min=0), default=0, help="With --watch: stop after N tables.")
def status(
    redis_url: str | None, prefix: str, as_json: bool, watch: bool, interval: float, count: int
) -> None:
    """Show nodes, sessions and the queue."""
    from cloudq.central.status import format_text, gather
    from cloudq.central.status import watch as watch_loop

    try:
        if watch:
            with contextlib.suppress(KeyboardInterrupt):
                watch_loop(
                    _connect(redis_url),
                    Keys(prefix),
                    lambda text: click.echo(text, nl=False),
                    interval,
                    count,
                    clear=sys.stdout.isatty(),
                )
            return
        st = gather(_connect(redis_url), Keys(prefix))
    except redis.ConnectionError as exc:
        _fail(f"cannot reach Redis: {exc}", 5)
    click.echo(json.dumps(st, indent=2) if as_json else format_text(st))
