"""The ``cloudq`` command: one module per command group, wiring only (parse options, build
objects, call library code). Every option can also be set from a ``CLOUDQ_…`` environment
variable. A command module imports its role (``cloudq.central``, ``cloudq.workers``,
``cloudq.client``) only when the command runs, so every command starts without the others.
"""

from __future__ import annotations

import click

from cloudq.bench.cli import bench
from cloudq.cli.acl import acl
from cloudq.cli.central import central
from cloudq.cli.client import connect, gateway
from cloudq.cli.common import _setup_logging
from cloudq.cli.data import data
from cloudq.cli.demo import demo
from cloudq.cli.node import node
from cloudq.cli.session import session
from cloudq.cli.status import status
from cloudq.cli.up import up
from cloudq.cli.user import user
from cloudq.cli.worker import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="cloudq")
def main(verbose: int) -> None:
    """cloudq: time-shared cloud-streamed interactive sessions over Redis."""
    _setup_logging(verbose)


for _command in (central, node, worker, user, session, status, up, acl, connect, gateway, data, demo, bench):
    main.add_command(_command)
