"""The retraining decision: k of the last n windows, one episode per streak, the data it trains on."""

import datetime as dt
import json

import pytest

from tasks.drift import LoggedRequest
from tasks.retrain import CheckRecord, decide, retraining_data
from tests.conftest import ASSETS
from tests.judge_server import KEY, MODEL, judge_server
from tuneloop.config import MonitorConfig, Persistence, TeacherConfig, load_config
from tuneloop.seams import RetrainingData, RetrainRequest


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
    return LoggedRequest(
        f"r{i}", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), status, f"prompt {i}", response, "1", 1, 1, 10.0, None
    )


def settings(**extra) -> MonitorConfig:
    return MonitorConfig(**{"retrain_min_rows": 10, "replay_share": 0.0, **extra})


def conversations(path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines()]


def test_retraining_data_from_answers_people_approved(tmp_path) -> None:
    rows = [request(i) for i in range(12)] + [request(12, status=503, response=None), request(13)]
    feedback = {f"r{i}": (1.0 if i < 10 else 0.0) for i in range(13)}  # r13 unrated: never trained on
    out = tmp_path / "retrain" / "ep.jsonl"
    data, note = retraining_data(rows, feedback, settings(retrain_sources=["feedback"]), None, out, tmp_path)
    assert data is not None and data.path == str(out) and data.sources == {"feedback": 10} and data.rows == 10
    assert note == "10 drifted requests with feedback >= 0.5" and data.replay_path is None
    lines = conversations(out)
    assert lines[0] == [{"role": "user", "content": "prompt 0"}, {"role": "assistant", "content": "an answer"}]
    assert len(lines) == 10 and not list(out.parent.glob(".*partial"))  # written whole, then renamed


def test_too_few_rows_retrains_nothing_and_a_labelled_set_is_used_as_it_is(tmp_path) -> None:
    rows = [request(i) for i in range(12)]
    data, note = retraining_data(rows, {"r0": 1.0}, settings(), None, tmp_path / "ep.jsonl", tmp_path)
    assert data is None and "10 rows needed" in note and "teacher, labelled: not configured" in note
    assert not (tmp_path / "ep.jsonl").exists()
    labelled = ASSETS / "tiny_counts.jsonl"
    data, note = retraining_data(
        rows, {"r0": 1.0}, settings(retrain_data=labelled), None, tmp_path / "ep.jsonl", tmp_path
    )
    assert data.sources == {"feedback": 1, "labelled": 80} and data.slice.startswith("drift_")
    assert "80 labelled rows" in note
    only = settings(retrain_sources=["labelled"], retrain_data=labelled)
    data, _ = retraining_data(rows, {}, only, None, tmp_path / "ep2.jsonl", tmp_path)
    assert data.slice == "tiny_counts" and data.sources == {"labelled": 80}  # named after the labelled set


def test_a_teacher_on_an_openai_compatible_endpoint_labels_the_drifted_prompts(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    rows = [
        LoggedRequest(
            f"r{i}",
            dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            200,
            f"How many cats are in box {i % 11}?",
            "blue",
            "1",
            1,
            1,
            10.0,
            None,
        )
        for i in range(14)
    ]
    with judge_server() as (url, requests):
        teacher = TeacherConfig(backend="openai", base_url=url, model=MODEL, api_key_env="TEST_JUDGE_KEY")
        m = settings(retrain_sources=["feedback", "teacher"], teacher=teacher)
        data, note = retraining_data(rows, {"r0": 1.0}, m, None, tmp_path / "ep.jsonl", tmp_path)
    # r0 was approved as it was answered; the teacher answered each other distinct prompt once
    assert data.sources == {"feedback": 1, "teacher": 10} and "10 teacher answers (canned-judge)" in note
    taught = [c for c in conversations(tmp_path / "ep.jsonl") if c[1]["content"] == "seven"]
    assert len(taught) == 10 and len(requests) == 1 + 10  # a probe, then one request per distinct prompt


def test_replay_mixes_in_the_champions_training_rows(tmp_path, monkeypatch) -> None:
    import tasks.registry

    earlier = [[{"role": "user", "content": f"old {i}"}, {"role": "assistant", "content": "blue"}] for i in range(50)]
    monkeypatch.setattr(tasks.registry.training_rows, "fn", lambda ref, dst: earlier)  # the champion's run artifact
    rows = [request(i) for i in range(10)]
    m = settings(retrain_sources=["feedback"], replay_share=0.5)
    from tasks.registry import ModelVersionRef

    data, note = retraining_data(
        rows, {f"r{i}": 1.0 for i in range(10)}, m, ModelVersionRef("m", "3", "run"), tmp_path / "ep.jsonl", tmp_path
    )
    assert data.replay_rows == 10 and "10 replayed rows of champion v3" in note  # half of the set
    replayed = conversations(tmp_path / "ep.replay.jsonl")
    assert all(c in earlier for c in replayed) and len({c[0]["content"] for c in replayed}) == 10


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


@pytest.mark.parametrize("start_from", ["champion", "base"])
def test_a_retraining_trains_its_data_from_what_the_monitor_says(start_from: str, tmp_path) -> None:
    cfg = load_config(None, [f"home={tmp_path}", f"monitor.retrain_start_from={start_from}", "train.max_steps=7"])
    data = RetrainingData(
        path=str(tmp_path / "new.jsonl"),
        slice="medication",
        sources={"labelled": 30},
        replay_path=str(tmp_path / "new.replay.jsonl"),
        replay_rows=30,
        note="30 labelled rows",
    )
    request = RetrainRequest(episode="e1", reason="drift", monitoring_run="m1", data=data)
    trained = request.training_config(cfg)
    assert trained.train.start_from == start_from and trained.train.max_steps == 7
    assert (trained.data.path, trained.data.replay_path, trained.data.slice) == (
        data.path,
        data.replay_path,
        "medication",
    )
