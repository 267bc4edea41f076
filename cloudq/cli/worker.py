"""``cloudq worker``: an RQ worker for this host's jobs (mount, save, close)."""

from __future__ import annotations

import os
import socket
import sys

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
@click.option(
    "--save-lease",
    envvar="CLOUDQ_SAVE_LEASE",
    type=click.FloatRange(min=0),
    default=10,
    show_default=True,
    help="Seconds a save's lock on its user outlives a saver that died (renewed while it saves; 0 = no lapse).",
)
@click.option(
    "--fork-per-job",
    envvar="CLOUDQ_WORKER_FORK_PER_JOB",
    is_flag=True,
    help="Fork a work horse for each job (RQ's own worker) instead of one long-lived horse.",
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
    save_lease: float,
    fork_per_job: bool,
    metrics_port: int,
    metrics_addr: str,
) -> None:
    """Run an RQ worker for this host's jobs (mount, save, close).

    Jobs run one after another in one long-lived work horse that a small supervisor (this
    process) restarts if a job takes it down or hangs past its timeout."""
    from cloudq.workers.metrics import JobMetrics
    from cloudq.workers.worker import run_worker, supervise

    # the jobs read these
    for var, value in (
        ("CLOUDQ_STORE", store),
        ("CLOUDQ_WORKSPACE", workspace),
        ("CLOUDQ_QUOTA_MIB", quota_mib),
        ("CLOUDQ_SAVE_LEASE", save_lease),
    ):
        if value is not None:
            os.environ[var] = str(value)

    def horse() -> None:
        r = _connect(redis_url)
        _warn_if_trusted(r, Keys(prefix), "worker")
        metrics = JobMetrics()
        _serve_metrics(metrics_port, metrics_addr, metrics.registry)
        run_worker(r, Keys(prefix), host, name=name, burst=burst, metrics=metrics, fork_per_job=fork_per_job)

    if fork_per_job:
        horse()
    else:
        sys.exit(supervise(horse))  # forks: no connection or thread is open yet
