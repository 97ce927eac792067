"""prefect.yaml on work pools: `python -m flows.deployments` with `prefect.deployments: work_pools`
creates the pools of infra/prefect/work-pools.yaml and registers the deployments with the config
as their parameters, on a real Prefect server; the process worker `tuneloop up` starts then runs
a training from the pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.deployments import CONFIG_VARIABLE, WORK_POOLS, apply_prefect_yaml, deployment_config
from tests.conftest import ASSETS, LOCAL_CONFIG, TINY, make_config
from tuneloop.config import TuneloopConfig

pytestmark = pytest.mark.slow

NAMES = {
    "training-flow/tuneloop-training": "tuneloop-process",
    "training-flow/tuneloop-training-gpu": "tuneloop-gpu",
    "promotion-flow/tuneloop-promotion": "tuneloop-process",
    "monitoring-flow/tuneloop-monitoring": "tuneloop-process",
}


@pytest.fixture
def team_cfg(tmp_path: Path, models_dir: Path) -> TuneloopConfig:
    return make_config(
        tmp_path / "home",
        models_dir,
        f"data.path={ASSETS / 'tiny_qa.jsonl'}",
        "prefect.deployments=work_pools",
        "registry.on_gate_pass=register_only",
        "monitor.cron='*/20 * * * *'",
    )


def test_prefect_yaml_registers_pools_and_deployments_with_the_config(
    prefect_api: str,
    team_cfg: TuneloopConfig,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from prefect import get_client
    from prefect.variables import Variable

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # for `prefect deploy`, a subprocess
    apply_prefect_yaml(team_cfg)
    apply_prefect_yaml(team_cfg)  # again: pools and deployments are updated, not duplicated

    assert Variable.get(CONFIG_VARIABLE) == deployment_config(team_cfg)
    with get_client(sync_client=True) as client:
        for pool in yaml.safe_load(WORK_POOLS.read_text())["pools"]:
            stored = client.read_work_pool(pool["name"])
            assert stored.type == pool["type"]
            assert stored.base_job_template == json.loads((WORK_POOLS.parent / pool["base_job_template"]).read_text())
        for name, pool in NAMES.items():
            deployment = client.read_deployment_by_name(name)
            assert deployment.work_pool_name == pool, name
            # The form's defaults: the config given, whatever state dir the worker has.
            config = deployment.parameters["config"]
            assert TuneloopConfig.model_validate({**config, "home": str(team_cfg.home)}) == team_cfg, name
            assert "TuneloopConfig" in json.dumps(deployment.parameter_openapi_schema)
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $TUNELOOP_REPO_DIR }}"}}
            ]
        training = client.read_deployment_by_name("training-flow/tuneloop-training")
        assert training.global_concurrency_limit.limit == 1
        monitoring = client.read_deployment_by_name("monitoring-flow/tuneloop-monitoring")
        assert [s.schedule.cron for s in monitoring.schedules] == ["*/20 * * * *"]
        assert all(s.active for s in monitoring.schedules)


def test_a_process_worker_runs_a_training_from_the_pool(
    prefect_api: str,
    team_cfg: TuneloopConfig,
    tmp_path: Path,
) -> None:
    """What `tuneloop up` does in work_pools mode, without Ray: register, start a worker, train."""
    import mlflow
    from prefect.deployments import run_deployment

    from tuneloop import services
    from tuneloop.state import tracking_uri

    overrides = [
        *TINY,
        f"home={team_cfg.home}",
        f"data.path={team_cfg.data.path}",
        "registry.on_gate_pass=register_only",
        "monitor.cron='*/20 * * * *'",
    ]
    services.apply_work_pool_deployments(team_cfg, LOCAL_CONFIG, overrides=overrides, api_url=prefect_api)
    services.start_worker(team_cfg, api_url=prefect_api)
    try:
        run = run_deployment("training-flow/tuneloop-training", timeout=600, parameters={"trigger": "work pool test"})
        log = (team_cfg.home / "services" / "worker.log").read_text()[-4000:]
        assert run.state.is_completed(), f"{run.state}\n{log}"
    finally:
        assert services.stop_service(team_cfg, "worker")
    client = mlflow.MlflowClient(tracking_uri(team_cfg))  # the worker's state dir: TUNELOOP_HOME
    versions = client.search_model_versions(f"name='{team_cfg.registry.model_name}'")
    assert [v.tags["tuneloop.trigger"] for v in versions] == ["work pool test"]
