"""Bearer tokens: made by the central server, held by clients, stored only as their SHA-256.

Both sides need these three functions and neither needs bcrypt for them, so they live here
(hashlib, hmac, secrets) rather than in :mod:`cloudq.auth`.
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
