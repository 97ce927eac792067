from pathlib import Path

from tuneloop.inferencelog import InferenceLog, InferenceRecord


def test_append_and_read_newest_first(tmp_path: Path) -> None:
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    for i in range(5):
        log.append(InferenceRecord(route="/v1/chat/completions", model="m", prompt=f"p{i}", status=200,
                                   model_version="1", response="r", prompt_tokens=3, completion_tokens=2,
                                   latency_ms=1.5))
    log.append(InferenceRecord(route="/v1/chat/completions", model="m", prompt="bad", status=503))
    assert log.count() == 6
    assert [r["prompt"] for r in log.recent(3)] == ["p4", "p3", "p2"]
    assert [r["prompt"] for r in log.recent(1, status=503)] == ["bad"]
    log.close()
