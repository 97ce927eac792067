"""Traffic stage: send chat requests to the live endpoint (demo load, smoke load)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
