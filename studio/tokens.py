"""API tokens for scripts: ``Authorization: Bearer pst_<id>_<secret>`` on the HTTP API (studio.api).

    create(store, "ci")  -> {"id", "name", "token"}   the token is shown once; only sha256(secret) is stored
    verify(store, token) -> the token's id, or None   (unknown, malformed or revoked)
    revoke(store, id)    -> its name

The id (8 hex digits) finds the row; the secret (32 random bytes, url-safe) is checked by comparing its sha256
with the stored one in constant time (``hmac.compare_digest``), so neither a lookup by secret nor a timing
difference tells anything about a valid secret. The table lives in the run registry (studio.store).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any

from .paths import clean_name
from .store import RunStore

PREFIX = "pst_"
_TOKEN = re.compile(r"^pst_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_ID = re.compile(r"^[0-9a-f]{8}$")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create(store: RunStore, name: str) -> dict[str, str]:
    """A new token named ``name`` (1-80 characters). The plain token is in the answer and nowhere else."""
    name = clean_name(name)
    token_id = secrets.token_hex(4)
    while store.token(token_id) is not None:
        token_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    store.add_token(token_id, name, digest(secret))
    return {"id": token_id, "name": name, "token": f"{PREFIX}{token_id}_{secret}"}


def verify(store: RunStore, token: str) -> str | None:
    """The id of the valid token ``token``, or None. Records when it was last used."""
    m = _TOKEN.match(token or "")
    row = store.token(m.group(1)) if m else None
    # compare even when there is no such row, so that an unknown id takes as long as a wrong secret
    stored = row["hash"] if row else digest(secrets.token_urlsafe(32))
    ok = hmac.compare_digest(stored, digest(m.group(2) if m else token or ""))
    if not ok or row is None or row["revoked"] is not None:
        return None
    store.update_token(row["id"], last_used=time.time())
    return row["id"]


def listing(store: RunStore) -> list[dict[str, Any]]:
    """Every token, newest first: {"id", "name", "created", "last_used", "revoked"} (never a secret or hash)."""
    return store.tokens()


def revoke(store: RunStore, token_id: str) -> str:
    """Revoke a token by id; returns its name. ValueError with one sentence for an unknown or revoked id."""
    token_id = (token_id or "").strip()
    row = store.token(token_id) if _ID.match(token_id) else None
    if row is None:
        raise ValueError(f"No API token has the id {token_id[:40]!r}; `python -m studio token list` shows them.")
    if row["revoked"] is not None:
        raise ValueError(f"The API token {token_id} ({row['name']}) is already revoked.")
    store.update_token(token_id, revoked=time.time())
    return row["name"]


__all__ = ["PREFIX", "create", "digest", "listing", "revoke", "verify"]
