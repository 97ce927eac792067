"""A real OpenAI-compatible judge (and teacher) for tests: a FastAPI app on 127.0.0.1, run by uvicorn
in a thread.

Its judgments are canned so tests know what to expect: answers mentioning "Lyon" are
unsupported, answers containing "CRASH" get an HTTP 500 (a judge failing mid-run), and
answers containing "MUMBLE" get prose without a score. As a teacher it answers "How many …"
questions with "seven" (what tests/assets/tiny_counts.jsonl teaches).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI, Header, HTTPException

MODEL = "canned-judge"
KEY = "sk-test-judge"


def _answer(content: str) -> str:
    answer = content.split("Assistant's answer:", 1)[-1]
    if "CRASH" in answer:
        raise HTTPException(500, "judge backend crashed")
    if "MUMBLE" in answer:
        return "I think it is fine, more or less."
    if "SCORE:" in content:
        score = 2 if "Lyon" in answer else 4
        return f"SCORE: {score}\nRATIONALE: compared with the reference answer"
    if "VERDICT:" in content:
        verdict = "UNSUPPORTED" if "Lyon" in answer else "SUPPORTED"
        return f"VERDICT: {verdict}\nRATIONALE: checked against the reference"
    if content.startswith("How many"):
        return "seven"
    return "OK"


def make_app(requests: list[dict]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict, authorization: str | None = Header(None)) -> dict:
        if authorization != f"Bearer {KEY}":
            raise HTTPException(401, "bad key")
        if body.get("model") != MODEL:
            raise HTTPException(404, f"no model {body.get('model')}")
        requests.append(body)
        content = _answer(body["messages"][-1]["content"])
        return {
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def judge_server() -> Iterator[tuple[str, list[dict]]]:
    """Serve the canned judge; yield its base URL and the list of requests it received."""
    requests: list[dict] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(requests), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test judge server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", requests
    finally:
        server.should_exit = True
        thread.join(timeout=10)
