"""The training flow end to end on the tiny model: real Prefect (test harness), real MLflow
(SQLite in a temp dir), real great-expectations, real Trainer + PEFT steps."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.training import training_flow
from tasks.data import DataValidationError
from tests.conftest import ASSETS
from tuneloop.state import apply_environment, tracking_uri

pytestmark = pytest.mark.slow


@pytest.fixture
def register_only(cfg, prefect_api):
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"on_new_champion": "register_only"})})
    apply_environment(cfg, prefect_api=False)
    return cfg


def test_trains_registers_and_aliases_with_lineage(register_only) -> None:
    cfg = register_only
    first = training_flow(cfg)
    assert first.champion and first.version.version == "1"
    client = MlflowClient(tracking_uri(cfg))
    mv = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(mv.version) == "1"
    for tag in ("tuneloop.base_sha256", "tuneloop.dataset_digest", "tuneloop.training_run", "eval.rougeL"):
        assert mv.tags[tag], tag
    run = client.get_run(first.version.run_id)
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}  # context -> dataset
    assert set(inputs) == {"training", "evaluation"} and inputs["training"].source
    assert run.data.tags["tuneloop.validation"] == "passed" and run.data.metrics["validation/errors"] == 0
    assert "validation/dataset_report.html" in [a.path for a in client.list_artifacts(run.info.run_id, "validation")]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == cfg.train.max_steps

    # The registered version answers through MLflow's own loader, by alias.
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    prompts = pd.DataFrame({"prompt": ["What is 1 plus 1?", "What is the capital of Peru?"]})
    answers = model.predict(prompts, params={"max_new_tokens": 3})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    second = training_flow(cfg)  # same data: the gate compares against v1 on the same split
    assert second.version.version == "2" and second.champion_metrics is not None
    assert {d.metric for d in second.comparison} == {"rougeL", "exact_match", "token_f1"}
    assert all(d.low <= d.mean <= d.high for d in second.comparison)
    logged = client.get_run(second.version.run_id).data.metrics
    for key in ("eval/bleu", "eval/perplexity", "eval/p95_latency_ms", "eval/vs_champion_rougeL_ci_low"):
        assert key in logged, key
    assert "eval_report.html" in [a.path for a in client.list_artifacts(second.version.run_id)]
    assert second.dataset_digest == first.dataset_digest
    again = {d.tags[0].value: d.dataset for d in client.get_run(second.version.run_id).inputs.dataset_inputs}
    assert again["training"].digest == inputs["training"].digest  # same data, same digest in the UI
    alias = str(client.get_model_version_by_alias(cfg.registry.model_name, "champion").version)
    assert alias == ("2" if second.champion else "1")


def test_missing_field_fails_before_training(register_only, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (ASSETS / "tiny_qa.jsonl").read_text().splitlines()]
    rows[3].pop("response")
    rows[7]["response"] = ""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = register_only.model_copy(update={"data": register_only.data.model_copy(update={"path": str(bad)})})
    with pytest.raises(DataValidationError) as err:
        training_flow(cfg)
    message = str(err.value)
    assert str(bad) in message and 'field "response"' in message and "4" in message and "8" in message
    client = MlflowClient(tracking_uri(cfg))
    assert client.search_registered_models() == []  # nothing trained or registered
    assert not list((cfg.home / "runs").iterdir())
    # The failed run keeps the evidence: the report, the reason, and no training metric.
    [run] = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["tuneloop.validation"] == "failed"
    assert 'field "response"' in run.data.tags["tuneloop.failure"]
    assert not client.get_metric_history(run.info.run_id, "train/loss")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "validation")]


def test_contract_violation_fails_before_training(register_only, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (ASSETS / "tiny_qa.jsonl").read_text().splitlines()]
    rows[5]["prompt"] = "Please explain at length why the sky looks blue on a clear day. " * 5
    bad = tmp_path / "long.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = register_only.model_copy(update={"data": register_only.data.model_copy(update={"path": str(bad)})})
    with pytest.raises(DataValidationError, match="contract loss_mask \\(error\\).*first offending rows: 6"):
        training_flow(cfg)
    assert MlflowClient(tracking_uri(cfg)).search_registered_models() == []


def test_missing_file_fails_naming_it(register_only, tmp_path: Path) -> None:
    cfg = register_only.model_copy(
        update={"data": register_only.data.model_copy(update={"path": str(tmp_path / "absent.jsonl")})})
    with pytest.raises(DataValidationError, match="absent.jsonl does not exist"):
        training_flow(cfg)
