"""The architecture as checks: import contracts (pyproject.toml) and what a client loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold(tmp_path: Path) -> None:
    """``lint-imports`` over the installed package (where workers/ and client/ are mapped into
    ``cloudq``), run outside the checkout so the bare source folder does not shadow it."""
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail("import-linter is not installed (it is in the test extra)")
    out = subprocess.run(
        [exe, str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def test_the_client_loads_neither_bcrypt_rq_nor_the_store() -> None:
    mods = _loaded_after(
        "import cloudq.client.session, cloudq.client.player, cloudq.client.launcher, cloudq.client.kernel"
    )
    assert "cloudq.client.session" in mods  # the import really happened
    for forbidden in ("bcrypt", "rq", "cloudq.jobs"):
        assert forbidden not in mods, forbidden
    assert not [m for m in mods if m.startswith(("cloudq.workers", "cloudq.central"))]


def test_the_central_server_loads_no_role_and_no_media_stack() -> None:
    mods = _loaded_after(
        "import cloudq.central.server, cloudq.central.auth, cloudq.central.acl, cloudq.central.status, "
        "cloudq.central.metrics"
    )
    assert "cloudq.central.server" in mods
    assert not [m for m in mods if m.startswith(("cloudq.workers", "cloudq.client", "cloudq.cli"))]
    assert "av" not in mods and "numpy" not in mods


def test_every_cloudq_command_starts_without_the_store() -> None:
    mods = _loaded_after("import cloudq.cli")
    assert "cloudq.cli" in mods
    assert not [m for m in mods if m.startswith(("cloudq.workers", "cloudq.client"))]
    assert (
        not {
            "cloudq.bench.control",
            "cloudq.bench.media",
            "cloudq.bench.data",
            "cloudq.bench.browser",
            "cloudq.bench.cost",
            "cloudq.bench.population",
        }
        & mods
    )


def test_the_gateway_loads_no_media_stack_and_no_worker() -> None:
    web = ("cloudq.client.web.http", "cloudq.client.web.socket", "cloudq.client.web.metrics")
    mods = _loaded_after("import " + ", ".join(web))
    assert set(web) <= mods
    for forbidden in ("av", "numpy", "bcrypt", "rq", "cloudq.codec"):
        assert forbidden not in mods, forbidden
    assert not [m for m in mods if m.startswith(("cloudq.workers", "cloudq.central"))]


def test_no_module_of_a_role_or_the_core_is_above_700_lines() -> None:
    """Big modules are where the next change collides with the last one: split before 700."""
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for folder in ("cloudq", "workers", "client")
        for p in (ROOT / folder).rglob("*.py")
    }
    assert len(sizes) > 50, sorted(sizes)  # the walk really found the tree
    assert {p: n for p, n in sizes.items() if n > 700} == {}
