"""Identity authentication: users with bcrypt hashes, lockout, bearer tokens.

Only the central server reads password hashes. Tokens are random (256 bits from
``secrets``); Redis stores only their SHA-256, as a key with a TTL.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import bcrypt
import redis

from cloudq import credentials
from cloudq.central import acl
from cloudq.keys import Keys
from cloudq.messages import USER_NAME
from cloudq.settings import Settings
from cloudq.tokens import hash_token, new_token, same_token

log = logging.getLogger(__name__)

__all__ = [
    "AuthError",
    "NoSuchUser",
    "UserExists",
    "Users",
    "hash_token",
    "new_token",
    "same_token",
    "token_user",
]

MAX_PASSWORD_BYTES = 72  # bcrypt's limit; bcrypt 5 raises beyond it
DEFAULT_COST = 12


@functools.cache
def dummy_hash(cost: int) -> bytes:
    """Checked when the user does not exist (or the password cannot be checked), at the same
    cost as real hashes, so an unknown name answers no faster than a known one. Made once per
    cost, on first use."""
    return bcrypt.hashpw(b"cloudq-dummy", bcrypt.gensalt(cost))


@dataclass(frozen=True)
class Found:
    """A user name looked up for a login (:meth:`Users.lookup`); ``stored`` None: no such user."""

    locked: bool
    stored: bytes | None
    disabled: bool


class AuthError(Exception):
    """A user-facing authentication error (the message is safe to show)."""


class UserExists(AuthError):
    pass


class NoSuchUser(AuthError):
    pass


def check_name(name: str) -> None:
    if not USER_NAME.match(name):
        raise AuthError("user names are 1-64 characters of letters, digits and _ . @ -")


def check_password(password: str) -> bytes:
    raw = password.encode()
    if not raw:
        raise AuthError("the password is empty")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise AuthError(f"the password is {len(raw)} bytes; bcrypt accepts at most {MAX_PASSWORD_BYTES}")
    return raw


class Users:
    """``cost``: the bcrypt cost of new hashes and of the dummy hash for unknown users (keep it
    equal to the cost the stored hashes were made with: ``--bcrypt-cost``)."""

    def __init__(self, r: redis.Redis, keys: Keys, cost: int = DEFAULT_COST) -> None:
        self.r = r
        self.keys = keys
        self.cost = cost

    def revoke(self, name: str) -> None:
        """End every grant the user holds: tokens (session and queue) and their Redis users,
        whose connections are cut. The session itself lapses (heartbeat, grace) and is saved."""
        h = self.r.hmget(self.keys.user(name), "session", "qtoken")
        sid, qtoken = ((v or b"").decode() for v in h)
        if qtoken:
            self.r.delete(self.keys.token(qtoken))
        if sid:
            th = (self.r.hget(self.keys.session(sid), "token") or b"").decode()
            if th:
                self.r.delete(self.keys.token(th))
            self.r.hdel(self.keys.session(sid), "acl")
        if not credentials.supported(self.r):
            return
        for user in ([acl.session_acl_user(sid)] if sid else []) + [acl.queue_acl_user(name)]:
            try:
                acl.drop_user(self.r, user)
            except redis.ResponseError as exc:  # e.g. run with a user that may not manage ACLs
                log.warning("could not delete Redis user %s: %s", user, exc)

    def add(self, name: str, password: str, cost: int | None = None) -> None:
        check_name(name)
        pw = bcrypt.hashpw(check_password(password), bcrypt.gensalt(cost or self.cost))
        if not self.r.hsetnx(self.keys.user(name), "hash", pw):
            raise UserExists(f"user {name!r} already exists")
        self.r.hset(self.keys.user(name), mapping={"created": f"{time.time():.3f}", "disabled": "0"})
        self.r.sadd(self.keys.users, name)

    def passwd(self, name: str, password: str, cost: int | None = None) -> None:
        check_name(name)
        pw = bcrypt.hashpw(check_password(password), bcrypt.gensalt(cost or self.cost))
        if not self.r.hexists(self.keys.user(name), "hash"):
            raise NoSuchUser(f"no user {name!r}")
        self.r.hset(self.keys.user(name), "hash", pw)
        self.r.delete(self.keys.user_lock(name), self.keys.user_fails(name))
        self.revoke(name)

    def delete(self, name: str) -> str:
        """Delete the account in one step (``delete_user.lua``): its tokens are revoked and a
        live session closes (its data saved first). Returns that session's id ('' if none)."""
        from cloudq.state import StateMachine

        self.revoke(name)  # tokens and their Redis users first (their connections are cut)
        status, sid = StateMachine(self.r, self.keys).delete_user(name)
        if status == "unknown":
            raise NoSuchUser(f"no user {name!r}")
        return sid

    def list(self) -> list[dict[str, str]]:
        out = []
        for name in sorted(n.decode() for n in self.r.smembers(self.keys.users)):
            h = self.r.hgetall(self.keys.user(name))
            out.append(
                {
                    "user": name,
                    "created": h.get(b"created", b"").decode(),
                    "disabled": h.get(b"disabled", b"0").decode(),
                    "session": h.get(b"session", b"").decode(),
                    "locked": "1" if self.r.exists(self.keys.user_lock(name)) else "0",
                }
            )
        return out

    def verify(self, name: str, password: str, settings: Settings) -> str:
        """Check credentials; returns "" on success, else a user-facing error code.

        Codes: ``invalid`` (unknown user, wrong or over-long password — all alike), ``locked``,
        and ``disabled`` (only after the right password: it reveals nothing to a guesser).
        Failures count per user name in a window, existing or not, so the answer never reveals
        whether a user exists. The central server does the same in steps (:meth:`lookup`, the
        check on its bcrypt budget, :meth:`conclude`); this is the one-call form.
        """
        found = self.lookup(name)
        if found.locked:
            return "locked"
        try:
            ok = bcrypt.checkpw(password.encode(), found.stored or dummy_hash(self.cost))
        except ValueError:  # over 72 bytes (bcrypt 5), or a damaged stored hash
            bcrypt.checkpw(b"x", dummy_hash(self.cost))
            ok = False
        return self.conclude(name, found, ok and found.stored is not None, settings)

    def lookup(self, name: str) -> Found:
        """What a login needs before the password check: lock, stored hash, disabled flag."""
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(self.keys.user_lock(name))
        pipe.hmget(self.keys.user(name), "hash", "disabled")
        locked, (stored, disabled) = pipe.execute()
        return Found(bool(locked), stored, disabled == b"1")

    def conclude(self, name: str, found: Found, ok: bool, settings: Settings) -> str:
        """After the check: "" (logged in), ``disabled``, or a counted failure (``invalid`` or
        ``locked``)."""
        if ok:
            self.r.delete(self.keys.user_fails(name))
            return "disabled" if found.disabled else ""
        return self._count_failure(name, settings)

    def _count_failure(self, name: str, settings: Settings) -> str:
        if not settings.lockout_limit:
            return "invalid"
        fk = self.keys.user_fails(name)
        pipe = self.r.pipeline()
        pipe.incr(fk)
        pipe.pttl(fk)
        fails, pttl = pipe.execute()
        if pttl < 0 and settings.lockout_window:
            self.r.pexpire(fk, int(settings.lockout_window * 1000))
        if fails >= settings.lockout_limit:
            if settings.lockout_time:
                self.r.set(self.keys.user_lock(name), "1", px=int(settings.lockout_time * 1000))
            self.r.delete(fk)
            log.warning("login: %s locked after %d failures", name, fails)
            return "locked"
        return "invalid"


def token_user(r: redis.Redis, keys: Keys, token: str) -> str | None:
    """The user a bearer token belongs to, or None if it is unknown, expired or revoked."""
    if not token or len(token) > 128:
        return None
    th = hash_token(token)
    user = r.get(keys.token(th))
    return user.decode() if user is not None else None
