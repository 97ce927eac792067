"""Foundation-model selection end to end: two real (tiny) base models on one set, real Prefect
(test harness) and MLflow (SQLite in a temp dir); bad input fails before any generation."""

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from flows.selection import model_selection_flow
from tasks.data import DataValidationError
from tasks.evaluate import EvalSetError
from tests.conftest import ASSETS
from tuneloop.config import TuneloopConfig
from tuneloop.models import BaseModelError, load_base, resolve_base
from tuneloop.state import apply_environment, tracking_uri

pytestmark = pytest.mark.slow


@pytest.fixture
def selection(cfg, prefect_api) -> TuneloopConfig:
    apply_environment(cfg, prefect_api=False)
    return cfg


@pytest.fixture(scope="module")
def other_model(models_dir: Path, tmp_path_factory) -> Path:
    """A saved copy of the tiny model with its weights scaled: another model, other answers."""
    model, tok = load_base(resolve_base("builtin:tiny-llama", models_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    out = tmp_path_factory.mktemp("other") / "tiny-scaled"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def runs(cfg: TuneloopConfig) -> list:
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.registry.selection_experiment)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_two_models_one_run_each_and_a_leaderboard(selection, other_model) -> None:
    cfg = selection
    models = ["builtin:tiny-llama", str(other_model)]
    result = model_selection_flow(cfg, models, rank_by="perplexity")
    assert [r.rank for r in result.rows] == [1, 2] and {r.model for r in result.rows} == set(models)
    perplexities = [r.metrics["perplexity"] for r in result.rows]
    assert perplexities == sorted(perplexities) and perplexities[0] != perplexities[1]  # lower is better
    assert result.columns[0] == "perplexity" and "rougeL" in result.columns and "toxicity_rate" in result.columns

    client = MlflowClient(tracking_uri(cfg))
    children = [r for r in runs(cfg) if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert sorted(r.data.tags["tuneloop.model"] for r in children) == sorted(models)
    for run in children:  # the metric names of training runs: the compare view lines them up
        for key in ("eval/rougeL", "eval/perplexity", "eval/toxicity_rate", "eval/p95_latency_ms"):
            assert key in run.data.metrics, key
        assert "eval/examples.json" in [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
    parent = client.get_run(result.parent_run_id)
    board = client.load_table(parent.info.experiment_id, "leaderboard.json", [result.parent_run_id])
    assert list(board["model"]) == [r.model for r in result.rows] and list(board["rank"]) == [1, 2]
    assert parent.inputs.dataset_inputs and parent.data.params["rank_by"] == "perplexity"


@pytest.mark.parametrize("problem", ["empty", "missing", "no response field"])
def test_a_bad_eval_set_fails_before_any_generation(selection, tmp_path, problem) -> None:
    path = tmp_path / "eval.jsonl"
    if problem == "empty":
        path.write_text("\n")
    elif problem == "no response field":
        path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n" for i in range(3)))
    cfg = selection.model_copy(update={"data": selection.data.model_copy(update={"path": path})})
    expected = {
        "empty": (EvalSetError, "holds no rows"),
        "missing": (DataValidationError, "does not exist"),
        "no response field": (EvalSetError, "no response field in any row"),
    }[problem]
    with pytest.raises(expected[0], match=expected[1]):
        model_selection_flow(cfg, ["builtin:tiny-llama"])
    assert runs(cfg) == []


@pytest.mark.parametrize(
    "models,rank_by,error,message",
    [
        ([], "rougeL", ValueError, "No model to evaluate"),
        (["builtin:tiny-llama", "builtin:tiny-llama"], "rougeL", ValueError, "listed twice: builtin:tiny-llama"),
        (["builtin:tiny-llama"], "rouge", ValueError, "Cannot rank by 'rouge'.*choose one of rougeL"),
        (["builtin:tiny-llama", "builtin:nope"], "rougeL", BaseModelError, "Unknown builtin base model"),
    ],
)
def test_bad_models_or_metric_fail_before_any_generation(selection, models, rank_by, error, message) -> None:
    cfg = selection.model_copy(update={"data": selection.data.model_copy(update={"path": ASSETS / "tiny_qa.jsonl"})})
    with pytest.raises(error, match=message):
        model_selection_flow(cfg, models, rank_by=rank_by)
    assert runs(cfg) == []


def test_a_model_by_prompt_grid_ranks_each_pair(selection) -> None:
    from tasks.prompts import register_prompt

    cfg = selection
    plain, _ = register_prompt(cfg, "style", [{"role": "system", "content": "Answer in one word."}], "terse", "ana")
    framed, _ = register_prompt(cfg, "style", "Question: {{input}}\nAnswer:", "framed", "ana")
    result = model_selection_flow(cfg, ["builtin:tiny-llama"], rank_by="rougeL", prompts=[plain.ref, framed.ref])
    assert {r.model for r in result.rows} == {"builtin:tiny-llama × style/1", "builtin:tiny-llama × style/2"}
    children = [r for r in runs(cfg) if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert sorted(r.data.tags["tuneloop.prompt_version"] for r in children) == ["style/1", "style/2"]
    assert {r.data.tags["mlflow.runName"] for r in children} == {f"builtin:tiny-llama × style/{i}" for i in (1, 2)}
