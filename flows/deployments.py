"""Register the training, promotion, monitoring, prompt, collection and optimization flows as Prefect deployments.

    python -m flows.deployments --config configs/local.yaml     # serve them from this process
    python -m flows.deployments --config configs/team.yaml      # work pools + prefect.yaml, then exit

Which one follows `prefect.deployments` in the config. `serve` (the embedded default, what
`tuneloop up` runs in the background): this process serves the deployments and runs
their flow runs. `work_pools`: create the work pools of infra/prefect/work-pools.yaml, store the
config in the Prefect variables that prefect.yaml reads, and run `prefect deploy --all`;
workers of those pools run the flows. Either way each deployment's default parameters are the
given config, so the Prefect UI shows it as a form.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.collections import ingest_collection_flow
from flows.monitoring import monitoring_flow
from flows.optimization import optimization_flow
from flows.promotion import promotion_flow, prompt_promotion_flow
from flows.prompts import prompt_evaluation_flow
from flows.training import training_flow
from tuneloop.config import REPO_ROOT, TuneloopConfig, load_config

PREFECT_YAML = REPO_ROOT / "prefect.yaml"
WORK_POOLS = REPO_ROOT / "infra" / "prefect" / "work-pools.yaml"
# Read by prefect.yaml as `{{ prefect.variables.<name> }}` when `prefect deploy` runs.
CONFIG_VARIABLE = "tuneloop_config"
CRON_VARIABLE = "tuneloop_monitor_cron"


def monitoring_parameters(cfg: TuneloopConfig) -> dict:
    """Return the monitoring deployment's parameters: the config, and the knobs a run may change."""
    m = cfg.monitor
    return {
        "config": cfg.model_dump(mode="json"),
        "window": m.window,
        "reference": m.reference,
        "thresholds": m.thresholds.model_dump(mode="json"),
        "persistence": m.persistence.model_dump(mode="json"),
    }


def serve_deployments(cfg: TuneloopConfig, *, schedules: bool) -> None:
    """Serve the deployments from this process until it is stopped."""
    params = {"config": cfg.model_dump(mode="json")}

    def name(full: str) -> str:  # "<flow>/<deployment>" → the deployment's own name
        return full.split("/", 1)[1]

    serve(
        # One training at a time on this machine: later runs wait in the deployment's queue.
        training_flow.to_deployment(
            name=name(cfg.prefect.training_deployment), parameters=params, tags=["tuneloop"], concurrency_limit=1
        ),
        promotion_flow.to_deployment(name=name(cfg.prefect.promotion_deployment), parameters=params, tags=["tuneloop"]),
        # Prompt versions: their form asks for the version (name/VERSION or name@alias).
        prompt_evaluation_flow.to_deployment(
            name=name(cfg.prefect.prompt_evaluation_deployment), parameters=params, tags=["tuneloop"]
        ),
        prompt_promotion_flow.to_deployment(
            name=name(cfg.prefect.prompt_promotion_deployment), parameters=params, tags=["tuneloop"]
        ),
        # Documents into a collection: the form asks for the path and the collection's name.
        ingest_collection_flow.to_deployment(
            name=name(cfg.prefect.collection_ingest_deployment), parameters=params, tags=["tuneloop"]
        ),
        # A derived (merged, quantized) version: the form asks for the version and the method.
        optimization_flow.to_deployment(
            name=name(cfg.prefect.optimization_deployment), parameters=params, tags=["tuneloop"], concurrency_limit=1
        ),
        # Overlapping checks would only wait on each other's decision (tasks.retrain): a check
        # that comes due while one runs is cancelled, the next cron tick reads the newer window.
        monitoring_flow.to_deployment(
            name=name(cfg.prefect.monitoring_deployment),
            parameters=monitoring_parameters(cfg),
            tags=["tuneloop"],
            cron=cfg.monitor.cron,
            paused=not schedules,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        ),
        print_starting_message=False,
    )


def deployment_config(cfg: TuneloopConfig) -> dict[str, Any]:
    """Return the config as the work-pool deployments' parameter: what differs from the defaults.

    The state dir is left out: each worker has its own (TUNELOOP_HOME in its environment).
    Defaults fill in again when the flow validates its parameter, and the UI form shows them.
    """
    return cfg.model_dump(mode="json", exclude={"home"}, exclude_defaults=True)


def register_work_pools() -> list[str]:
    """Create or update the work pools of infra/prefect/work-pools.yaml; return their names."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pools = yaml.safe_load(WORK_POOLS.read_text())["pools"]
    with get_client(sync_client=True) as client:
        for pool in pools:
            template = json.loads((WORK_POOLS.parent / pool["base_job_template"]).read_text())
            client.create_work_pool(
                WorkPoolCreate(
                    name=pool["name"],
                    type=pool["type"],
                    base_job_template=template,
                    description=pool.get("description"),
                    concurrency_limit=pool.get("concurrency_limit"),
                ),
                overwrite=True,
            )
    return [pool["name"] for pool in pools]


def apply_prefect_yaml(cfg: TuneloopConfig) -> None:
    """Register prefect.yaml's deployments on their work pools with `cfg` as their parameters."""
    from prefect.types import MAX_VARIABLE_VALUE_LENGTH
    from prefect.variables import Variable

    params = deployment_config(cfg)
    size = len(json.dumps(params))
    if size > MAX_VARIABLE_VALUE_LENGTH:
        raise ValueError(
            f"The config differs from the defaults by {size} characters of JSON; a Prefect variable "
            f"holds at most {MAX_VARIABLE_VALUE_LENGTH}: move long values (rules, lists) to defaults "
            "or files"
        )
    register_work_pools()
    Variable.set(CONFIG_VARIABLE, params, tags=["tuneloop"], overwrite=True)
    Variable.set(CRON_VARIABLE, cfg.monitor.cron, tags=["tuneloop"], overwrite=True)
    # Prefect's own reading of prefect.yaml (templating, schedules, pull steps), not a copy of it.
    subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML)],
        cwd=REPO_ROOT,
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default configs/local.yaml)")
    parser.add_argument("--no-schedules", action="store_true", help="serve: register the monitoring cron paused")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.config:  # the runs this process starts check their parameters against this file's security section
        os.environ["TUNELOOP_CONFIG"] = str(Path(args.config).resolve())
    if cfg.prefect.deployments == "work_pools":
        apply_prefect_yaml(cfg)
    else:
        serve_deployments(cfg, schedules=not args.no_schedules)


if __name__ == "__main__":
    main()
