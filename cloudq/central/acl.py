"""Who may do what in Redis: every ACL rule cloudq relies on, in one place.

Redis is the only meeting point, so Redis itself enforces the trust boundaries (Redis 7 /
Valkey ACL users with key patterns ``~``, read-only ``%R~``, write-only ``%W~``, pub/sub
channels ``&`` and per-selector command sets ``(...)``). ``P`` below is the key prefix
(default ``cloudq:``); ``K`` is a session's key stem ``P session:{<sid>}``.

Users
-----
``default`` (no password) and ``cloudq-login`` (password ``cloudq-login``, public)
    A client before login. May only ``RPUSH`` onto ``P requests`` (write-only: it cannot read
    other people's requests, which carry passwords) and ``BLPOP``/``LPOP`` a key matching
    ``P reply:*``; plus ``PING``. The reply key is ``reply:<request id>``, and the request id
    is 128 random bits the client draws (:func:`cloudq.credentials.new_request_id`), so nobody else can take a
    reply. Nothing else: no reads of the requests, no KEYS/SCAN/CONFIG/FLUSH*/ACL,
    no pub/sub, no ``rq:*``. A connection without credentials therefore can post a login
    request and read its own answer, and do nothing else. The requests are a list, not a
    stream: there is no entry id to choose (one ``XADD`` of the largest id used to stop every
    later login); an oversized or unreadable entry is dropped unread by the central server
    that takes it (:mod:`cloudq.central.intake`), and ``maxmemory`` bounds a flood.
``cloudq-q-<user>`` (queue user; password derived from the bearer token)
    A client waiting in the queue: ``SET``/``PEXPIRE`` its ``P queued:<user>`` beat
    (write-only), ``BLPOP`` its ``P notify:<token hash>``, ``LPOS`` the queue (its position; it
    can only ask where a given name stands), read ``P settings``. Created by the central server
    when the login is queued, deleted when a node is assigned, on logout and on token expiry.
``cloudq-s-<sid>`` (session user; password derived from the bearer token)
    Exactly what the client's launcher and kernel call: read ``K:video``, ``K:audio``, ``K:clip`` and ``K:fileout`` (``XREAD``,
    ``XREVRANGE``, ``XRANGE``), write ``K:input`` and ``K:files`` (``XADD``, write-only), refresh ``K:hb`` and
    ``K:act`` (``SET``, ``PEXPIRE``, write-only), read ``K`` and ``P settings`` (``HGET``,
    ``HMGET``, ``HGETALL``, read-only); plus ``PING``. Nothing else: not another session's
    keys, no user hash or token key, no ``rq:*``, no pub/sub. Created by the central server on
    login (``ACL SETUSER ... reset``); the password is ``session_acl_password(token)``
    (:mod:`cloudq.tokens`), stored in the server only as its SHA-256 (``#<hex>``), so the
    central server never keeps the token: the session hash keeps that SHA-256 (field ``acl``)
    so the user can be re-created after a Redis restart. Close, logout, online reconnection
    (a new token), token expiry, ``cloudq user passwd`` and ``cloudq user del`` delete it (or
    reset its password) and kill its connections (``CLIENT KILL USER`` + ``ACL DELUSER``).
``cloudq-central``
    ``~P*``, ``~rq:*`` (it enqueues jobs and cleans RQ's started registries), the
    ``__keyevent@*__:expired`` channels, ``+@all -@dangerous`` plus ``ACL SETUSER/DELUSER/
    USERS/WHOAMI``, ``CLIENT KILL`` and ``INFO``. It creates users, so it is as trusted as an
    administrator: guard its password like one.
``cloudq-node``
    ``~P*``, ``+@all -@dangerous`` plus ``CONFIG GET`` (to check ``hz``), ``ACL WHOAMI``. No
    ``rq:*`` (a job payload names code that workers run) and no channels.
``cloudq-worker``
    ``~P*``, ``~rq:*``, ``&rq:*`` (RQ's worker commands), ``+@all -@dangerous`` plus
    ``INFO``, ``ACL WHOAMI``.
``cloudq-gateway``
    The login user's rights, plus read-only lookups of a cookie's token (token keys, the
    session's state, user and token hash; never a user hash) and a queued browser's queue beat; for
    each browser's video, input and heartbeats it talks to Redis as that browser's session user.
``cloudq-admin``
    Everything (``~* &* +@all``): the operator's ``cloudq user``, ``status``, ``data`` and
    ``redis-cli``.

Passwords of the role users come from the environment (``CLOUDQ_ACL_<ROLE>_PASSWORD``) or
options of ``cloudq acl print``; each process gets its user and password in its
``CLOUDQ_REDIS_URL`` (``redis://cloudq-node:<password>@host:6379/0``). ACL users are
server-wide: run one cloudq deployment per Redis server when ACLs are on.

Where the server has no ``ACL`` command, or ``--no-acl`` is given, the central server
publishes ``acl=0`` in the settings hash and every process logs a warning that clients are
trusted.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis

from cloudq.central.media import MediaServers
from cloudq.credentials import LOGIN_PASSWORD, LOGIN_USER, TRUSTED_WARNING
from cloudq.keys import Keys
from cloudq.tokens import SESSION_ACL_PREFIX, hash_token, session_acl_password, session_acl_user

log = logging.getLogger(__name__)

ROLES = ("admin", "central", "node", "worker", "gateway")
QUEUE_PREFIX = "cloudq-q-"


def role_user(role: str) -> str:
    return "cloudq-" + role


def queue_acl_user(user: str) -> str:
    return QUEUE_PREFIX + user


def password_hash(password: str) -> str:
    """What ``ACL SETUSER ... #<hex>`` takes: the SHA-256 of the password, hex."""
    return hashlib.sha256(password.encode()).hexdigest()


def session_password_hash(token: str) -> str:
    """The server-side form of a session's ACL password (the token itself is never stored)."""
    return password_hash(session_acl_password(token))


# -- rules ---------------------------------------------------------------------------------
def login_rules(keys: Keys) -> list[str]:
    P = keys.prefix
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        "+ping",
        f"(+rpush %W~{P}requests)",
        f"(+blpop +lpop ~{P}reply:*)",
    ]


def gateway_rules(keys: Keys) -> list[str]:
    """The login user's rights, plus what the gateway needs to find the session a browser's
    cookie stands for (read-only: token keys, the session's state, user and token hash, the
    queue's ``LPOS``) and to keep a queued browser's place (its ``queued:`` beat, the assignment
    notification). Video, input and heartbeats go through each session's own user. No user
    hash: it holds the bcrypt hash and an ACL cannot narrow a hash to fields, so the gateway
    finds a token's session from the session id the browser names, checked against the
    session hash (:meth:`cloudq.client.web.http.Gateway.resolve`)."""
    P = keys.prefix
    return [
        *login_rules(keys),
        f"(+hgetall %R~{keys.settings})",
        f"(+get %R~{P}token:*)",
        f"(+hmget %R~{P}session:*)",
        f"(+set %W~{P}queued:*)",  # the beat only: its TTL ends it (a client never deletes it)
        f"(+lpos %R~{keys.queue})",
        f"(+blpop ~{P}notify:*)",
    ]


def session_rules(keys: Keys, sid: str) -> list[str]:
    K = keys.session(sid)
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        "+ping",
        f"(+xread +xrevrange +xrange %R~{K}:video %R~{K}:audio %R~{K}:clip %R~{K}:fileout)",
        f"(+xadd %W~{K}:input %W~{K}:files)",
        f"(+set +pexpire %W~{K}:hb %W~{K}:act)",
        f"(+hget +hmget +hgetall %R~{K} %R~{keys.settings})",
    ]


def queue_rules(keys: Keys, user: str, token_hash: str) -> list[str]:
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        "+ping",
        f"(+set +pexpire %W~{keys.queued(user)})",
        f"(+blpop +lpop ~{keys.notify(token_hash)})",
        f"(+lpos %R~{keys.queue})",
        f"(+hget +hmget +hgetall %R~{keys.settings})",
    ]


def role_rules(role: str, keys: Keys) -> list[str]:
    P = keys.prefix
    base = ["resetkeys", "resetchannels", "+@all", "-@dangerous", "+acl|whoami"]
    if role == "admin":
        return ["resetkeys", "resetchannels", "~*", "&*", "+@all"]
    if role == "central":
        return [
            *base,
            f"~{P}*",
            "~rq:*",
            "&__keyevent@*__:expired",
            f"&{keys.wake}",
            "+acl|setuser",
            "+acl|deluser",
            "+acl|users",
            "+client|kill",
            "+info",
            "+config|get",
        ]
    if role == "node":
        # the channel: its scripts wake the sweeper for a deadline sooner than its next pass
        return [*base, f"~{P}*", f"&{keys.wake}", "+config|get"]
    if role == "worker":
        return [*base, f"~{P}*", "~rq:*", "&rq:*", f"&{keys.wake}", "+info"]
    if role == "gateway":
        return gateway_rules(keys)
    raise ValueError(f"unknown role {role!r}")


@dataclass
class Passwords:
    """The role users' passwords (random where not given)."""

    given: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role in ROLES:
            if not self.given.get(role):
                self.given[role] = secrets.token_urlsafe(24)

    def __getitem__(self, role: str) -> str:
        return self.given[role]


def static_users(keys: Keys, passwords: Passwords) -> list[tuple[str, list[str]]]:
    """(user, rules) for every user that exists independently of sessions; ``default`` last."""
    users = [
        (role_user(role), ["on", f"#{password_hash(passwords[role])}", *role_rules(role, keys)])
        for role in ROLES
    ]
    users.append((LOGIN_USER, ["on", f"#{password_hash(LOGIN_PASSWORD)}", *login_rules(keys)]))
    users.append(("default", ["on", "nopass", *login_rules(keys)]))
    return users


def acl_file(keys: Keys, passwords: Passwords) -> str:
    """The ACL file an operator deploys (``aclfile`` in the server's config; the format has no
    comments). Session and queue users are not in it: the central server creates them."""
    lines = [f"user {name} {' '.join(rules)}" for name, rules in static_users(keys, passwords)]
    return "\n".join(lines) + "\n"


def apply_static(r: redis.Redis, keys: Keys, passwords: Passwords) -> None:
    """Create the static users on a running server (``default`` last: it loses its rights)."""
    for name, rules in static_users(keys, passwords):
        r.execute_command("ACL", "SETUSER", name, "reset", *rules)


def with_user(url: str, user: str, password: str) -> str:
    """``url`` with its user and password replaced. The address part is kept as it is, so a
    ``redis+sentinel://`` URL keeps its list of Sentinels (``host:port,host:port``)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2] or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def passwords_of(urls: dict[str, str]) -> Passwords:
    """The role passwords that :func:`role_urls` put in ``urls`` (to create the same role users
    on another server of the deployment: a media server)."""
    return Passwords({k: unquote(urlsplit(u).password or "") for k, u in urls.items() if k in ROLES})


def role_urls(url: str, passwords: Passwords) -> dict[str, str]:
    """Each role's ``CLOUDQ_REDIS_URL``; ``login`` is the public one clients use."""
    urls = {role: with_user(url, role_user(role), passwords[role]) for role in ROLES}
    urls["login"] = with_user(url, LOGIN_USER, LOGIN_PASSWORD)
    return urls


def conf_quote(value: str) -> str:
    """``value`` as one argument of a Redis config line: double quotes, every byte that is not
    printable ASCII (or is a quote or backslash) as ``\\xHH``."""
    body = "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in value.encode())
    return f'"{body}"'


def replication_conf(passwords: Passwords) -> str:
    """A server config include for a replica (or a primary that Sentinel may turn into one):
    it follows its primary as ``cloudq-admin``, the only role user allowed ``PSYNC``."""
    return f"masteruser {role_user('admin')}\nmasterauth {conf_quote(passwords['admin'])}\n"


def sentinel_auth_conf(service: str, passwords: Passwords) -> str:
    """Sentinel config lines (after its ``sentinel monitor SERVICE ...``): Sentinel logs in to
    the data servers as ``cloudq-admin`` (it needs ``INFO``, ``PUBLISH``/``SUBSCRIBE`` on
    ``__sentinel__:hello``, ``REPLICAOF``, ``CONFIG REWRITE``, ``CLIENT KILL``; no other role has them)."""
    return (
        f"sentinel auth-user {service} {role_user('admin')}\n"
        f"sentinel auth-pass {service} {conf_quote(passwords['admin'])}\n"
    )


# -- the trusted-clients warning ---------------------------------------------------------------
def announce(r: redis.Redis, keys: Keys, enabled: bool) -> None:
    """The central server tells every process whether ACLs are on (settings hash field ``acl``)."""
    r.hset(keys.settings, "acl", "1" if enabled else "0")
    if not enabled:
        log.warning(TRUSTED_WARNING)


# -- session and queue users (the central server) ------------------------------------------
def _setuser(r: redis.Redis, name: str, pw_hash: str, rules: Iterable[str]) -> None:
    r.execute_command("ACL", "SETUSER", name, "reset", "on", f"#{pw_hash}", *rules)


def drop_user(r: redis.Redis, name: str) -> bool:
    """Delete an ACL user and cut its connections; False if it did not exist."""
    try:
        r.execute_command("CLIENT", "KILL", "USER", name)
    except redis.ResponseError as exc:
        if "no such user" in str(exc).lower():
            return False
        raise
    return bool(r.execute_command("ACL", "DELUSER", name))


def kill_connections(r: redis.Redis, name: str) -> int:
    try:
        return int(r.execute_command("CLIENT", "KILL", "USER", name))
    except redis.ResponseError:
        return 0


class SessionUsers:
    """The central server's side of session and queue users.

    Explicit paths (login, reconnection, logout, dispatch) create and delete users at once;
    :meth:`reconcile` (each sweeper pass, and when a close's user is due) catches the rest. Incrementally, at a cost
    that does not grow with the number of sessions: users of sessions that closed (``CLOSED_KEEP``
    s after the close, from the sorted set ``closed`` that the close script writes) and tokens
    that expired (sorted set ``acl:expiry``). In a full pass (``full=True``, every
    ``--acl-full-every`` s and after a server restart), every ACL user against the live sessions: users
    left behind by anything else, and users missing after a Redis restart (re-created from the
    session hash's ``acl`` field).
    """

    # The full pass reads every ACL user and every live session (35 ms at 10,000 sessions,
    # ``cloudq bench security``): the central server runs it on a new server and then rarely
    # (``--acl-full-every``). It used to run 4x/s because a queued user's session user was
    # missing after dispatch: the close job dispatched the freed node itself, and a worker may
    # not create Redis users. Now only the central server dispatches (woken by the worker).
    CLOSED_KEEP = 0.5
    """A closed session's user lives this long (s) so its client (polling every 0.2 s) reads the
    close reason; deleted by the next pass after that: within 1 s of the close."""

    def __init__(self, r: redis.Redis, keys: Keys, token_ttl: float) -> None:
        self.r = r
        self.keys = keys
        self.token_ttl = token_ttl
        self.expiry_key = keys.acl_expiry
        self.closed_upto = float("-inf")
        """Closes up to this server time are done (the ``closed`` sorted set's score)."""
        self.media: MediaServers | None = None
        """The media servers, where each session's user exists too (:mod:`cloudq.central.media`)."""

    def closed_after(self) -> str:
        """The lower bound (``ZRANGEBYSCORE`` syntax) of the closes this pass has not handled."""
        return "-inf" if self.closed_upto == float("-inf") else f"({self.closed_upto!r}"

    def _expire_at(self, name: str) -> None:
        if self.token_ttl:
            sec, usec = self.r.time()
            self.r.zadd(self.expiry_key, {name: sec + usec / 1e6 + self.token_ttl})

    def session_user(self, sid: str, pw_hash: str, kill: bool = True) -> str:
        """Create (or reset, with a new password) the session's user; cut old holders."""
        name = session_acl_user(sid)
        _setuser(self.r, name, pw_hash, session_rules(self.keys, sid))
        if self.media is not None:
            self.media.session_user(name, pw_hash, sid)
        if kill:
            kill_connections(self.r, name)  # a previous token's holder (online reconnection)
        self._expire_at(name)
        return name

    def queue_user(self, user: str, token: str) -> str:
        name = queue_acl_user(user)
        _setuser(self.r, name, session_password_hash(token), queue_rules(self.keys, user, hash_token(token)))
        kill_connections(self.r, name)
        self._expire_at(name)
        return name

    def drop_later(self, name: str, after: float) -> None:
        """Drop ``name`` in about ``after`` s (the incremental pass, if its token is spent by then)."""
        sec, usec = self.r.time()
        self.r.zadd(self.expiry_key, {name: sec + usec / 1e6 + after})

    def drop(self, name: str) -> None:
        drop_user(self.r, name)
        self.r.zrem(self.expiry_key, name)
        if self.media is not None and name.startswith(SESSION_ACL_PREFIX):
            self.media.drop(name)

    def setuser_on(self, r: redis.Redis, name: str, pw_hash: str, sid: str) -> None:
        """Create the session user ``name`` on another server (a media server)."""
        _setuser(r, name, pw_hash, session_rules(self.keys, sid))
        kill_connections(r, name)

    def revoke_session(self, sid: str) -> None:
        """The session's token is no longer valid: its user goes and is not re-created."""
        self.r.hdel(self.keys.session(sid), "acl")
        self.drop(session_acl_user(sid))

    def reconcile(self, full: bool = True) -> dict[str, int]:
        """One pass (incremental only with ``full=False``); returns what it did (counts)."""
        done = {"expired": 0, "stale": 0, "recreated": 0, "closed": 0}
        sec, usec = self.r.time()
        now = sec + usec / 1e6
        upto = now - self.CLOSED_KEEP
        for raw in self.r.zrangebyscore(self.keys.closed, self.closed_after(), upto):
            sid = raw.decode()
            if not self.r.sismember(self.keys.sessions, sid):  # not live again (ids are not reused)
                self.drop(session_acl_user(sid))
                done["closed"] += 1
        self.closed_upto = upto
        for raw in self.r.zrangebyscore(self.expiry_key, "-inf", now, start=0, num=500):
            name = raw.decode()
            if not self._token_alive(name):
                self.drop(name)
                if name.startswith(SESSION_ACL_PREFIX):
                    self.r.hdel(self.keys.session(name[len(SESSION_ACL_PREFIX) :]), "acl")
                done["expired"] += 1
            else:
                self._expire_at(name)
        if not full:
            return done
        present = {u.decode() for u in self.r.execute_command("ACL", "USERS")}
        live = {s.decode() for s in self.r.smembers(self.keys.sessions)}
        for name in present:
            if name.startswith(SESSION_ACL_PREFIX) and name[len(SESSION_ACL_PREFIX) :] not in live:
                closed = self.r.hget(self.keys.session(name[len(SESSION_ACL_PREFIX) :]), "closed")
                if closed and now - float(closed) < self.CLOSED_KEEP:
                    continue  # its client still gets to read why the session ended
                self.drop(name)
                done["stale"] += 1
            elif name.startswith(QUEUE_PREFIX):
                user = name[len(QUEUE_PREFIX) :]
                if not self.r.hget(self.keys.user(user), "qtoken"):
                    self.drop(name)
                    done["stale"] += 1
        missing = [sid for sid in live if session_acl_user(sid) not in present]
        if missing:
            pipe = self.r.pipeline(transaction=False)
            for sid in missing:
                pipe.hmget(self.keys.session(sid), "acl", "state", "close_reason")
            for sid, (pw_hash, state, _reason) in zip(missing, pipe.execute(), strict=True):
                if pw_hash and state and state != b"closed":
                    self.session_user(sid, pw_hash.decode(), kill=False)
                    done["recreated"] += 1
        if done["recreated"]:
            log.warning("re-created %d session ACL users (Redis restarted?)", done["recreated"])
        return done

    def _token_alive(self, name: str) -> bool:
        if name.startswith(SESSION_ACL_PREFIX):
            th = self.r.hget(self.keys.session(name[len(SESSION_ACL_PREFIX) :]), "token")
        elif name.startswith(QUEUE_PREFIX):
            th = self.r.hget(self.keys.user(name[len(QUEUE_PREFIX) :]), "qtoken")
        else:
            return True
        return bool(th) and bool(self.r.exists(self.keys.token(th.decode())))
