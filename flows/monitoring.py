"""Monitoring flow: test a window of logged requests against the champion's training prompts
(and its own first answers, its SLOs, its feedback), report in pictures, and start one
retraining run per drift episode when drift holds for k of the last n windows.

    tuneloop monitor --window 500               # one check now, verdicts in a table
    python -m flows.monitoring                  # the same with configs/local.yaml
    (scheduled: the `tuneloop-monitoring` deployment of flows/deployments.py, monitor.cron)

Parameters (each None: the config's monitor.* value): window (newest requests), reference
("champion" or a prompts file), thresholds (monitor.thresholds), persistence (k of n).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from tasks.drift import (
    DriftResult,
    Signal,
    compute_signals,
    judge_drift,
    monitor_settings,
    read_feedback,
    read_launch_window,
    read_reference,
    read_window,
)
from tasks.drift_report import ReportContext, publish_monitoring_report
from tasks.embeddings import embed_window
from tasks.privacy import expire
from tasks.registry import find_champion, open_state
from tasks.retrain import RetrainingTarget, decide_and_start_retraining
from tasks.retrieval.ingest import collection_staleness
from tuneloop.config import MonitorThresholds, Persistence, TuneloopConfig, check_run_parameters, load_config
from tuneloop.state import collections_location, inference_db_url


@dataclass
class MonitoringResult:
    drift: DriftResult
    champion_version: str | None
    mlflow_run_id: str
    retraining_flow_run_id: str | None  # the episode's training run (started now or by an earlier check)
    signals: list[Signal]
    episode: str | None = None
    retraining_started: bool = False  # this check created the training run
    decision: str = ""
    data_note: str = ""
    report: Path | None = None
    skipped_rows: int = 0
    embedded_new: int = 0


@flow(name="monitoring-flow")
def monitoring_flow(
    config: TuneloopConfig | None = None,
    window: int | None = None,
    reference: str | None = None,
    thresholds: MonitorThresholds | None = None,
    persistence: Persistence | None = None,
) -> MonitoringResult:
    """Check the newest requests on every signal, report, and retrain once per drift episode."""
    cfg = config or load_config()
    check_run_parameters(cfg)  # a run's config may not point beyond the worker's allow-lists
    m = monitor_settings(
        cfg.monitor, window=window, reference=reference, thresholds=thresholds, persistence=persistence
    )
    paths = open_state(cfg)
    db = inference_db_url(cfg)
    expire(cfg)  # privacy.retention_days: nothing older is read, or kept
    champion = find_champion(cfg.registry)
    win = read_window(db, m.window)
    ref = read_reference(m, champion, paths.cache)
    embeddings, embedded_new = embed_window(db, win, m)
    version = champion.version if champion else None
    baseline = read_launch_window(db, version, m.window, [r.id for r in win.answered])
    feedback = read_feedback(db, [r.id for r in win.answered])
    stale = collection_staleness(cfg.collections, collections_location(cfg))  # documents changed since ingested
    signals = compute_signals(ref, win, embeddings, baseline, feedback, m, stale)
    drift = judge_drift(signals, m, ref, win)
    label = flow_run.get_name() or "local"
    target = RetrainingTarget(cfg.prefect.training_deployment, cfg, paths.retraining_data, paths.models)
    trigger = decide_and_start_retraining(
        cfg.registry.monitoring_experiment, cfg.registry.model_name, champion, drift, win, feedback, m, target, label
    )
    context = ReportContext(
        f"v{version}" if version else "none",
        ref.source,
        trigger.decision.describe(m.persistence),
        trigger.decision.episode,
        trigger.retraining(),
        trigger.data_note,
        embedded_new,
        trigger.record_run_id,
    )
    report = publish_monitoring_report(
        paths.drift_report(flow_run.get_id() or "local"),
        drift,
        signals,
        ref,
        win,
        embeddings,
        baseline,
        feedback,
        context,
        trigger,
        m,
        cfg.registry.monitoring_experiment,
    )
    return MonitoringResult(
        drift,
        version,
        trigger.record_run_id,
        trigger.retraining_flow_run_id,
        signals,
        trigger.decision.episode,
        trigger.started_now,
        context.decision,
        trigger.data_note,
        report,
        win.skipped_total,
        embedded_new,
    )


if __name__ == "__main__":
    monitoring_flow()
