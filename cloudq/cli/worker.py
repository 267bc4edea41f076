"""``cloudq worker``: an RQ worker for this host's jobs (mount, save, close)."""

from __future__ import annotations

import os
import socket

import click

from cloudq.cli.common import (
    _connect,
    _serve_metrics,
    _warn_if_trusted,
    metrics_options,
    prefix_option,
    redis_url_option,
)
from cloudq.keys import Keys


@click.command()
@redis_url_option
@prefix_option
@click.option("--host", envvar="CLOUDQ_HOST", default=socket.gethostname, help="Serve this host's queue.")
@click.option("--name", default=None, help="Worker name (default: RQ's).")
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
@click.option(
    "--store", envvar="CLOUDQ_STORE", default=None, help="User-data store directory (shared by hosts)."
)
@click.option("--workspace", envvar="CLOUDQ_WORKSPACE", default=None, help="This host's node workspaces.")
@click.option(
    "--quota-mib", envvar="CLOUDQ_QUOTA_MIB", type=click.FloatRange(min=0), default=100, show_default=True
)
@metrics_options
def worker(
    redis_url: str | None,
    prefix: str,
    host: str,
    name: str | None,
    burst: bool,
    store: str | None,
    workspace: str | None,
    quota_mib: float,
    metrics_port: int,
    metrics_addr: str,
) -> None:
    """Run an RQ worker for this host's jobs (mount, save, close)."""
    from cloudq.workers.metrics import JobMetrics
    from cloudq.workers.worker import run_worker

    # the jobs (in forked work horses) read these
    for var, value in (
        ("CLOUDQ_STORE", store),
        ("CLOUDQ_WORKSPACE", workspace),
        ("CLOUDQ_QUOTA_MIB", quota_mib),
    ):
        if value is not None:
            os.environ[var] = str(value)
    r = _connect(redis_url)
    _warn_if_trusted(r, Keys(prefix), "worker")
    metrics = JobMetrics()
    _serve_metrics(metrics_port, metrics_addr, metrics.registry)
    run_worker(r, Keys(prefix), host, name=name, burst=burst, metrics=metrics)
