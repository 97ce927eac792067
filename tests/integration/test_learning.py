"""The loop learns and cannot forget, on the tiny model with real training (tests/conftest.py LEARNING):
a first version is gated against the base it starts from; a retraining that forgets the champion's
slice is rejected by the default rules, and the same retraining with replay passes."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.training import training_flow
from tasks.registry import promote_champion
from tasks.retrain import replay_rows
from tests.conftest import ASSETS, LEARNING, make_config
from tests.integration.test_training_flow import updated
from tuneloop.state import apply_environment, tracking_uri

pytestmark = pytest.mark.slow


@pytest.fixture
def learning(tmp_path, models_dir, prefect_api):
    cfg = make_config(
        tmp_path / "home",
        models_dir,
        f"data.path={ASSETS / 'tiny_colours.jsonl'}",
        *LEARNING,
        "registry.on_gate_pass=register_only",
    )
    apply_environment(cfg, prefect_api=False)
    return cfg


def _on(cfg, path: Path, **data):
    return updated(cfg, data={"path": str(path), **data})


def test_first_version_beats_its_base_and_retraining_without_replay_forgets(learning, tmp_path: Path) -> None:
    cfg = learning
    first = training_flow(_on(cfg, ASSETS / "tiny_colours.jsonl"))
    # Compared with the base it starts from: no rule is skipped for want of a champion.
    assert first.compared_with.startswith("base"), first.compared_with
    assert first.decision == "passed", first.rules
    assert not any(line.startswith("SKIPPED") for line in first.rules), first.rules
    [gain] = [d for d in first.comparison if d.metric == "token_f1" and d.slice == "tiny_colours"]
    assert gain.low > 0, gain  # better than the base with confidence
    assert promote_champion.fn(first.version, cfg.registry, "test: served") is None

    # Retrained on another topic with nothing of the first: it forgets "blue", and the rule over
    # the earlier slice rejects it, though it learned its own slice.
    forgot = training_flow(_on(cfg, ASSETS / "tiny_counts.jsonl"))
    assert forgot.slices[:2] == ["tiny_counts@1", "tiny_colours@1"], forgot.slices
    assert forgot.decision == "rejected", forgot.rules
    assert forgot.figures["tiny_counts"]["token_f1"] > first.figures["tiny_colours"]["token_f1"] - 0.5
    failed = [line for line in forgot.rules if line.startswith("FAIL")]
    assert failed and all("token_f1[tiny_colours]" in line for line in failed), forgot.rules
    assert any(line.startswith("PASS: ci_low(token_f1[new] - champion) > 0") for line in forgot.rules), forgot.rules
    client = MlflowClient(tracking_uri(cfg))
    assert client.get_registered_model(cfg.registry.model_name).aliases == {"champion": 1}

    # The same retraining with the champion's own training rows replayed (half the set) keeps both.
    replay = replay_rows(first.version, 80, 0.5, "test", tmp_path / "replay-source")
    assert len(replay) == 72  # every row v1 trained on (8 of 80 were held out)
    replay_file = tmp_path / "replay.jsonl"
    replay_file.write_text("".join(json.dumps(r) + "\n" for r in replay))
    kept = training_flow(_on(cfg, ASSETS / "tiny_counts.jsonl", replay_path=str(replay_file)))
    assert kept.decision == "passed", kept.rules
    assert kept.figures["tiny_colours"]["token_f1"] >= first.figures["tiny_colours"]["token_f1"] - 0.02
    mv = client.get_model_version(cfg.registry.model_name, kept.version.version)
    assert mv.tags["tuneloop.replay_rows"] == "72", mv.tags
    # The figures per slice sit under the same names in every run, so MLflow's compare view lines them up.
    for result in (forgot, kept):
        logged = client.get_run(result.version.run_id).data.metrics
        assert {"eval/tiny_counts/token_f1", "eval/tiny_colours/token_f1"} <= set(logged), sorted(logged)
