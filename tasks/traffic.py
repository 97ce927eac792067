"""Traffic stage: send chat requests to the live endpoint (demo load, smoke load)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


@task(name="send-chat-traffic")
def send_chat_traffic(endpoint: str, model: str, prompts: list[str], max_tokens: int,
                      concurrency: int = 8) -> TrafficResult:
    """POST each prompt to /v1/chat/completions with `concurrency` clients; count answers."""

    def one(prompt: str) -> str | None:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        try:
            r = httpx.post(f"{endpoint}/v1/chat/completions", json=body, timeout=300)
        except httpx.HTTPError:
            return None
        return r.json()["system_fingerprint"] if r.status_code == 200 else None

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(one, prompts))
    versions: dict[str, int] = {}
    for a in answers:
        if a:
            versions[a.removeprefix("v")] = versions.get(a.removeprefix("v"), 0) + 1
    ok = sum(versions.values())
    return TrafficResult(len(prompts), ok, len(prompts) - ok, versions)


def canary_open(endpoint: str) -> bool:
    """Whether the endpoint routes a share of requests to a challenger now (its /v1/models routing)."""
    try:
        routing = httpx.get(f"{endpoint}/v1/models", timeout=5).json()["data"][0].get("routing") or {}
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return False
    return bool(routing.get("challenger")) and routing.get("mode") in ("canary", "shadow")


class BackgroundTraffic:
    """Live-like traffic while a block runs: `clients` threads POST prompts (cycled) until it ends.

        with BackgroundTraffic(url, model, prompts, max_tokens=8) as traffic:
            ...                                   # e.g. a promotion with a canary window
        traffic.result                            # TrafficResult of what was sent
    """

    def __init__(self, endpoint: str, model: str, prompts: list[str], max_tokens: int, clients: int = 2,
                 pause_s: float = 0.25, only_when: Callable[[], bool] | None = None) -> None:
        import threading

        self.endpoint, self.model, self.prompts, self.max_tokens = endpoint, model, prompts, max_tokens
        self.pause_s = pause_s  # between a client's requests: people read answers
        self.only_when = only_when  # checked before each request: False holds the traffic back
        self.stop = threading.Event()
        self.answers: list[str | None] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        self.result = TrafficResult(0, 0, 0, {})

    def _run(self, offset: int) -> None:
        i = offset
        with httpx.Client(timeout=300) as http:
            while not self.stop.is_set():
                if self.only_when is not None and not self.only_when():
                    self.stop.wait(2.0)
                    continue
                body = {"model": self.model, "max_tokens": self.max_tokens,
                        "messages": [{"role": "user", "content": self.prompts[i % len(self.prompts)]}]}
                wait = self.pause_s
                try:
                    r = http.post(f"{self.endpoint}/v1/chat/completions", json=body)
                    self.answers.append(r.json()["system_fingerprint"] if r.status_code == 200 else None)
                    if r.status_code == 429:
                        wait = float(r.headers.get("retry-after", 1))
                except (httpx.HTTPError, ValueError, KeyError):
                    self.answers.append(None)
                    wait = 1.0  # nothing serves (yet): do not spin
                self.stop.wait(wait)
                i += len(self.threads)

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(600)
        versions: dict[str, int] = {}
        for a in self.answers:
            if a:
                versions[a.removeprefix("v")] = versions.get(a.removeprefix("v"), 0) + 1
        ok = sum(versions.values())
        self.result = TrafficResult(len(self.answers), ok, len(self.answers) - ok, versions)
