from pathlib import Path

import pytest

from tuneloop.config import REPO_ROOT, ConfigError, TuneloopConfig, apply_overrides, load_config

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, TuneloopConfig)
    assert cfg.home.is_absolute()


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(None, ["train.max_steps=3", "train.target_modules=[q_proj]", 'gate.rules=["bleu >= 0.1"]'])
    assert cfg.train.max_steps == 3
    assert cfg.train.target_modules == ["q_proj"]
    assert cfg.gate.rules == ["bleu >= 0.1"]


def test_registry_accepts_the_old_name_of_on_gate_pass() -> None:
    old = TuneloopConfig.model_validate({"registry": {"on_new_champion": "register_only"}})
    assert old.registry.on_gate_pass == "register_only"
    assert "on_new_champion" not in old.model_dump()["registry"]  # deployments store the new name
    with pytest.raises(ConfigError, match="on_new_champion='register_only' .* contradicts"):
        load_config(None, ["registry.on_new_champion=register_only"])  # local.yaml sets on_gate_pass: promote
    with pytest.raises(ConfigError, match="champion_alias and challenger_alias are both 'champion'"):
        load_config(None, ["registry.challenger_alias=champion"])


def test_home_follows_tuneloop_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "state"))
    assert load_config().home == tmp_path / "state"


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="train.max_stpes"):
        load_config(None, ["train.max_stpes=3"])


def test_invalid_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=0"])


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.max_steps"])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_validation_knobs_are_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="'expect_nonsense' is not a great-expectations expectation"):
        load_config(None, ["validation.expectations=[{type: expect_nonsense}]"])
    with pytest.raises(ConfigError, match="unknown PII entities \\['PASSPORT'\\]"):
        load_config(None, ["validation.pii.entities=[EMAIL_ADDRESS, PASSPORT]"])
    with pytest.raises(ConfigError, match="validation.duplicates.level"):
        load_config(None, ["validation.duplicates.level=sometimes"])
    cfg = load_config(None, ["validation.pii.level=redact", "validation.truncation.level=error"])
    assert cfg.validation.pii.level == "redact" and cfg.validation.loss_mask.level == "error"


def test_deployment_names_are_flow_slash_deployment_and_listed_once() -> None:
    cfg = load_config(None, ["prefect.promotion_deployment=promotion-flow/blue"])
    assert cfg.prefect.deployment_names == [
        "training-flow/tuneloop-training",
        "promotion-flow/blue",
        "monitoring-flow/tuneloop-monitoring",
        "prompt-evaluation-flow/tuneloop-prompt-evaluation",
        "prompt-promotion-flow/tuneloop-prompt-promotion",
        "collection-ingest-flow/tuneloop-collection-ingest",
        "optimization-flow/tuneloop-optimization",
    ]
    with pytest.raises(ValueError, match="'tuneloop-promotion' is not '<flow name>/<deployment name>'"):
        load_config(None, ["prefect.promotion_deployment=tuneloop-promotion"])


def test_a_run_may_not_point_beyond_the_workers_allow_lists(tmp_path: Path) -> None:
    """A run's config is a parameter: its judge URL (where a key is sent) and its paths are
    checked against the security section of the worker's own config, not the run's."""
    from tuneloop.config import SecurityConfig, check_run_parameters

    trusted = SecurityConfig(allowed_hosts=["127.0.0.1", "judge.internal"], allowed_paths=[str(tmp_path)])
    ok = load_config(
        None,
        [
            "eval.judge={backend: openai, base_url: 'http://judge.internal:9000/v1', model: j}",
            f"data.path={tmp_path / 'train.jsonl'}",
        ],
    )
    check_run_parameters(ok, trusted)
    evil = load_config(
        None,
        [
            "eval.judge={backend: openai, base_url: 'https://attacker.example/v1', model: j, api_key_env: JUDGE_KEY}",
            "data.path=/etc/passwd",
            # widening its own allow-list changes nothing: the worker's is the one read
            "security.allowed_hosts=[attacker.example]",
        ],
    )
    with pytest.raises(ConfigError) as err:
        check_run_parameters(evil, trusted)
    assert "eval.judge.base_url names host 'attacker.example'" in str(err.value)
    assert "data.path '/etc/passwd' is outside security.allowed_paths" in str(err.value)
    hub = load_config(None, ["data.path=someone/dataset", "data.format=hub"])
    check_run_parameters(hub, trusted)  # a hub id is not a path


def test_the_registry_always_follows_the_tracking_store(tmp_path) -> None:
    """A registry URI left in the environment (MLflow's set_registry_uri exports one) would send
    every client built with only a tracking URI to another store: tuneloop's environment drops it."""
    import os

    from tuneloop.state import apply_environment

    saved = dict(os.environ)
    try:
        os.environ["MLFLOW_REGISTRY_URI"] = "sqlite:///somewhere-else.db"
        apply_environment(load_config(None, [f"home={tmp_path}"]), prefect_api=False)
        assert "MLFLOW_REGISTRY_URI" not in os.environ
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_yaml_reads_off_and_no_as_text_and_only_true_false_as_booleans(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("serve:\n  require_api_key: true\n  guardrails:\n    chat: {pii: off, toxicity: flag}\n")
    cfg = load_config(path)
    assert cfg.serve.require_api_key is True and cfg.serve.guardrails.chat.pii == "off"
    assert (
        load_config(None, ["serve.guardrails.completions.toxicity=off"]).serve.guardrails.completions.toxicity == "off"
    )


def test_a_derived_versions_rules_default_to_the_evaluated_metrics_and_are_checked() -> None:
    cfg = load_config(None, [])
    assert "weights_mb[all] <= champion * 0.5" in cfg.optimize.rules and cfg.optimize.method == "q8_0"
    narrow = load_config(None, ["eval.metrics=[token_f1]", "gate.rules=['token_f1[all] >= 0']"])
    assert narrow.optimize.rules == [
        "token_f1[all] >= champion - 0.02",
        "ci_low(bias_gap[all] - champion) <= 0.05",
        "weights_mb[all] <= champion * 0.5",
    ]
    with pytest.raises(ConfigError, match="metric rougeL is not evaluated"):
        load_config(
            None,
            [
                "eval.metrics=[token_f1]",
                "gate.rules=['token_f1[all] >= 0']",
                "optimize.rules=['rougeL[all] >= champion']",
            ],
        )
    with pytest.raises(ConfigError, match="optimize.method"):
        load_config(None, ["optimize.method=int3"])
