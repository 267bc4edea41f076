"""Bearer tokens: made by the central server, held by clients, stored only as their SHA-256.

Both sides need these three functions and neither needs bcrypt for them, so they live here
(hashlib, hmac, secrets) rather than in :mod:`cloudq.central.auth`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_token() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What Redis stores and compares: the token's SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(a: str, b: str) -> bool:
    """Constant-time comparison of two tokens (or two token hashes)."""
    return hmac.compare_digest(a.encode(), b.encode())


SESSION_ACL_PREFIX = "cloudq-s-"
"""Start of every session ACL user's name (:func:`session_acl_user`)."""


def session_acl_user(sid: str) -> str:
    """The Redis ACL user a client of session ``sid`` connects as (see the security section)."""
    return SESSION_ACL_PREFIX + sid


def session_acl_password(token: str) -> str:
    """That user's password, derived from the session's bearer token (the token never reaches
    Redis; its hash is the token key, and this is a different hash)."""
    return hashlib.sha256(b"cloudq-acl:" + token.encode()).hexdigest()
