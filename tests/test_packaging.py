"""What an operator relies on: README commands and key table, compose file, installed layout."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import yaml

from cloudq.keys import key_table_markdown
from cloudq.procs import cloudq_command

ROOT = Path(__file__).resolve().parent.parent


def test_readme_key_table_is_the_one_keys_py_generates() -> None:
    assert key_table_markdown() in (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme_cmds = (ROOT / "README.md").read_text().split("```")[1].strip().splitlines()
    assert len(readme_cmds) == 2 and "cloudq demo" in readme_cmds[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_cmds[1] in ci


def test_only_cloudq_is_a_top_level_package() -> None:
    assert importlib.util.find_spec("cloudq.workers.node") is not None
    assert importlib.util.find_spec("cloudq.client.launcher") is not None
    assert importlib.util.find_spec("workers") is None
    assert importlib.util.find_spec("client") is None


def test_compose_services_run_real_cloudq_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "central", "node", "worker"} <= set(services)
    assert "Ex" in services["redis"]["command"]
    for name in ("central", "node", "worker", "gateway"):
        cmd = services[name]["command"]
        line = cmd[-1] if cmd[0] == "sh" else " ".join(cmd)
        sub = line.split("cloudq", 1)[1].split()
        sub = [a for a in sub if not a.startswith("-v")][:1]
        out = subprocess.run([*cloudq_command(), *sub, "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        for opt in (w for w in line.split() if w.startswith("--")):
            assert opt in out.stdout, f"{name}: {opt} is not an option of cloudq {sub[0]}"


COMPOSE_ENV = {f"CLOUDQ_ACL_{r}_PASSWORD": "x" for r in ("ADMIN", "CENTRAL", "NODE", "WORKER", "GATEWAY")}


def test_compose_file_is_valid_for_docker_compose_and_its_files_exist() -> None:
    """``docker-compose config`` (Debian's docker-compose; no engine needed) accepts the file,
    with the role passwords it requires, and refuses it without them; every file it builds from
    is in the repository."""
    import os
    import shutil

    from helpers import missing_prerequisite

    exe = shutil.which("docker-compose")
    if exe is None:
        missing_prerequisite("docker-compose is not installed (apt: docker-compose); .ci/run installs it")
    env = {**os.environ, **COMPOSE_ENV}
    ok = subprocess.run([exe, "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    bare = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDQ_ACL_")}
    refused = subprocess.run([exe, "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT, env=bare,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode != 0 and "set it in .env" in refused.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["central"]["deploy"]["replicas"] == 2
    for svc in compose["services"].values():
        if svc.get("build"):
            assert (ROOT / svc["build"] / "Dockerfile").exists()
