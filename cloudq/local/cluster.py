"""Everything on one machine: embedded Redis, central, nodes, workers as child processes.

On the embedded server the ACL users of :mod:`cloudq.central.acl` are created at start (random role
passwords) and every child connects as its role's user; ``--no-acl`` skips that (clients are
trusted, and every process says so). ``redis_url`` is then the administrator's URL and
``client_url`` the public one ``cloudq connect`` uses.

No child gets a password in its command line or environment: each reads its role's URL from
its own 0600 file in the run directory (``CLOUDQ_REDIS_URL_FILE``; ``admin.url`` there is the
operator's). The embedded server starts with no password at all (its ``default`` user is
given the login user's rights once the role users exist) and its ``maxmemory`` is sized for
one session per node (:func:`cloudq.embedded.maxmemory_for`) unless given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

import redis

from cloudq.central import acl
from cloudq.connection import connect
from cloudq.embedded import EmbeddedServer, maxmemory_for
from cloudq.keys import Keys
from cloudq.local.ha import EmbeddedHA
from cloudq.procs import ProcessGroup
from cloudq.settings import Settings

log = logging.getLogger(__name__)


def _clock_args(settings: Settings) -> list[str]:
    args = []
    for name, value in settings.__dict__.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def setup_acl(url: str, keys: Keys, passwords: acl.Passwords | None = None) -> dict[str, str]:
    """Create cloudq's ACL users on a fresh server reached as ``default`` at ``url``; returns
    each role's URL (``admin``, ``central``, ``node``, ``worker``, ``gateway``, ``login``)."""
    passwords = passwords or acl.Passwords()
    r = redis.Redis.from_url(url)
    try:
        acl.apply_static(r, keys, passwords)
    finally:
        r.close()
    return acl.role_urls(url, passwords)


class Cluster:
    """Starts the processes of one cloudq deployment; stops all of them on exit."""

    def __init__(
        self,
        redis_url: str | None = None,
        prefix: str = "cloudq:",
        nodes: int = 2,
        workers: int = 1,
        app: str = "paint",
        settings: Settings | None = None,
        host: str = "local",
        extra_env: dict[str, str] | None = None,
        data_dir: str | None = None,
        use_acl: bool = True,
        maxmemory: int | None = None,
        replicas: int = 0,
        sentinels: int = 0,
        sentinel_down_after_ms: int = 1000,
        media_servers: int = 0,
    ) -> None:
        self.server: EmbeddedServer | None = None
        self.n_media = media_servers
        self.media: list[EmbeddedServer] = []
        """Embedded media servers (``cloudq.media``): sessions' streams, spread over them."""
        self.ha: EmbeddedHA | None = None
        """With ``replicas`` and ``sentinels``: the primary, its replicas and the Sentinels."""
        self.replicas, self.sentinels = replicas, sentinels
        self.sentinel_down_after_ms = sentinel_down_after_ms
        self.maxmemory = maxmemory_for(nodes) if maxmemory is None else maxmemory
        """Of the embedded server, in bytes (0: no limit)."""
        self.run_dir = ""
        """Where the children's URL files are (``<data dir>/run``, or a temporary directory)."""
        self.data_dir = data_dir
        self.redis_url = redis_url or ""
        self.client_url = self.redis_url
        self.urls: dict[str, str] = {}
        """Each role's URL (``cloudq.central.acl.role_urls``) when this cluster created the ACL users."""
        self.use_acl = use_acl
        self.prefix = prefix
        self.n_nodes = nodes
        self.n_workers = workers
        self.app = app
        self.settings = settings or Settings()
        self.host = host
        self.extra_env = dict(extra_env or {})
        if data_dir:
            # users' saved data and the nodes' workspaces live beside the server's AOF
            root = os.path.abspath(data_dir)
            self.extra_env.setdefault("CLOUDQ_STORE", os.path.join(root, "store"))
            self.extra_env.setdefault("CLOUDQ_WORKSPACE", os.path.join(root, "workspace"))
        self.group = ProcessGroup(env=self.extra_env)

    def _passwords(self) -> acl.Passwords:
        """The role users' passwords: random, and with a data dir kept there (mode 0600), so the
        URLs stay the same across restarts of ``cloudq up --data-dir``."""
        if not self.data_dir:
            return acl.Passwords()
        path = os.path.join(self.data_dir, "acl-passwords.json")
        try:
            with open(path) as fh:
                return acl.Passwords(dict(json.load(fh)))
        except (OSError, ValueError, TypeError):
            pw = acl.Passwords()
            os.makedirs(self.data_dir, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(pw.given, fh)
            return pw

    def spawn(self, name: str, *args: str) -> None:
        self.group.start(*args, name=name)

    def admin_url_file(self) -> str:
        """A 0600 file holding :attr:`redis_url`, for the operator's ``cloudq`` commands."""
        return self.group.url_file("admin")

    def start(self) -> Cluster:
        central_args: list[str] = []
        if self.data_dir:
            self.run_dir = os.path.join(os.path.abspath(self.data_dir), "run")
        else:
            self.run_dir = tempfile.mkdtemp(prefix="cloudq-up-")  # mode 0700
        self.group.url_dir = self.run_dir
        if not self.redis_url and self.sentinels:
            self.ha = EmbeddedHA(
                self.replicas,
                self.sentinels,
                Keys(self.prefix),
                self.maxmemory,
                down_after_ms=self.sentinel_down_after_ms,
            ).start()
            self.server = self.ha.primary
            urls = self.urls = self.ha.role_urls()
            self.redis_url, self.client_url = urls["admin"], urls["login"]
            self.group.urls = {"central": urls["central"], "node": urls["node"], "worker": urls["worker"]}
        elif not self.redis_url:
            redis_dir = os.path.join(self.data_dir, "redis") if self.data_dir else None
            self.server = EmbeddedServer(data_dir=redis_dir, maxmemory=self.maxmemory).start()
            self.redis_url = self.client_url = self.server.url
            if self.use_acl:
                urls = self.urls = setup_acl(self.server.url, Keys(self.prefix), self._passwords())
                self.redis_url, self.client_url = urls["admin"], urls["login"]
                self.group.urls = {"central": urls["central"], "node": urls["node"], "worker": urls["worker"]}
        if not self.use_acl:
            central_args.append("--no-acl")
        for _ in range(self.n_media):
            m = EmbeddedServer(maxmemory=self.maxmemory).start()
            self.media.append(m)
            if self.urls:  # the same role users (and passwords) as the main server: a shared ACL file
                setup_acl(m.url, Keys(self.prefix), acl.passwords_of(self.urls))
            central_args += ["--media-url", m.url]
        self.group.redis_url, self.group.prefix = self.redis_url, self.prefix
        self.spawn("central", "central", *central_args, *_clock_args(self.settings))
        # nodes read the published settings: wait for the central server to publish them
        r = connect(self.redis_url)
        deadline = time.monotonic() + 15
        while not r.exists(f"{self.prefix}settings"):
            if time.monotonic() > deadline or self.group.names["central"].poll() is not None:
                self.stop()
                raise RuntimeError("the central server did not start")
            time.sleep(0.05)
        r.close()
        for i in range(self.n_workers):
            self.spawn(f"worker{i + 1}", "worker", "--host", self.host)
        for i in range(self.n_nodes):
            self.spawn(f"node{i + 1}", "node", "--id", f"node{i + 1}", "--host", self.host, "--app", self.app)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.group.stop_all(timeout)
        if self.ha:
            self.ha.stop()
            self.ha = None
        elif self.server:
            self.server.stop()
        self.server = None
        for m in self.media:
            m.stop()
        self.media = []
        if self.run_dir and not self.data_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir = ""

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
