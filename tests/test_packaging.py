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


CLOUDQ_SERVICES = ("central", "node", "worker", "gateway")
PENDING_OPTIONS = {("central", "--media-url")}
"""Options the compose file uses that land with the media plane (issue 21 part 2), not yet an
option of the CLI on every branch: while missing, the test is an expected failure, not a pass."""


def test_compose_services_run_real_cloudq_commands() -> None:
    import pytest

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis1", "redis2", "sentinel1", "sentinel2", "sentinel3", "media1", "media2"} <= set(services)
    assert set(CLOUDQ_SERVICES) <= set(services)
    pending = []
    for name in CLOUDQ_SERVICES:
        cmd = services[name]["command"]
        line = cmd[-1] if cmd[0] == "sh" else " ".join(cmd)
        sub = line.split("cloudq", 1)[1].split()
        sub = [a for a in sub if not a.startswith("-v")][:1]
        out = subprocess.run([*cloudq_command(), *sub, "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        for opt in (w for w in line.split() if w.startswith("--")):
            if opt not in out.stdout and (name, opt) in PENDING_OPTIONS:
                pending.append(f"{name} {opt}")
                continue
            assert opt in out.stdout, f"{name}: {opt} is not an option of cloudq {sub[0]}"
    if pending:
        pytest.xfail(f"not yet options of this branch's CLI: {', '.join(sorted(set(pending)))}")


def _shell(service: dict) -> str:
    cmd = service["command"]
    return cmd[-1] if cmd[0] == "sh" else " ".join(cmd)


def test_compose_redis_has_no_single_point_of_failure_and_two_media_servers() -> None:
    """The structure issue 21 asks for: a primary and a replica under the same ACL file and
    limits, three Sentinels (quorum 2) that log in from the `acl` service's file, two media
    servers, every cloudq service on a Sentinel URL the `acl` service writes, central on both
    media servers; no password in any long-running service's command or environment."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    acl_cmd = _shell(services["acl"])
    server_url = acl_cmd.split("--server-url ", 1)[1].split()[0]
    assert server_url.startswith("redis+sentinel://") and server_url.endswith("/cloudq/0")
    sentinel_hosts = server_url.split("//", 1)[1].split("/", 1)[0].split(",")
    assert len(sentinel_hosts) == 3
    for opt in (
        "--url-dir /urls",
        "--replication-conf /acl/replication.conf",
        "--sentinel-conf /acl/sentinel-auth.conf",
    ):
        assert opt in acl_cmd
    # each Sentinel in the URL is a service publishing that port
    for i, hp in enumerate(sentinel_hosts, 1):
        s = services[f"sentinel{i}"]
        port = hp.rsplit(":", 1)[1]
        assert (
            hp.startswith(f"${{CLOUDQ_SENTINEL{i}_HOST:-sentinel{i}}}:") and s["environment"]["PORT"] == port
        )
        assert any(p.endswith(f":{port}:{port}") for p in s["ports"])
        line = _shell(s)
        for conf in ("sentinel resolve-hostnames yes", "sentinel announce-hostnames yes",
                     "sentinel monitor cloudq ${CLOUDQ_REDIS1_HOST:-redis1} 6379 2",
                     "sentinel down-after-milliseconds cloudq 1000"):  # fmt: skip
            assert conf in line, f"sentinel{i}: {conf}"
        # the auth lines come after the monitor line they refer to
        assert line.index("include /acl/sentinel-auth.conf") > line.index("sentinel monitor")
        assert "--sentinel" in line and "acl:/acl:ro" in s["volumes"]
    data = {n: _shell(services[n]) for n in ("redis1", "redis2")}
    media = {n: _shell(services[n]) for n in ("media1", "media2")}
    limits = ("--aclfile /acl/users.acl", "--proto-max-bulk-len 5mb", "--client-query-buffer-limit 32mb",
              "--maxmemory-clients 256mb", "--maxmemory-policy noeviction", "--maxmemory ",
              '--client-output-buffer-limit "normal 64mb 32mb 60 replica 256mb 64mb 60 pubsub 32mb 8mb 60"')  # fmt: skip
    for name, line in {**data, **media}.items():
        for opt in limits:
            assert opt in line, f"{name}: {opt}"
    for name, line in data.items():
        for opt in ("--appendonly yes", "--notify-keyspace-events Ex", "--include /acl/replication.conf"):
            assert opt in line, f"{name}: {opt}"
        # replication.conf last: the password in it wins over one CONFIG REWRITE left in redis.conf
        assert line.rstrip().endswith("--include /acl/replication.conf")
    assert services["redis2"]["environment"]["INITIAL"] == "replicaof ${CLOUDQ_REDIS1_HOST:-redis1} 6379"
    assert services["redis1"]["environment"]["PORT"] == "6379"
    for name, line in media.items():
        assert "--appendonly no" in line, name
    # central on both media servers, by address only (its own user is used there)
    central = services["central"]["command"]
    media_urls = [central[i + 1] for i, a in enumerate(central) if a == "--media-url"]
    assert len(media_urls) == 2
    for i, url in enumerate(media_urls, 1):
        port = services[f"media{i}"]["environment"]["PORT"]
        assert url == f"redis://${{CLOUDQ_MEDIA{i}_HOST:-media{i}}}:{port}/0"
    # every cloudq service reads its own role's URL file (written by the acl service) and nothing else
    for name in CLOUDQ_SERVICES:
        svc = services[name]
        assert svc["environment"]["CLOUDQ_REDIS_URL_FILE"] == "/run/cloudq/redis.url"
        assert f"url-{name}:/run/cloudq:ro" in svc["volumes"], name
        assert f"url-{name}:/urls/{name}" in services["acl"]["volumes"], name
        assert svc["depends_on"]["acl"]["condition"] == "service_completed_successfully"
    # no password anywhere but the one-shot acl service's environment
    for name, svc in services.items():
        text = yaml.safe_dump({k: svc.get(k) for k in ("command", "environment", "healthcheck")})
        if name != "acl":
            assert "PASSWORD" not in text and "masterauth" not in text and "auth-pass" not in text, name


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


def test_compose_redis_commands_replicate_fail_over_and_serve_media(tmp_path) -> None:
    """The compose file's own commands for the data servers, Sentinels, media servers and the
    `acl` service, as `docker-compose config` resolves them (every host name set to 127.0.0.1),
    run here with the embedded Valkey binary in place of the redis:7.2 image's redis-server
    (its paths under tmp_path, free ports): the replica follows the primary, the Sentinels log in
    and find each other, a role's URL file reaches the primary and a media server, and after
    `kill -9` of the primary the same URL reaches the promoted replica; the old primary restarted
    with its command comes back as a replica. (The image, its entrypoint and Docker's networking
    are not exercised: there is no Docker engine here.)"""
    import os
    import re
    import shlex
    import shutil
    import signal
    import time

    import redis
    from helpers import missing_prerequisite

    from cloudq.connection import connect
    from cloudq.embedded import free_port, server_binary
    from cloudq.procs import die_with_parent
    from cloudq.secretfile import read_secret

    exe = shutil.which("docker-compose")
    if exe is None:
        missing_prerequisite("docker-compose is not installed (apt: docker-compose); .ci/run installs it")
    names = ("REDIS1", "REDIS2", "SENTINEL1", "SENTINEL2", "SENTINEL3", "MEDIA1", "MEDIA2")
    env = {**os.environ, **COMPOSE_ENV, **{f"CLOUDQ_{n}_HOST": "127.0.0.1" for n in names}}
    env["CLOUDQ_ACL_NODE_PASSWORD"] = "n0de"
    out = subprocess.run([exe, "-f", "docker-compose.yml", "config"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout.replace("$$", "$"))["services"]
    ports = {p: free_port() for p in (6379, 6380, 6381, 6382, 26379, 26380, 26381)}

    def local(text: str, data: str) -> str:
        for p, q in ports.items():
            text = re.sub(rf"\b{p}\b", str(q), text)
        text = text.replace("docker-entrypoint.sh redis-server", shlex.quote(str(server_binary())))
        text = text.replace("/acl/", f"{tmp_path}/acl/").replace("/urls", f"{tmp_path}/urls")
        return text.replace("/data/", f"{data}/").replace("dir /data", f"dir {data}")

    acl_line = local(_shell(services["acl"]), "")
    acl_line = acl_line.replace("cloudq acl print", shlex.join([*cloudq_command(), "acl", "print"]))
    acl_line = acl_line.split(" && chown")[0]
    (tmp_path / "acl").mkdir()
    done = subprocess.run(["sh", "-c", acl_line], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr

    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str) -> None:
        data = tmp_path / name
        data.mkdir(exist_ok=True)
        svc = services[name]
        line = local(_shell(svc), str(data)) + " --bind 127.0.0.1"
        svc_env = {k: local(str(v), str(data)) for k, v in (svc.get("environment") or {}).items()}
        with open(data / "out.log", "ab") as log:
            procs[name] = subprocess.Popen(
                ["sh", "-c", line], cwd=data, env={"PATH": os.environ["PATH"], **svc_env},
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=die_with_parent(),
            )  # fmt: skip

    def client(name: str, **kw: object) -> redis.Redis:
        port = ports[int(services[name]["environment"]["PORT"])]
        return redis.Redis(port=port, socket_timeout=2, **kw)  # type: ignore[arg-type]

    admin_pw = COMPOSE_ENV["CLOUDQ_ACL_ADMIN_PASSWORD"]

    def until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                if cond():
                    return
            except redis.RedisError as exc:
                last = exc
            assert time.monotonic() < end, f"{what} (last error {last!r}; logs in {tmp_path})"
            time.sleep(0.1)

    try:
        for name in ("redis1", "redis2", "media1", "media2", "sentinel1", "sentinel2", "sentinel3"):
            start(name)
        r2 = client("redis2", username="cloudq-admin", password=admin_pw)
        until(lambda: r2.info("replication")["master_link_status"] == "up", 15, "redis2 replicates redis1")
        sentinels = [client(f"sentinel{i}", decode_responses=True) for i in (1, 2, 3)]

        def all_see_all() -> bool:
            for s in sentinels:
                m = s.sentinel_master("cloudq")
                if m["flags"] != "master" or m["num-slaves"] != 1 or m["num-other-sentinels"] != 2:
                    return False
            return True

        until(all_see_all, 20, "every Sentinel sees the primary, its replica and the other two")
        url = read_secret(str(tmp_path / "urls" / "node" / "redis.url"))
        assert url.startswith("redis+sentinel://cloudq-node:n0de@127.0.0.1:")
        node = connect(url, socket_timeout=2)
        node.hset("cloudq:node:x", "state", "free")
        media = client("media1", username="cloudq-node", password="n0de")
        media.xadd("cloudq:session:{s1}:video", {"f": b"x"})
        assert client("media2").ping() and int(media.config_get("maxmemory")["maxmemory"]) > 0

        procs["redis1"].send_signal(signal.SIGKILL)  # sh exec'd the server: this is the server
        procs["redis1"].wait()
        before = time.monotonic()
        until(lambda: connect(url, socket_timeout=2).hset("cloudq:node:x", "state", "busy") == 0, 30,
              "the role URL writes to the promoted replica")  # fmt: skip
        assert r2.info("replication")["role"] == "master" and time.monotonic() - before < 30
        assert "replicaof" not in (tmp_path / "redis2" / "redis.conf").read_text().lower()  # rewritten
        start("redis1")
        r1 = client("redis1", username="cloudq-admin", password=admin_pw)
        until(lambda: r1.info("replication")["role"] == "slave" and r1.hget("cloudq:node:x", "state") == b"busy",
              30, "the old primary, restarted, follows the new one")  # fmt: skip
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
