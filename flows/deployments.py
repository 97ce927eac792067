"""Serve the training, promotion and monitoring flows as Prefect deployments.

    python -m flows.deployments --config configs/local.yaml     # what `tuneloop up` runs

Each deployment's default parameters are the given config, so the Prefect UI shows it as a
form; a run started from the UI or by `run_deployment` executes in this runner's machine.
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.monitoring import monitoring_flow
from flows.promotion import promotion_flow
from flows.training import training_flow
from tuneloop.config import TuneloopConfig, load_config


def monitoring_parameters(cfg: TuneloopConfig) -> dict:
    """Return the monitoring deployment's parameters: the config, and the knobs a run may change."""
    m = cfg.monitor
    return {"config": cfg.model_dump(mode="json"), "window": m.window, "reference": m.reference,
            "thresholds": m.thresholds.model_dump(mode="json"), "persistence": m.persistence.model_dump(mode="json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default configs/local.yaml)")
    parser.add_argument("--no-schedules", action="store_true", help="Register the monitoring cron paused")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    params = {"config": cfg.model_dump(mode="json")}
    training_name = cfg.prefect.training_deployment.split("/", 1)[1]
    serve(
        # One training at a time on this machine: later runs wait in the deployment's queue.
        training_flow.to_deployment(name=training_name, parameters=params, tags=["tuneloop"],
                                    concurrency_limit=1),
        promotion_flow.to_deployment(name="tuneloop-promotion", parameters=params, tags=["tuneloop"]),
        # Overlapping checks would only wait on each other's decision (tasks.retrain): a check
        # that comes due while one runs is cancelled, the next cron tick reads the newer window.
        monitoring_flow.to_deployment(
            name="tuneloop-monitoring", parameters=monitoring_parameters(cfg), tags=["tuneloop"],
            cron=cfg.monitor.cron, paused=args.no_schedules,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        ),
        print_starting_message=False,
    )


if __name__ == "__main__":
    main()
