"""API keys (kept as SHA-256 only) and per-key rate limits for the gateway.

    keys = KeyRing([{"id": "team-a", "sha256": "…", "rate_per_minute": 120, "scopes": ["infer"]}])
    keys.identify("tl-…")          # -> KeyEntry(id="team-a", …), or None for an unknown key
    limiter = RateLimiter(per_minute=600, burst=60)
    limiter.take("team-a")         # -> 0.0 when allowed, else seconds until it would be

Keys are random 256-bit tokens (`new_key()`), so one SHA-256 is the right hash: nothing to
brute-force, and a constant-time compare per key. Limits are token buckets held by each
gateway replica (one by default); with N gateway replicas a key gets up to N times its rate.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tuneloop.apikeys import key_sha256

SCOPES = ("infer", "feedback", "admin")


@dataclass(frozen=True)
class KeyEntry:
    id: str
    sha256: str
    rate_per_minute: int | None = None
    scopes: tuple[str, ...] = ("infer",)

    def may(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class KeyRing:
    def __init__(self, entries: Iterable[Mapping[str, object]]) -> None:
        self.entries = [
            KeyEntry(str(e["id"]), str(e["sha256"]), e.get("rate_per_minute"), tuple(e.get("scopes") or ("infer",)))
            for e in entries
        ]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def identify(self, key: str) -> KeyEntry | None:
        digest = key_sha256(key)
        found = None
        for entry in self.entries:  # compare against every entry: time does not tell which matched
            if hmac.compare_digest(digest, entry.sha256):
                found = entry
        return found


class RateLimiter:
    """Token buckets: `burst` requests at once, refilled at `per_minute` a minute, per key."""

    def __init__(self, per_minute: int, burst: int, clock=time.monotonic) -> None:
        self.per_minute, self.burst, self.clock = per_minute, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, key: str, per_minute: int | None = None) -> float:
        """Spend one request of `key`; return 0 if allowed, else the seconds to wait."""
        rate = (per_minute or self.per_minute) / 60.0
        burst = min(self.burst, per_minute) if per_minute else self.burst
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
