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
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneloop.apikeys import key_sha256

log = logging.getLogger("ray.serve")

SCOPES = ("infer", "feedback", "admin")


@dataclass(frozen=True)
class KeyEntry:
    id: str
    sha256: str
    rate_per_minute: int | None = None
    scopes: tuple[str, ...] = ("infer",)
    tokens_per_day: int | None = None

    def may(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class KeyRing:
    """The keys a gateway accepts: fixed entries (config, environment) plus, optionally, a keys
    file re-read when it changes (checked at most every `recheck_s`): keys are added, rotated and
    revoked there without restarting anything. A file that cannot be read keeps the last good
    keys and says so in the log; a file that is gone accepts none of its keys (fail closed)."""

    def __init__(
        self, entries: Iterable[Mapping[str, object]], file: str | Path | None = None, recheck_s: float = 2.0
    ) -> None:
        self.fixed = [_entry(e) for e in entries]
        self.file = Path(file) if file else None
        self.recheck_s = recheck_s
        self._from_file: list[KeyEntry] = []
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._refresh(force=True)

    @property
    def entries(self) -> list[KeyEntry]:
        return self.fixed + self._from_file

    def __bool__(self) -> bool:
        return bool(self.fixed) or self.file is not None

    def _refresh(self, force: bool = False) -> None:
        if self.file is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < self.recheck_s:
                return
            self._checked = now
            try:
                st = self.file.stat()
            except FileNotFoundError:
                self._from_file, self._stamp = [], None
                return
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._stamp:
                return
            try:
                self._from_file = [_entry(e) for e in read_keys_file(self.file)]
                self._stamp = stamp
                log.info("API keys: %d from %s", len(self._from_file), self.file)
            except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
                log.error("API keys file %s unreadable, keeping the last good keys: %s", self.file, err)

    def identify(self, key: str) -> KeyEntry | None:
        self._refresh()
        digest = key_sha256(key)
        found = None
        for entry in self.entries:  # compare against every entry: time does not tell which matched
            if hmac.compare_digest(digest, entry.sha256):
                found = entry
        return found


def _entry(e: Mapping[str, object]) -> KeyEntry:
    return KeyEntry(
        str(e["id"]),
        str(e["sha256"]),
        e.get("rate_per_minute"),
        tuple(e.get("scopes") or ("infer",)),
        e.get("tokens_per_day"),
    )


def read_keys_file(path: Path) -> list[dict]:
    """A keys file: YAML (or JSON), a list of `{id, sha256, rate_per_minute?, scopes?}`."""
    from tuneloop.config import ApiKeyConfig

    data = yaml.safe_load(Path(path).read_text()) or []
    if not isinstance(data, list):
        raise TypeError("a keys file holds a list of key entries")
    return [ApiKeyConfig.model_validate(e).model_dump() for e in data]


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


class TokenBudgets:
    """Tokens each key used today (UTC), for per-key daily budgets. Seeded from the inference
    log the first time a key is seen each day (`seed`), then counted as answers are delivered;
    with N gateway replicas each counts its own share, so a key may overshoot by N-1 requests."""

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self._spent: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def today(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.clock()))

    def known(self, key_id: str) -> bool:
        return (key_id, self.today()) in self._spent

    def seed(self, key_id: str, tokens: int) -> None:
        with self._lock:
            self._spent.setdefault((key_id, self.today()), tokens)

    def spent(self, key_id: str) -> int:
        return self._spent.get((key_id, self.today()), 0)

    def add(self, key_id: str, tokens: int) -> None:
        with self._lock:
            day = self.today()
            self._spent[(key_id, day)] = self._spent.get((key_id, day), 0) + tokens
            for old in [k for k in self._spent if k[1] != day]:
                del self._spent[old]
