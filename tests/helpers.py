"""Test helpers: bounded waits on conditions, and real cloudq processes that are always cleaned up."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest
import redis

from cloudq.central.auth import Users
from cloudq.keys import Keys
from cloudq.procs import ProcessGroup
from cloudq.settings import Settings


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)


def missing_prerequisite(reason: str, module: bool = False) -> NoReturn:
    """A program or package a test needs is not here: skip, saying why; but in CI (``CI=true``,
    which CI services set) every test must run, so there it is a failure (``module``: called
    at import time, where a failure fails the module's collection)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} [CI=true: a missing prerequisite fails]", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def clock_args(**kw: float) -> list[str]:
    args: list[str] = []
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


class Procs(ProcessGroup):
    """The suite's harness: ``cloudq -v`` children logging into the test's directory, each test
    with its own store and workspaces, and headless clients."""

    def __init__(self, redis_url: str, prefix: str, log_dir: str, urls: dict[str, str] | None = None) -> None:
        # every child reads its URL from a 0600 file, as under `cloudq up`: none is in its environment
        url_dir = os.path.join(log_dir, "urls")
        super().__init__(redis_url, prefix, log_dir, global_args=("-v",), urls=urls, url_dir=url_dir)

    def env(self, **extra: str) -> dict[str, str]:
        assert self.log_dir is not None
        env = super().env(
            # each test its own user-data store and node workspaces
            CLOUDQ_STORE=os.path.join(self.log_dir, "store"),
            CLOUDQ_WORKSPACE=os.path.join(self.log_dir, "workspace"),
            CLOUDQ_HEADLESS="1",  # `connect` opens no window unless a test asks for one
            CLOUDQ_BCRYPT_COST="4",  # the tests' users are made at cost 4: so is the dummy hash
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
        env.update(extra)
        return env

    def central(self, **clocks: float) -> subprocess.Popen[bytes]:
        return self.start("central", *clock_args(**clocks))

    def node(
        self, node_id: str, host: str = "h1", app: str = "paint", *extra: str
    ) -> subprocess.Popen[bytes]:
        return self.start("node", "--id", node_id, "--host", host, "--app", app, *extra)

    def worker(self, host: str = "h1") -> subprocess.Popen[bytes]:
        return self.start("worker", "--host", host)


def events(r: redis.Redis, keys: Keys, obj: str) -> list[dict[str, str]]:
    """The events stream's entries about ``obj`` (``session:s1``, ``node:n1``, ``user:bob``), in order."""
    return [
        {k.decode(): v.decode() for k, v in f.items()}
        for _, f in r.xrange(keys.events)
        if f[b"obj"].decode() == obj
    ]


def node_state(r: redis.Redis, keys: Keys, node: str) -> str:
    return (r.hget(keys.node(node), "state") or b"").decode()


def session_field(r: redis.Redis, keys: Keys, sid: str, field: str = "state") -> str:
    return (r.hget(keys.session(sid), field) or b"").decode()


def publish(r: redis.Redis, keys: Keys, **kw: float) -> Settings:
    s = Settings(**kw)
    s.publish(r, keys)
    return s


# Test clocks: sub-second to a few seconds, so nothing waits for minutes.
FAST = dict(
    heartbeat_interval=0.2,
    heartbeat_ttl=0.8,
    idle_timeout=1.5,
    grace=2.0,
    idle_close=0,
    max_session=0,
    max_warning=0,
    node_ttl=1.0,
    job_lease=5.0,
    autosave=0,
)


ROLE_OF = {"central": "central", "node": "node", "worker": "worker", "gateway": "gateway", "connect": "login"}
"""Which role's Redis URL (``setup_acl``) each command :class:`Procs` starts connects with."""


@dataclass
class Pool:
    central: subprocess.Popen[bytes]
    nodes: list[subprocess.Popen[bytes]]
    worker: subprocess.Popen[bytes]


def start_pool(
    r: redis.Redis,
    keys: Keys,
    procs: Procs,
    nodes: int = 1,
    app: str = "paint",
    node_args: tuple[str, ...] = (),
    users: tuple[str, ...] = ("alice", "bob", "carol"),
    **clocks: float,
) -> Pool:
    """A central server, nodes n1..nN on host h1, one worker, and users (password ``pw``)."""
    clk = {**FAST, **clocks}
    publish(r, keys, **clk)  # so nodes that start before the central server read the same clocks
    central = procs.central(**clk)
    node_procs = [procs.node(f"n{i + 1}", "h1", app, *node_args) for i in range(nodes)]
    worker = procs.worker()
    wait_for(lambda: r.zcard(keys.pool) == nodes, 20, what="nodes registered")
    for u in users:
        Users(r, keys).add(u, "pw", cost=4)
    return Pool(central, node_procs, worker)


def assert_no_secret_in_proc(root: int, url_dir: str, roles: tuple[str, ...]) -> None:
    """No process in ``root``'s tree has a password of the URLs in ``url_dir/<role>.url`` (each
    a 0600 file) in its ``/proc/<pid>/cmdline`` or ``/proc/<pid>/environ``."""
    from urllib.parse import unquote, urlsplit

    from cloudq.procstat import process_tree
    from cloudq.secretfile import read_secret

    secrets = {}
    for role in roles:
        password = urlsplit(read_secret(os.path.join(url_dir, f"{role}.url"))).password
        assert password, f"{role}.url has no password"
        secrets[role] = unquote(password).encode()
    pids = process_tree(root)
    assert len(pids) > len(roles), pids  # the harness, the server and every role's process
    for pid in pids:
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as fh:
                    text = fh.read()
            except OSError:
                continue  # ended meanwhile
            for role, password in secrets.items():
                shown = text.replace(password, b"<password>")[:160]  # the failure does not print it
                assert password not in text, f"{role}'s password in /proc/{pid}/{what}: {shown!r}"


@contextlib.contextmanager
def desktop(size: str = "640x480") -> Iterator[str]:
    """A virtual X display (Xvfb) standing for the user's desktop; yields its name (``:N``)."""
    rfd, wfd = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(wfd), "-screen", "0", f"{size}x24", "-nolisten", "tcp"],
        pass_fds=(wfd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(wfd)
    try:
        with os.fdopen(rfd) as fh:
            number = fh.readline().strip()  # Xvfb writes its display number once it is ready
        if not number:
            missing_prerequisite("Xvfb could not start a display")
        yield f":{number}"
    finally:
        xvfb.terminate()
        try:
            xvfb.wait(10)
        except subprocess.TimeoutExpired:
            xvfb.kill()
            xvfb.wait(10)
