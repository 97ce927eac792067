"""The retraining decision: k of the last n windows, one episode per streak, the data it trains on."""

import datetime as dt
import json

import pytest

from tasks.drift import LoggedRequest
from tasks.retrain import CheckRecord, decide, retraining_data
from tuneloop.config import Persistence


def run_checks(verdicts: str, k: int, n: int) -> list[CheckRecord]:
    """Decide window after window (D drift, N no drift, - no data) as the flow does; return the records."""
    history: list[CheckRecord] = []
    names = {"D": "drift", "N": "no_drift", "-": "no_data"}
    for i, v in enumerate(verdicts):
        d = decide(history, names[v], f"w{i}", Persistence(k=k, n=n), "m:v1")
        history.append(CheckRecord(f"run{i}", names[v], f"w{i}", d.holds, d.episode, "x" if d.holds else None))
    return history


def episodes(records: list[CheckRecord]) -> list[str | None]:
    return [r.episode for r in records]


def test_one_drifted_window_is_enough_with_k1() -> None:
    assert episodes(run_checks("NDDN", 1, 1)) == [None, "drift:m:v1:w1", "drift:m:v1:w1", None]


def test_drift_must_hold_for_k_of_n_windows() -> None:
    records = run_checks("NDNDDDNND", 2, 3)
    # w1 alone is not enough; w3 makes two of (w1, w2, w3): the episode is named after w1.
    assert [r.holds for r in records] == [False, False, False, True, True, True, True, False, False]
    assert set(episodes(records[3:7])) == {"drift:m:v1:w1"}


def test_a_new_streak_is_a_new_episode() -> None:
    records = run_checks("DDNNNDD", 2, 2)
    assert episodes(records) == [None, "drift:m:v1:w0", None, None, None, None, "drift:m:v1:w5"]


def test_windows_without_data_neither_count_nor_break_a_streak() -> None:
    records = run_checks("D--D-D", 2, 2)
    assert [r.holds for r in records] == [False, False, False, True, False, True]
    assert records[3].episode == records[5].episode == "drift:m:v1:w0"


def test_overlapping_checks_that_see_the_same_history_name_the_same_episode() -> None:
    history = run_checks("ND", 2, 3)
    a = decide(history, "drift", "w2", Persistence(k=2, n=3), "m:v1")
    b = decide(history, "drift", "w2", Persistence(k=2, n=3), "m:v1")
    assert a.holds and a.episode == b.episode == "drift:m:v1:w1"


def test_k_cannot_exceed_n() -> None:
    with pytest.raises(ValueError, match="exceeds n"):
        Persistence(k=3, n=2)


def request(i: int, status: int = 200, response: str | None = "an answer") -> LoggedRequest:
    return LoggedRequest(f"r{i}", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), status, f"prompt {i}", response, "1", 1,
                         1, 10.0, None)


def test_retraining_data_from_requests_with_good_feedback(tmp_path) -> None:
    rows = [request(i) for i in range(12)] + [request(12, status=503, response=None)]
    feedback = {f"r{i}": (1.0 if i < 10 else 0.0) for i in range(13)}
    out = tmp_path / "retrain" / "ep.jsonl"
    path, note = retraining_data(rows, feedback, 0.5, 10, None, out)
    assert path == str(out) and note == "10 drifted requests with feedback >= 0.5"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"prompt": "prompt 0", "response": "an answer"} and len(lines) == 10
    assert not list(out.parent.glob(".*partial"))  # written whole, then renamed


def test_too_little_feedback_falls_back_to_the_configured_dataset(tmp_path) -> None:
    rows = [request(i) for i in range(12)]
    fresh = tmp_path / "fresh.jsonl"
    path, note = retraining_data(rows, {"r0": 1.0}, 0.5, 10, fresh, tmp_path / "ep.jsonl")
    assert path == str(fresh) and note.startswith("monitor.retrain_data (1 drifted requests")
    path, note = retraining_data(rows, {}, 0.5, 10, None, tmp_path / "ep.jsonl")
    assert path is None and "monitor.retrain_data is not set" in note
    assert not (tmp_path / "ep.jsonl").exists()


def test_the_monitoring_deployment_parameters_fit_the_flow() -> None:
    """What flows/deployments.py registers is what the flow accepts (the Prefect UI form)."""
    from flows.deployments import monitoring_parameters
    from flows.monitoring import monitoring_flow
    from tuneloop.config import MonitorThresholds, load_config

    cfg = load_config(None, ["monitor.window=77", "monitor.persistence.k=2", "monitor.persistence.n=4"])
    params = monitoring_flow.validate_parameters(monitoring_parameters(cfg))
    assert set(params) == {"config", "window", "reference", "thresholds", "persistence"}
    assert params["window"] == 77 and params["reference"] == "champion"
    assert params["persistence"] == Persistence(k=2, n=4) and isinstance(params["thresholds"], MonitorThresholds)
