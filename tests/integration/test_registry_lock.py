"""With a tracking server (flows on many machines) the registry lock is a Prefect global
concurrency limit: real Prefect API (test harness) on 127.0.0.1."""

import threading

import pytest

from tasks.registry import registry_lock

pytestmark = pytest.mark.slow

SERVER = "http://127.0.0.1:5999"  # only the scheme matters: the lock never calls MLflow


def test_a_tracking_server_lock_is_a_prefect_concurrency_limit_of_one(prefect_api) -> None:
    from prefect import get_client

    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with registry_lock(SERVER, "team/chat model"):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(60)
        with pytest.raises(TimeoutError), registry_lock(SERVER, "team/chat model", timeout_s=2):
            pass
    finally:
        release.set()
        thread.join()
    with registry_lock(SERVER, "team/chat model", timeout_s=30):
        pass
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("tuneloop-registry-team-chat-model")
    assert limit.limit == 1 and limit.active_slots == 0
