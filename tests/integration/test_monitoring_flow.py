"""The monitoring flow against a plain SQLite inference log: real Prefect (test harness, a real
training deployment registered in it), real MLflow (SQLite in a temp dir, a champion with its
recorded training prompts), real MiniLM embeddings. No Ray: the training deployment's runs are
created and counted, not executed."""

import datetime as dt
import json
import os
import random
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.monitoring import monitoring_flow
from tests.conftest import ASSETS, make_config
from tuneloop.config import TuneloopConfig
from tuneloop.inferencelog import InferenceLog, InferenceRecord
from tuneloop.state import apply_environment, inference_db_url, tracking_uri

pytestmark = pytest.mark.slow

TRIVIA = [json.loads(line)["prompt"] for line in (ASSETS / "tiny_qa.jsonl").read_text().splitlines()]
# Traffic like the training prompts but not the same ones (prompts trained on are no evidence
# either way): sums and capitals, three to one, as in the reference.
_SUMS = [f"What is {a} plus {b}?" for a in range(2, 20) for b in range(2, 20)]
TRAFFIC = random.Random(1).sample(
    [
        *random.Random(2).sample([q for q in _SUMS if q not in TRIVIA], 12),
        *[
            q
            for q in (
                f"What is the capital of {c}?"
                for c in ("Chile", "Greece", "India", "Peru", "Cuba", "Nepal", "Chad", "Oman")
            )
            if q not in TRIVIA
        ][:4],
    ],
    16,
)
assert not set(TRAFFIC) & set(TRIVIA)
MEDICATION = [json.loads(line)["prompt"] for line in (ASSETS / "tiny_medication.jsonl").read_text().splitlines()]


def register_champion(cfg: TuneloopConfig, prompts: list[str]) -> str:
    """A registered version holding the champion alias, with its training prompts as the training flow records them."""
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.create_experiment(cfg.registry.experiment, artifact_location=str(cfg.home / "artifacts"))
    run = client.create_run(experiment).info.run_id
    client.log_text(run, "\n".join(json.dumps(p) for p in prompts), "reference/prompts.jsonl")
    client.set_terminated(run)
    client.create_registered_model(cfg.registry.model_name)
    mv = client.create_model_version(cfg.registry.model_name, f"runs:/{run}/model", run_id=run)
    client.set_registered_model_alias(cfg.registry.model_name, "champion", mv.version)
    return str(mv.version)


class Log:
    """Writes requests into the inference log, one second apart, as the serving writer would."""

    def __init__(self, cfg: TuneloopConfig) -> None:
        self.store = InferenceLog(inference_db_url(cfg))
        self.clock = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)  # recent: older rows fall to retention

    def add(self, prompts: list[str], version: str = "1", response: str = "It is a short answer.") -> list[str]:
        records = []
        for p in prompts:
            self.clock += dt.timedelta(seconds=1)
            records.append(
                InferenceRecord(
                    route="/v1/chat/completions",
                    model="tuneloop-chat",
                    prompt=p,
                    status=200,
                    model_version=version,
                    response=response,
                    prompt_tokens=9,
                    completion_tokens=6,
                    latency_ms=120.0,
                    arm="champion",
                    created_at=self.clock,
                )
            )
        self.store.append_many(records)
        return [r.id for r in records]


@pytest.fixture
def setup(tmp_path, models_dir, prefect_api):
    """A state dir with a champion trained on trivia, an empty log, and a training deployment of its own."""
    from flows.training import training_flow

    name = f"retrain-{uuid.uuid4().hex[:8]}"
    cfg = make_config(
        tmp_path / "home",
        models_dir,
        f"prefect.training_deployment=training-flow/{name}",
        f"monitor.retrain_data={ASSETS / 'tiny_medication.jsonl'}",
        "monitor.persistence.k=1",
        "monitor.persistence.n=1",
        "monitor.thresholds.latency_p95_ms=1000",
    )
    apply_environment(cfg, prefect_api=False)
    deployment_id = training_flow.to_deployment(name=name).apply()
    version = register_champion(cfg, TRIVIA)
    return cfg, Log(cfg), deployment_id, version


def training_runs(deployment_id) -> list:
    """The flow runs of the training deployment, as the Prefect API holds them."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def test_drift_starts_one_retraining_run_per_episode(setup) -> None:
    cfg, log, deployment_id, version = setup
    log.add(TRAFFIC[:12])
    before = monitoring_flow(cfg)
    assert before.drift.verdict == "no_drift", before.drift.reason
    assert before.champion_version == version and before.retraining_flow_run_id is None
    assert before.embedded_new == 12 and not training_runs(deployment_id)

    log.add(MEDICATION[:12])
    after = monitoring_flow(cfg)
    assert after.drift.verdict == "drift" and after.drift.p_value < cfg.monitor.alpha, after.drift.reason
    assert after.embedded_new == 12  # only the new requests: the trivia ones were embedded by the first check
    assert after.retraining_started and after.episode.startswith(f"drift:tuneloop-chat:v{version}:")
    runs = training_runs(deployment_id)
    assert [str(r.id) for r in runs] == [after.retraining_flow_run_id]
    params = runs[0].parameters
    # The retraining set is written once per episode: here the labelled set alone (no approved
    # answers, no teacher), a slice named after it.
    data = params["config"]["data"]
    assert Path(data["path"]).parent == cfg.home / "data" / "retrain" and data["slice"] == "tiny_medication"
    labelled = (ASSETS / "tiny_medication.jsonl").read_text().splitlines()
    assert len(Path(data["path"]).read_text().splitlines()) == len(labelled)
    assert params["trigger"].startswith(f"drift episode {after.episode}")
    assert f"{len(labelled)} labelled rows of {ASSETS / 'tiny_medication.jsonl'}" in after.data_note
    # This champion was registered by hand, without training rows: nothing to replay, and the note says so.
    assert f"nothing replayed: champion v{version} recorded no training rows" in after.data_note

    # The same drift, one window later: the same episode, the same run, nothing embedded twice.
    log.add(MEDICATION[12:16])
    again = monitoring_flow(cfg)
    assert again.drift.verdict == "drift" and again.episode == after.episode
    assert again.retraining_flow_run_id == after.retraining_flow_run_id and not again.retraining_started
    assert again.embedded_new == 4
    assert len(training_runs(deployment_id)) == 1
    last = monitoring_flow(cfg)
    assert last.embedded_new == 0  # a check of an unchanged log embeds nothing
    assert InferenceLog(inference_db_url(cfg)).embedding_count() == 28

    # The report: every signal, pictures, logged to the check's MLflow run; figures on the timeline.
    page = again.report.read_text()
    assert page.count("data:image/png;base64,") >= 5
    for signal in (
        "prompt_embedding",
        "prompt_length",
        "new_vocabulary",
        "response_length",
        "refusal_rate",
        "toxicity_rate",
        "guardrail_rate",
        "latency",
        "error_rate",
        "cost",
        "feedback",
        "prompt_versions",
    ):
        assert f"<td>{signal}</td>" in page
    assert "labelled rows of" in page and after.episode in page
    client = MlflowClient(tracking_uri(cfg))
    assert [a.path for a in client.list_artifacts(again.mlflow_run_id)] == [again.report.name]
    record = client.get_run(again.mlflow_run_id)
    assert record.data.tags["tuneloop.retraining_run"] == after.retraining_flow_run_id
    timeline = record.data.tags["mlflow.parentRunId"]
    history = client.get_metric_history(timeline, "prompt_embedding/p_value")
    assert [m.step for m in history] == [1, 2, 3, 4] and history[0].value > history[1].value

    from prefect import get_client

    with get_client(sync_client=True) as prefect:
        artifact = prefect.read_latest_artifacts()  # the newest of each key
    report = [a for a in artifact if a.key == "monitoring-report"]
    assert report and "Prompt drift: **drift**" in report[0].data and str(last.report) in report[0].data


def test_overlapping_checks_start_one_run_and_train_on_good_feedback(setup) -> None:
    cfg, log, deployment_id, _ = setup
    log.add(TRAFFIC[:4])
    ids = log.add(MEDICATION[:12], response="Take it with food, twice a day.")
    for rid in ids[:11]:
        log.store.add_feedback(rid, 1.0)
    log.store.add_feedback(ids[11], 0.0)  # a bad answer does not become a training example

    results, errors = [], []

    def check() -> None:
        try:
            results.append(monitoring_flow(cfg))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert [r.drift.verdict for r in results] == ["drift", "drift"]
    assert results[0].episode == results[1].episode
    assert results[0].retraining_flow_run_id == results[1].retraining_flow_run_id
    assert sorted(r.retraining_started for r in results) == [False, True]  # one created it, one found it
    runs = training_runs(deployment_id)
    assert len(runs) == 1
    data = Path(runs[0].parameters["config"]["data"]["path"])
    assert data.parent == cfg.home / "data" / "retrain"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    labelled = (ASSETS / "tiny_medication.jsonl").read_text().splitlines()
    assert len(rows) == 11 + len(labelled)  # the approved answers first, then the labelled set
    assert rows[0] == {
        "messages": [
            {"role": "user", "content": MEDICATION[0]},
            {"role": "assistant", "content": "Take it with food, twice a day."},
        ]
    }
    assert runs[0].parameters["config"]["data"]["messages_field"] == "messages"


def test_a_check_that_crashes_before_starting_leaves_no_run_and_the_next_one_starts_it(setup, monkeypatch) -> None:
    import tasks.retrain

    cfg, log, deployment_id, _ = setup
    log.add(MEDICATION[:12])

    def crash(*args, **kwargs):
        raise RuntimeError("worker lost between the decision and the training run")

    monkeypatch.setattr(tasks.retrain, "start_retraining", crash)
    with pytest.raises(RuntimeError, match="worker lost"):
        monitoring_flow(cfg)
    assert training_runs(deployment_id) == []
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.registry.monitoring_experiment).experiment_id
    pending = client.search_runs([experiment], "tags.`tuneloop.retraining_run` = 'pending'")
    assert len(pending) == 1
    episode = pending[0].data.tags["tuneloop.episode"]

    monkeypatch.undo()
    log.add(MEDICATION[12:14])
    resumed = monitoring_flow(cfg)
    assert resumed.episode == episode and resumed.retraining_started
    assert [str(r.id) for r in training_runs(deployment_id)] == [resumed.retraining_flow_run_id]


def test_no_champion_and_an_empty_log_are_no_data_not_errors(tmp_path, models_dir, prefect_api) -> None:
    cfg = make_config(tmp_path / "home", models_dir)
    apply_environment(cfg, prefect_api=False)
    result = monitoring_flow(cfg)
    assert result.drift.verdict == "no_data" and result.champion_version is None
    assert {s.verdict for s in result.signals} == {"no_data"}
    assert result.retraining_flow_run_id is None and result.report.exists()

    register_champion(cfg, TRIVIA)
    store = InferenceLog(inference_db_url(cfg))
    with store.engine.begin() as conn:  # one unreadable row: skipped and counted, not a failure
        from sqlalchemy import text

        conn.execute(
            text(
                "INSERT INTO inference_log (id, created_at, route, model, prompt, status) "
                "VALUES ('x', 'not a time', 'r', 'm', 'p', 200)"
            )
        )
    result = monitoring_flow(cfg, window=20)
    assert result.drift.verdict == "no_data" and result.skipped_rows == 1
    assert "training prompts of champion v1" in result.report.read_text()


def test_cli_monitor_prints_every_signal(setup) -> None:
    cfg, log, _, _ = setup
    log.add(TRAFFIC[:12])
    env = {**os.environ, "TUNELOOP_HOME": str(cfg.home), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    sets = [
        a
        for s in ("model.base=builtin:tiny-llama", "monitor.min_samples=8", "monitor.permutations=100")
        for a in ("--set", s)
    ]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tuneloop"), "monitor", "--window", "12", *sets],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for signal in (
        "prompt_embedding",
        "prompt_length",
        "new_vocabulary",
        "response_length",
        "refusal_rate",
        "toxicity_rate",
        "guardrail_rate",
        "latency",
        "error_rate",
        "cost",
        "feedback",
        "prompt_versions",
    ):
        assert signal in out
    assert "Prompt drift: no_drift" in out and "p=" in out and "Report:" in out
