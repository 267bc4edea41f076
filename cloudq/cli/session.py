"""``cloudq session close``: an operator closes a session (its data saved, its node freed)."""

from __future__ import annotations

import click

from cloudq.cli.common import (
    _fail,
    _machine,
    _run,
    operator,
    prefix_option,
    redis_url_option,
)
from cloudq.state import CloseReason, with_detail


@click.group()
def session() -> None:
    """Manage sessions."""


@session.command("close")
@redis_url_option
@prefix_option
@click.option("--reason", default="closed by the operator", show_default=True, help="Shown to the user.")
@click.argument("sid")
def session_close(redis_url: str | None, prefix: str, reason: str, sid: str) -> None:
    """Close session SID: its data is saved, its node freed, its client told REASON."""
    sm = _machine(redis_url, prefix)
    status = _run(sm.admin_close, sid, with_detail(CloseReason.ADMIN, reason), operator())
    if status == "gone":
        _fail(f"no live session {sid!r}")
    click.echo(f"session {sid} {'is already closing' if status == 'closing' else 'is closing'}")
