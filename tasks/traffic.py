"""Traffic: chat requests to the live endpoint — the demo's load, smoke load, benchmark load.

One generator, `ChatLoad`, serves every caller (the demo's stages and canary traffic, the
serving benchmark, the integration tests): `clients` threads POST chat requests (prompts
cycled) and record each answer's status, latency, tokens and the version that answered.

    ChatLoad(url, model, prompts, max_tokens=8, clients=8, total=24).run()   # a fixed number
    with ChatLoad(url, model, prompts, max_tokens=8, clients=2) as load:     # while a block runs
        ...
    load.result()                                                            # TrafficResult
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import httpx
from prefect import task


@dataclass
class TrafficResult:
    sent: int
    ok: int
    failed: int
    versions: dict[str, int]  # model version -> answers


@dataclass(frozen=True)
class Answer:
    """One request's outcome: HTTP status (0: no response), latency, completion tokens, version or error."""

    status: int
    latency_ms: float
    tokens: int
    version: str  # the answer's system_fingerprint ("v3"), or what went wrong


class ChatLoad:
    """`clients` threads sending chat requests until `total` are sent or the load is stopped.

    `pause_s` is each client's wait between requests (people read answers; a 429's retry-after
    replaces it); `only_when`, checked before each request, holds the traffic back while it
    says False; `user` names the request's end user (the OpenAI field) from its number.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        prompts: list[str],
        max_tokens: int,
        clients: int = 2,
        total: int | None = None,
        pause_s: float = 0.0,
        only_when: Callable[[], bool] | None = None,
        user: Callable[[int], str] | None = None,
        timeout_s: float = 300,
        extra: dict | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("ChatLoad needs at least one prompt")
        self.endpoint, self.model, self.prompts, self.max_tokens = endpoint, model, prompts, max_tokens
        self.total, self.pause_s, self.only_when, self.user, self.timeout_s = total, pause_s, only_when, user, timeout_s
        self.extra = extra or {}  # more request fields: sampling settings, a response_format …
        self.stop = threading.Event()
        self.answers: list[Answer] = []
        self.wall_s = 0.0
        self._lock = threading.Lock()
        self._sent = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _next(self) -> int | None:
        with self._lock:
            if self.stop.is_set() or (self.total is not None and self._sent >= self.total):
                return None
            self._sent += 1
            return self._sent - 1

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as http:
            while not self.stop.is_set():
                if self.only_when is not None and not self.only_when():
                    self.stop.wait(2.0)
                    continue
                if (i := self._next()) is None:
                    return
                body = {
                    "model": self.model,
                    "max_tokens": self.max_tokens,
                    "messages": [{"role": "user", "content": self.prompts[i % len(self.prompts)]}],
                    **({"user": self.user(i)} if self.user else {}),
                    **self.extra,
                }
                wait, start = self.pause_s, time.perf_counter()
                try:
                    r = http.post(f"{self.endpoint}/v1/chat/completions", json=body)
                    data = r.json() if r.status_code == 200 else {}
                    answer = Answer(
                        r.status_code,
                        (time.perf_counter() - start) * 1000,
                        data.get("usage", {}).get("completion_tokens", 0),
                        data.get("system_fingerprint", ""),
                    )
                    if r.status_code == 429:
                        wait = float(r.headers.get("retry-after", 1))
                except (httpx.HTTPError, ValueError) as err:
                    answer = Answer(0, (time.perf_counter() - start) * 1000, 0, str(err) or type(err).__name__)
                    wait = max(wait, 1.0) if self.total is None else wait  # nothing serves (yet): do not spin
                self.answers.append(answer)
                if wait:
                    self.stop.wait(wait)

    def run(self) -> TrafficResult:
        """Send until `total` are sent (every client done); return what was answered."""
        with self:
            for t in self._threads:
                t.join()
        return self.result()

    def __enter__(self) -> Self:
        self._start = time.perf_counter()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(600)
        self.wall_s = time.perf_counter() - self._start

    def result(self) -> TrafficResult:
        answers = list(self.answers)
        versions = Counter(a.version.removeprefix("v") for a in answers if a.status == 200 and a.version)
        ok = sum(versions.values())
        return TrafficResult(len(answers), ok, len(answers) - ok, dict(versions))


@task(name="send-chat-traffic")
def send_chat_traffic(
    endpoint: str, model: str, prompts: list[str], max_tokens: int, concurrency: int = 8
) -> TrafficResult:
    """POST each prompt once to /v1/chat/completions with `concurrency` clients; count answers."""
    if not prompts:
        return TrafficResult(0, 0, 0, {})
    return ChatLoad(endpoint, model, prompts, max_tokens, clients=concurrency, total=len(prompts)).run()


def canary_open(endpoint: str) -> bool:
    """Whether the endpoint routes a share of requests to a challenger now (its /readyz routing)."""
    try:
        routing = httpx.get(f"{endpoint}/readyz", timeout=5).json().get("routing") or {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    return bool(routing.get("challenger")) and routing.get("mode") in ("canary", "shadow")
