"""The client's side of Redis ACLs, shared by every role: the public login user, request ids,
credentials that change under a live connection, and the trusted-clients warning.

Who may do what (the rights table) and the creation of users is the central server's
(:mod:`cloudq.central.acl`); this module only names what a client needs to use them.
"""

from __future__ import annotations

import logging
import secrets
import time

import redis

from cloudq.connection import with_credentials
from cloudq.keys import Keys

log = logging.getLogger(__name__)

LOGIN_USER = "cloudq-login"
LOGIN_PASSWORD = "cloudq-login"  # public on purpose: it can only post a login request
TRUSTED_WARNING = (
    "Redis ACLs are OFF: every client holds the full rights of its connection "
    "(it can read other sessions' video, write their input and enqueue jobs); clients are trusted"
)


def new_request_id() -> str:
    """A login/logout request id: 128 random bits, so nobody can guess the reply key."""
    return secrets.token_hex(16)


def supported(r: redis.Redis) -> bool:
    """Whether the server has ACLs (``ACL WHOAMI`` answers)."""
    try:
        r.execute_command("ACL", "WHOAMI")
    except redis.ResponseError as exc:
        return "unknown command" not in str(exc).lower() and "unknown subcommand" not in str(exc).lower()
    return True


def warn_if_trusted(r: redis.Redis, keys: Keys, who: str) -> bool:
    """Log loudly when the deployment runs without ACLs; returns True when it does."""
    try:
        flag = r.hget(keys.settings, "acl")
    except redis.ResponseError:
        return False  # a restricted user: ACLs are evidently on
    if flag == b"0":
        log.warning("%s: %s", who, TRUSTED_WARNING)
        return True
    return False


class Credentials(redis.CredentialProvider):
    """Credentials that can change under a live client: new connections use the current ones
    (a client logging in again gets a new token, hence a new session password)."""

    def __init__(self, username: str = "", password: str = "") -> None:
        self.username = username
        self.password = password

    def set(self, username: str, password: str) -> None:
        self.username, self.password = username, password

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        return (self.username, self.password)


def as_user(r: redis.Redis, creds: Credentials) -> redis.Redis:
    """A client for the same server as ``r`` (same options) that authenticates with ``creds``."""
    return with_credentials(r, credential_provider=creds)


def wait_authenticated(r: redis.Redis, timeout: float) -> None:
    """PING until the credentials work (the central server may be creating the user right now)."""
    end = time.monotonic() + timeout
    while True:
        try:
            r.ping()
            return
        except redis.AuthenticationError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
