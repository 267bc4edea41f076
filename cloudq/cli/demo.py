"""``cloudq demo``: CLI wiring (the run itself is :mod:`cloudq.local.demo`, imported when it runs)."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from cloudq.cli.common import gateway_listen_options


@click.command()
@click.option(
    "--duration",
    envvar="CLOUDQ_DEMO_DURATION",
    type=click.FloatRange(min=15),
    default=60,
    show_default=True,
    show_envvar=True,
    help="Seconds the three users act.",
)
@click.option(
    "--out",
    envvar="CLOUDQ_DEMO_OUT",
    type=click.Path(file_okay=False),
    default="cloudq-demo-out",
    show_default=True,
    show_envvar=True,
    help="Directory for the MP4 per user and the processes' logs.",
)
@gateway_listen_options("The gateway listens on this address.", "The gateway's port (0 = any free port).")
def demo(duration: float, out: str, host: str, port: int) -> None:
    """One minute of the whole method on this machine: central, 2 nodes, a worker, the gateway and
    three scripted users (one draws, one idles so its node sleeps and wakes, one drops and
    reconnects); a live table, then a summary. Exits 1 if any step it claims did not happen."""
    from cloudq.local.demo import DemoConfig, run_demo

    def say(text: str) -> None:
        click.echo(text)
        sys.stdout.flush()

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # like Ctrl-C: the demo stops what it started
    try:
        failed = run_demo(DemoConfig(duration=duration, out=out, host=host, port=port), say)
    except KeyboardInterrupt:
        click.echo("cloudq demo: interrupted; everything it started is stopped", err=True)
        raise SystemExit(130) from None
    if failed:
        raise SystemExit(1)
