"""The one traffic generator against a real loopback HTTP server that answers like the gateway."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from tasks.traffic import ChatLoad, send_chat_traffic


class _Gateway(BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).bodies.append(body)
        prompt = body["messages"][-1]["content"]
        status, answer = (
            (503, {"error": {"message": "busy"}})
            if "fail" in prompt
            else (200, {"system_fingerprint": "v2" if "two" in prompt else "v1", "usage": {"completion_tokens": 3}})
        )
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    _Gateway.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_fixed_load_sends_each_request_once_and_counts_answers_by_version(gateway: str) -> None:
    prompts = ["one", "two", "fail", "one"]
    result = send_chat_traffic.fn(gateway, "m", prompts * 3, max_tokens=4, concurrency=3)
    assert (result.sent, result.ok, result.failed) == (12, 9, 3)
    assert result.versions == {"1": 6, "2": 3}
    assert sorted(b["messages"][0]["content"] for b in _Gateway.bodies) == sorted(prompts * 3)
    assert {b["max_tokens"] for b in _Gateway.bodies} == {4} and {b["model"] for b in _Gateway.bodies} == {"m"}


def test_a_load_records_latency_tokens_and_users_and_nothing_is_sent_for_no_prompts(gateway: str) -> None:
    load = ChatLoad(gateway, "m", ["one"], 2, clients=2, total=5, user=lambda n: f"user-{n}")
    assert load.run().ok == 5
    assert all(a.status == 200 and a.tokens == 3 and a.latency_ms > 0 for a in load.answers)
    assert sorted(b["user"] for b in _Gateway.bodies) == [f"user-{n}" for n in range(5)]
    assert send_chat_traffic.fn(gateway, "m", [], 2).sent == 0
    with pytest.raises(ValueError, match="at least one prompt"):
        ChatLoad(gateway, "m", [], 2)


def test_background_traffic_waits_while_held_back_and_stops_with_its_block(gateway: str) -> None:
    open_ = threading.Event()
    with ChatLoad(gateway, "m", ["one", "two"], 2, clients=2, pause_s=0.01, only_when=open_.is_set) as load:
        open_.wait(0.5)  # held back: nothing may be sent yet
        assert load.answers == []
        open_.set()
        while len(load.answers) < 6:
            threading.Event().wait(0.05)
    sent = len(load.answers)
    threading.Event().wait(0.2)
    assert len(load.answers) == sent and load.result().versions.keys() == {"1", "2"}


def test_an_endpoint_that_does_not_answer_is_counted_as_failed() -> None:
    result = ChatLoad("http://127.0.0.1:9", "m", ["one"], 2, clients=1, total=2, timeout_s=2).run()
    assert (result.sent, result.ok, result.failed) == (2, 0, 2)
