"""Authentication through the central server: bcrypt users, tokens, lockout, bad requests."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import pytest
import redis
from helpers import publish

from cloudq.central.auth import AuthError, Users, hash_token, token_user
from cloudq.central.server import Central
from cloudq.client.launcher import ClientError, Launcher
from cloudq.keys import Keys
from cloudq.settings import Settings
from cloudq.state import StateMachine

COST = 4


@pytest.fixture
def central(r: redis.Redis, keys: Keys) -> Iterator[Central]:
    c = Central(r, keys, Settings(lockout_limit=3, lockout_window=60, lockout_time=60), notifications=False)
    c.start()
    StateMachine(r, keys).register_node("n1", "h", "paint", "i1")
    Users(r, keys).add("alice", "correct horse", cost=COST)
    try:
        yield c
    finally:
        c.shutdown()


def test_passwords_are_stored_as_bcrypt_hashes_only(r: redis.Redis, keys: Keys) -> None:
    publish(r, keys)
    Users(r, keys).add("bob", "s3cret", cost=COST)
    stored = r.hget(keys.user("bob"), "hash")
    assert stored.startswith(b"$2") and b"s3cret" not in stored


def test_add_refuses_password_over_72_bytes_with_a_clear_message(r: redis.Redis, keys: Keys) -> None:
    with pytest.raises(AuthError, match="at most 72"):
        Users(r, keys).add("bob", "x" * 73, cost=COST)
    assert not r.exists(keys.user("bob"))


def test_login_returns_token_whose_hash_only_is_stored(r: redis.Redis, keys: Keys, central: Central) -> None:
    t = Launcher(r, keys).login("alice", "correct horse")
    assert t.status == "assigned" and t.node == "n1"
    assert len(t.token) >= 32
    assert not r.exists(keys.token(t.token))
    assert r.get(keys.token(hash_token(t.token))) == b"alice"
    assert token_user(r, keys, t.token) == "alice"


@pytest.mark.parametrize("user,password", [("alice", "wrong"), ("nobody", "whatever"), ("alice", "é" * 100)])
def test_bad_credentials_get_one_generic_answer(
    r: redis.Redis, keys: Keys, central: Central, user, password
) -> None:
    with pytest.raises(ClientError) as e:
        Launcher(r, keys).login(user, password)
    assert e.value.kind == "invalid" and str(e.value) == "invalid credentials"
    assert not r.exists(keys.session("s1"))


def test_repeated_failures_lock_the_account_even_for_the_right_password(
    r: redis.Redis, keys: Keys, central: Central
) -> None:
    launcher = Launcher(r, keys)
    for _ in range(2):
        with pytest.raises(ClientError, match="invalid credentials"):
            launcher.login("alice", "wrong")
    with pytest.raises(ClientError, match="locked") as e:
        launcher.login("alice", "wrong")
    assert e.value.exit_code == 4
    with pytest.raises(ClientError, match="locked"):
        launcher.login("alice", "correct horse")
    assert 0 < r.pttl(keys.user_lock("alice")) <= 60_000
    Users(r, keys).passwd("alice", "new one", cost=COST)  # an operator lifts it
    assert launcher.login("alice", "new one").status == "assigned"


def test_unknown_users_lock_like_known_ones(r: redis.Redis, keys: Keys, central: Central) -> None:
    launcher = Launcher(r, keys)
    answers = []
    for _ in range(4):
        with pytest.raises(ClientError) as e:
            launcher.login("ghost", "x")
        answers.append(e.value.kind)
    assert answers == ["invalid", "invalid", "locked", "locked"]


def test_logout_revokes_the_token_and_closes_the_session(
    r: redis.Redis, keys: Keys, central: Central
) -> None:
    launcher = Launcher(r, keys)
    t = launcher.login("alice", "correct horse")
    launcher.logout(t.token)
    assert token_user(r, keys, t.token) is None
    # the close job is queued on the node host's queue
    from rq import Queue

    q = Queue(keys.job_queue("h"), connection=r)
    assert any(j.startswith("cqt_close-") for j in q.job_ids)


def test_garbage_requests_are_counted_dropped_and_the_server_keeps_serving(
    r: redis.Redis, keys: Keys, central: Central
) -> None:
    garbage = [
        b"\xc1\xc1 not msgpack",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"op": "login", "id": "x"}),
        msgpack.packb({"op": "fly", "id": "abcdefgh12"}),
        b"x" * 10_000,
        b"",
    ]
    r.rpush(keys.requests, *garbage)
    t = Launcher(r, keys).login("alice", "correct horse")
    assert t.status == "assigned"
    assert central.counters["bad_request"] == len(garbage)
    # handled entries (which may hold passwords) are gone, answered or not
    assert r.llen(keys.requests) == 0 and r.llen(keys.requests_taken(central.name)) == 0


def test_expired_or_revoked_token_cannot_log_out(r: redis.Redis, keys: Keys, central: Central) -> None:
    from cloudq.messages import Request

    launcher = Launcher(r, keys)
    reply = launcher._request(Request("logout", "abcdefgh1234", token="not-a-token"))
    assert not reply.ok and reply.status == "invalid_token"
