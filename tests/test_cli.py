"""The command line as a user meets it: one clear line per failure, distinct exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import redis
from helpers import Procs, assert_no_secret_in_proc, start_pool, wait_for

from cloudq.embedded import free_port, maxmemory_for
from cloudq.keys import Keys
from cloudq.procs import cloudq_command


def test_user_add_reads_the_password_from_stdin_and_refuses_long_ones(r: redis.Redis, procs: Procs) -> None:
    out = procs.run("user", "add", "alice", "--password-stdin", "--bcrypt-cost", "4", stdin=b"pw\n")
    assert out.returncode == 0, out.stderr
    out = procs.run("user", "add", "bob", "--password-stdin", stdin=b"x" * 100 + b"\n")
    assert out.returncode == 1 and "at most 72" in out.stderr and "Traceback" not in out.stderr
    out = procs.run("user", "add", "alice", "--password-stdin", "--bcrypt-cost", "4", stdin=b"pw\n")
    assert out.returncode == 1 and "already exists" in out.stderr
    out = procs.run("user", "list", "--json")
    assert [u["user"] for u in json.loads(out.stdout)] == ["alice"]
    assert procs.run("user", "del", "alice").returncode == 0
    assert procs.run("user", "del", "alice").returncode == 1


def _pool(r: redis.Redis, keys: Keys, procs: Procs, **clocks: float) -> None:
    start_pool(r, keys, procs, 1, "paint", ("--size", "160x120"), users=(), **clocks)
    out = procs.run("user", "add", "alice", "--password-stdin", "--bcrypt-cost", "4", stdin=b"pw\n")
    assert out.returncode == 0, out.stderr


def test_connect_runs_a_session_and_logs_out_at_the_end(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    _pool(r, keys, procs)
    out = procs.run("connect", "--user", "alice", "--password-stdin", "--duration", "1.5", stdin=b"pw\n")
    assert out.returncode == 0, out.stderr
    assert re.search(r"session s1 on node n1", out.stderr)
    wait_for(lambda: r.hget(keys.session("s1"), "state") == b"closed", 10)
    assert r.hget(keys.session("s1"), "close_reason") == b"logout"


def test_connect_failures_are_one_line_with_distinct_exit_codes(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    _pool(r, keys, procs, lockout_limit=2)
    wrong = procs.run("connect", "--user", "alice", "--password-stdin", "--duration", "1", stdin=b"nope\n")
    assert wrong.returncode == 3 and wrong.stderr.strip() == "cloudq: invalid credentials"
    locked = procs.run("connect", "--user", "alice", "--password-stdin", "--duration", "1", stdin=b"nope\n")
    assert (
        locked.returncode == 4 and "locked" in locked.stderr and len(locked.stderr.strip().splitlines()) == 1
    )
    env = {**os.environ, "CLOUDQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    down = subprocess.run(
        [*cloudq_command(), "connect", "--user", "alice", "--password-stdin"],
        input="pw\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (
        down.returncode == 5 and "Traceback" not in down.stderr and len(down.stderr.strip().splitlines()) == 1
    )


def test_connect_says_why_the_server_closed_the_session(r: redis.Redis, keys: Keys, procs: Procs) -> None:
    _pool(r, keys, procs, max_session=1.0, max_warning=0, idle_timeout=0)
    out = procs.run("connect", "--user", "alice", "--password-stdin", "--duration", "20", stdin=b"pw\n")
    assert out.returncode == 6
    assert "maximum session length" in out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr


def test_up_starts_everything_prints_the_url_and_cleans_up(tmp_path) -> None:
    p = subprocess.Popen(
        [*cloudq_command(), "up", "--nodes", "2", "--duration", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env={**os.environ, "CLOUDQ_STORE": str(tmp_path / "s"), "CLOUDQ_WORKSPACE": str(tmp_path / "w")},
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        url = re.search(r"CLOUDQ_REDIS_URL=(\S+)", line).group(1)
        r = redis.Redis.from_url(url)
        wait_for(lambda: r.zcard("cloudq:pool") == 2, 30, what="two nodes in the pool")
        # the embedded server's memory is bounded, sized for one session per node
        assert int(r.config_get("maxmemory")["maxmemory"]) == maxmemory_for(2)
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        # no password in the command line or environment of anything `cloudq up` started
        admin_file = next(
            m.group(1) for line in p.stdout if (m := re.search(r"CLOUDQ_REDIS_URL_FILE=(\S+)", line))
        )
        run_dir = os.path.dirname(admin_file)
        assert_no_secret_in_proc(p.pid, run_dir, roles=("admin", "central", "node", "worker"))
        st = subprocess.run(
            [*cloudq_command(), "status", "--json", "--redis-url-file", admin_file],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert {n["id"] for n in json.loads(st.stdout)["nodes"]} == {"node1", "node2"}
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(30) == 0
        try:
            r.ping()
            alive = True
        except redis.ConnectionError:
            alive = False
        assert not alive, "the embedded server was stopped"
        assert not os.path.exists(run_dir), "the URL files were removed"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_bench_json_is_strict_json_with_null_for_missing_figures(procs: Procs, tmp_path) -> None:
    from cloudq.bench.report import json_safe

    assert json_safe({"p99": float("inf"), "xs": [float("nan"), 1.5]}) == {"p99": None, "xs": [None, 1.5]}
    out = procs.run("bench", "data", "--sizes", "0.05", "--workdir", str(tmp_path), "--json", timeout=120)
    assert out.returncode == 0, out.stderr

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    doc = json.loads(out.stdout, parse_constant=refuse)
    assert "null_means" in doc and doc["sizes"]
    assert not (tmp_path / "BENCHMARKS.md").exists() and not os.path.exists("BENCHMARKS.md.tmp")


def test_acl_print_writes_sentinel_urls_and_the_replication_and_sentinel_auth_files(
    tmp_path, procs: Procs
) -> None:
    """What docker-compose.yml's `acl` service writes, used as the file uses it: a replica that
    follows its primary under the ACL file by `include` of the replication file, a Sentinel that
    monitors them with the auth file included after its `sentinel monitor`, and a role's
    `redis+sentinel://` URL (from --server-url) that reaches the primary through the Sentinel."""
    import stat
    import time

    from cloudq.connection import connect
    from cloudq.embedded import EmbeddedServer, server_binary
    from cloudq.procs import die_with_parent
    from cloudq.secretfile import read_secret

    sport = free_port()
    server_url = f"redis+sentinel://127.0.0.1:{sport},127.0.0.1:{free_port()}/cloudq/0"
    pw = {"admin": 'adm/n@1 "q" é\\', "central": "c", "node": "n0de", "worker": "w", "gateway": "g"}
    env = {f"CLOUDQ_ACL_{k.upper()}_PASSWORD": v for k, v in pw.items()}
    files = {name: str(tmp_path / name) for name in ("users.acl", "replication.conf", "sentinel-auth.conf")}
    out = subprocess.run(
        [*cloudq_command(), "acl", "print", "--out", files["users.acl"], "--url-dir", str(tmp_path / "urls"),
         "--server-url", server_url, "--replication-conf", files["replication.conf"],
         "--sentinel-conf", files["sentinel-auth.conf"]],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for path in (*files.values(), str(tmp_path / "urls" / "node" / "redis.url")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    node_url = read_secret(str(tmp_path / "urls" / "node" / "redis.url"))
    assert node_url.startswith("redis+sentinel://cloudq-node:n0de@127.0.0.1:") and node_url.endswith(
        "/cloudq/0"
    )
    assert server_url.split("//")[1] in node_url  # every Sentinel, in order
    assert "masteruser cloudq-admin" in (tmp_path / "replication.conf").read_text()
    assert "sentinel auth-user cloudq cloudq-admin" in (tmp_path / "sentinel-auth.conf").read_text()

    aclfile = ["--aclfile", files["users.acl"]]
    primary = EmbeddedServer(extra_args=[*aclfile, "--include", files["replication.conf"]]).start()
    replica = EmbeddedServer(
        extra_args=[
            *aclfile,
            "--include",
            files["replication.conf"],
            "--replicaof",
            "127.0.0.1",
            str(primary.port),
        ]
    ).start()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sport}\nbind 127.0.0.1\ndir {tmp_path}\nsentinel resolve-hostnames yes\n"
        "sentinel announce-hostnames yes\n"
        f"sentinel monitor cloudq 127.0.0.1 {primary.port} 1\n"
        "sentinel down-after-milliseconds cloudq 1000\n"
        f"include {files['sentinel-auth.conf']}\n"
    )
    sentinel = subprocess.Popen(
        [str(server_binary()), str(conf), "--sentinel"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent(),
    )  # fmt: skip
    try:
        admin = redis.Redis(port=replica.port, username="cloudq-admin", password=pw["admin"])
        wait_for(lambda: admin.info("replication").get("master_link_status") == "up", 15, what="replication")
        s = redis.Redis(port=sport, decode_responses=True)

        def sentinel_sees_both() -> bool:
            try:
                master = s.execute_command("SENTINEL", "MASTER", "cloudq")
                reps = s.execute_command("SENTINEL", "REPLICAS", "cloudq")
            except redis.ConnectionError:
                return False
            return master["flags"] == "master" and len(reps) == 1 and "disconnected" not in reps[0]["flags"]

        wait_for(sentinel_sees_both, 15, what="the Sentinel logged in to the primary and found the replica")
        node = connect(node_url)  # one Sentinel of the two answers: enough to find the primary
        node.hset("cloudq:node:x", "state", "free")
        deadline = time.monotonic() + 10
        while admin.hget("cloudq:node:x", "state") != b"free":
            assert time.monotonic() < deadline, "the write through the Sentinel URL did not replicate"
            time.sleep(0.05)
        node.close()
    finally:
        sentinel.kill()
        sentinel.wait()
        replica.stop()
        primary.stop()
