"""API keys for the serving gateway: made here, kept only as SHA-256 digests.

    tuneloop api-key new --id team-a     # prints the key once, and the config entry with its hash

Keys are random 256-bit tokens, so one SHA-256 is the right hash: nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "tl-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_from_env(value: str | None) -> list[dict[str, object]]:
    """Parse `id:key,id2:key2:infer+feedback` into hashed entries (the plain keys go no further).

    The optional third field lists the key's scopes, `+`-separated (default: infer)."""
    out: list[dict[str, object]] = []
    for part in (value or "").split(","):
        part = part.strip()
        if not part:
            continue
        key_id, sep, rest = part.partition(":")
        key, _, scopes = rest.partition(":")
        if not sep or not key_id or not key:
            raise ValueError(f"API key entry {key_id or part[:8]!r}…: expected `id:key` or `id:key:scope+scope`")
        entry: dict[str, object] = {"id": key_id, "sha256": key_sha256(key)}
        if scopes:
            entry["scopes"] = scopes.split("+")
        out.append(entry)
    return out
