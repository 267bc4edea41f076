"""Credentials come from files only their OS user can read (``--redis-url-file``), not from argv or
the environment; the embedded server's memory is bounded. The processes themselves are checked
in ``test_cli.py`` (``cloudq up``: no password in any child's /proc cmdline or environ)."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cloudq.cli import main
from cloudq.cli.common import redis_url_from
from cloudq.embedded import maxmemory_for, parse_memory
from cloudq.secretfile import UnsafeSecretFile, read_secret, write_secret

URL = "redis://cloudq-node:s3cret@127.0.0.1:1/0"


def test_a_url_file_is_used_only_when_nobody_else_can_read_it(tmp_path: Path) -> None:
    path = write_secret(str(tmp_path / "d" / "node.url"), URL)
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(tmp_path / "d").st_mode & 0o777 == 0o700
    assert read_secret(path) == URL
    for mode in (0o640, 0o604, 0o644, 0o610):
        os.chmod(path, mode)
        with pytest.raises(UnsafeSecretFile, match=f"permissions {mode:04o} of .* are too open"):
            read_secret(path)
    os.chmod(path, 0o400)
    assert read_secret(path) == URL
    if os.geteuid() == 0:  # as root: a file of another user is refused even if root can read it
        os.chown(path, 65534, 65534)
        with pytest.raises(UnsafeSecretFile, match="owned by uid 65534, not by this user"):
            read_secret(path)
    empty = write_secret(str(tmp_path / "empty.url"), "")
    with pytest.raises(UnsafeSecretFile, match="is empty"):
        read_secret(empty)
    with pytest.raises(UnsafeSecretFile, match="cannot read"):
        read_secret(str(tmp_path / "missing.url"))
    with pytest.raises(UnsafeSecretFile, match="not a regular file"):
        read_secret(str(tmp_path / "d"))


def _commands(group: click.Group, path: str = "") -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name, cmd in group.commands.items():
        out[f"{path}{name}"] = cmd  # a group may run too (`cloudq node --id ...`)
        if isinstance(cmd, click.Group):
            out.update(_commands(cmd, f"{path}{name} "))
    return out


def test_every_command_that_takes_a_url_takes_it_from_a_file_and_refuses_an_open_or_second_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_url = {
        name
        for name, cmd in _commands(main).items()
        if any("--redis-url" in p.opts for p in cmd.params if isinstance(p, click.Option))
    }
    expected = {"central", "node", "node drain", "worker", "gateway", "connect", "status", "up", "user add"}
    assert expected <= with_url
    for name in with_url:
        opts = {o for p in _commands(main)[name].params for o in p.opts}
        assert "--redis-url-file" in opts, f"cloudq {name} has --redis-url but no --redis-url-file"
    path = write_secret(str(tmp_path / "admin.url"), URL)
    os.chmod(path, 0o644)
    runner = CliRunner()
    out = runner.invoke(main, ["status", "--redis-url-file", path])
    assert out.exit_code == 2 and "too open" in out.output and "chmod 600" in out.output
    os.chmod(path, 0o600)
    out = runner.invoke(main, ["status", "--redis-url-file", path, "--redis-url", URL])
    assert out.exit_code == 2 and "--redis-url and --redis-url-file are both set" in out.output
    out = runner.invoke(main, ["status", "--redis-url-file", path], env={"CLOUDQ_REDIS_URL": URL})
    assert out.exit_code == 2 and "CLOUDQ_REDIS_URL and --redis-url-file are both set" in out.output
    # read once, the URL leaves the environment: no child program inherits it
    monkeypatch.setenv("CLOUDQ_REDIS_URL", URL)
    assert redis_url_from(URL, None) == URL and "CLOUDQ_REDIS_URL" not in os.environ
    assert redis_url_from(None, path) == URL


def test_maxmemory_is_sized_per_session_and_checked_before_anything_starts() -> None:
    assert maxmemory_for(0) == 320 * 2**20 and maxmemory_for(10) - maxmemory_for(9) == 16 * 2**20
    assert parse_memory("512mb") == 512 * 2**20 and parse_memory("2GB") == 2 * 2**30
    assert parse_memory("1k") == 1000 and parse_memory("0") == 0
    runner = CliRunner()
    out = runner.invoke(main, ["up", "--maxmemory", "lots"])
    assert out.exit_code == 2 and "not a memory size" in out.output
    out = runner.invoke(main, ["up", "--maxmemory", "1gb", "--redis-url", URL])
    assert out.exit_code == 2 and "set maxmemory on your own Redis" in out.output
