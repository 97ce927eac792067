"""Monitoring flow: test recent prompts for drift against the champion's training prompts,
and start retraining through the training deployment when they drifted.

    tuneloop monitor                 # one check now
    (scheduled by `tuneloop up` from monitor.cron)
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.drift import (
    DriftResult,
    detect_drift,
    embed_texts,
    log_monitoring_run,
    read_window,
    start_retraining,
    write_drift_report,
)
from tasks.registry import find_champion, reference_prompts
from tuneloop.config import TuneloopConfig, load_config
from tuneloop.state import inference_db_url, state_paths, tracking_uri


@dataclass
class MonitoringResult:
    drift: DriftResult
    champion_version: str | None
    mlflow_run_id: str
    retraining_flow_run_id: str | None


@flow(name="monitoring-flow")
def monitoring_flow(config: TuneloopConfig | None = None) -> MonitoringResult:
    """Check the newest requests for prompt drift; on drift start one retraining run."""
    cfg = config or load_config()
    logger = get_run_logger()
    paths = state_paths(cfg).ensure()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    m = cfg.monitor

    champion = find_champion(cfg.registry)
    rows = read_window(inference_db_url(cfg), m.window)
    # Test in a canonical order: concurrent requests land in the log in any order, and the
    # seeded permutation test should give one p-value for one set of requests.
    prompts = sorted(r["prompt"] for r in rows)
    ref_emb = cur_emb = np.zeros((0, 0))
    if champion is None:
        drift = DriftResult("no_data", None, None, 0, len(rows), None, "no champion to compare with")
    else:
        reference = reference_prompts(champion, paths.cache / "reference" / champion.version)
        ref_emb = embed_texts(reference[: m.reference_samples], m.embedding_model, paths.cache)
        cur_emb = (embed_texts(prompts, m.embedding_model, paths.cache)
                   if rows else np.zeros((0, ref_emb.shape[1])))
        drift = detect_drift(ref_emb, cur_emb, rows[0]["id"] if rows else None, m.min_samples,
                             m.permutations, m.alpha)
    logger.info("Drift verdict: %s (%s)", drift.verdict, drift.reason)
    report = write_drift_report(ref_emb, cur_emb, prompts, drift,
                                paths.reports / f"drift-{flow_run.get_id() or 'local'}.html")
    run_id = log_monitoring_run(cfg.registry.monitoring_experiment, drift,
                                champion.version if champion else None, report)

    retraining = None
    if drift.verdict == "drift" and m.retrain_data is not None:
        retrain_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(m.retrain_data)})})
        trigger = f"drift p={drift.p_value:.3g} (monitoring run {flow_run.get_name()})"
        retraining = start_retraining(
            cfg.prefect.training_deployment,
            {"config": retrain_cfg.model_dump(mode="json"), "trigger": trigger},
            idempotency_key=f"drift:{champion.version}:{drift.newest_request_id}",
        )
        logger.info("Started retraining flow run %s on %s", retraining, m.retrain_data)
    elif drift.verdict == "drift":
        logger.warning("Drift detected but monitor.retrain_data is not set: no retraining started")

    create_markdown_artifact(
        key="drift-check",
        markdown=(f"## Prompt drift: **{drift.verdict}**\n\n{drift.reason}\n\n"
                  f"| | |\n|---|---|\n| champion | v{champion.version if champion else '–'} |\n"
                  f"| window | {drift.window_size} requests |\n| reference | {drift.reference_size} prompts |\n"
                  f"| MLflow run | `{run_id}` (artifact `{report.name}`) |\n"
                  f"| report | `{report}` |\n| retraining flow run | {retraining or '–'} |"),
    )
    return MonitoringResult(drift, champion.version if champion else None, run_id, retraining)


if __name__ == "__main__":
    monitoring_flow()
