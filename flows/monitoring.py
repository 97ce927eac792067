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

import json
import random
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.drift import (
    DriftResult,
    Reference,
    Signal,
    compute_signals,
    drift_verdict,
    read_feedback,
    read_launch_window,
    read_window,
)
from tasks.drift_report import (
    ReportContext,
    finish_monitoring_run,
    log_monitoring_metrics,
    read_timeline,
    signal_metrics,
    write_monitoring_report,
)
from tasks.embeddings import embed_new_requests, embed_reference
from tasks.registry import ModelVersionRef, find_champion, reference_prompts
from tasks.retrain import decide_and_start_retraining
from tuneloop.config import MonitorConfig, MonitorThresholds, Persistence, TuneloopConfig, load_config
from tuneloop.state import inference_db_url, state_paths, tracking_uri


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


def _read_prompts_file(path: Path) -> list[str]:
    """Prompts from a JSONL file (field prompt, question or text) or a text file (one per line)."""
    if not path.exists():
        raise FileNotFoundError(f"monitor.reference {path} does not exist: give `champion` or a prompts file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines, 1):
            row = json.loads(line)
            text = next((row[k] for k in ("prompt", "question", "text") if isinstance(row.get(k), str)), None)
            if text is None:
                raise ValueError(f"{path} line {i}: no prompt, question or text field")
            out.append(text)
        return out
    return lines


def _test_text(s: Signal) -> str:
    if s.is_test:
        return (f"p={s.p_value:.4g} " if s.p_value is not None else "") + f"(alpha {s.threshold})"
    return "–" if s.threshold is None else f"limit {s.threshold}"


@task(name="read-reference", retries=2, retry_delay_seconds=2)
def read_reference(spec: str, champion: ModelVersionRef | None, samples: int, cache: Path) -> tuple[list[str], str]:
    """Return the reference prompts (a seeded sample of at most `samples`) and what they are."""
    if spec == "champion":
        if champion is None:
            return [], "no champion to compare with"
        prompts = reference_prompts.fn(champion, cache / "reference" / champion.version)
        source = f"training prompts of champion v{champion.version}"
    else:
        prompts, source = _read_prompts_file(Path(spec)), f"prompts file {spec}"
    if len(prompts) > samples:
        prompts = random.Random(0).sample(prompts, samples)
    return prompts, source


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
    overrides = {"window": window, "reference": reference, "thresholds": thresholds, "persistence": persistence}
    m: MonitorConfig = MonitorConfig.model_validate(
        {**cfg.monitor.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    logger = get_run_logger()
    paths = state_paths(cfg).ensure()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    db = inference_db_url(cfg)

    champion = find_champion(cfg.registry)
    win = read_window(db, m.window)
    if win.skipped:
        logger.warning("Skipped %d malformed log rows: %s", win.skipped_total, win.skipped)
    prompts, source = read_reference(m.reference, champion, m.reference_samples, paths.cache)
    ref_emb = embed_reference(prompts, m.embedding_model, m.embedding_max_tokens, paths.cache / "embeddings")
    answered = win.answered
    ids = [r.id for r in answered]
    if answered:
        embeddings, embedded_new = embed_new_requests(db, ids, [r.prompt for r in answered], m.embedding_model,
                                                      m.embedding_max_tokens)
    else:
        embeddings, embedded_new = np.zeros((0, ref_emb.shape[1] if ref_emb.ndim == 2 else 0), np.float32), 0
    ref = Reference(prompts, ref_emb, source)
    version = champion.version if champion else None
    baseline = read_launch_window(db, version, m.window, ids)
    feedback = read_feedback(db, ids)

    signals = compute_signals(ref, win, embeddings, baseline, feedback, m)
    drift = drift_verdict(signals, m.retrain_signals, len(prompts), win)
    if not prompts and drift.verdict == "no_data":
        drift.reason = f"{source}; {drift.reason}"
    logger.info("Drift verdict: %s (%s)", drift.verdict, drift.reason)

    label = flow_run.get_name() or "local"
    trigger = decide_and_start_retraining(
        cfg.registry.monitoring_experiment, cfg.registry.model_name, version or "none", drift, win, feedback,
        m.persistence, {
            "deployment": cfg.prefect.training_deployment, "config": cfg.model_dump(mode="json"),
            "data_dir": str(paths.data), "min_score": m.retrain_min_feedback, "min_rows": m.retrain_min_rows,
            "fallback": str(m.retrain_data) if m.retrain_data else None, "timeout_s": m.lock_timeout_s,
        }, label)
    decision = trigger.decision
    if trigger.retraining_flow_run_id:
        retraining = (f"{'started' if trigger.started_now else 'already started'} flow run "
                      f"{trigger.retraining_flow_run_id}")
    elif decision.holds:
        retraining = f"not started: {trigger.data_note}"
    else:
        retraining = "not needed"
    if decision.holds and not trigger.retraining_flow_run_id:
        logger.warning("Drift holds but no retraining started: %s", trigger.data_note)
    elif trigger.retraining_flow_run_id:
        logger.info("Retraining flow run %s (%s) for episode %s on %s", trigger.retraining_flow_run_id,
                    "started" if trigger.started_now else "already started", decision.episode, trigger.data)

    log_monitoring_metrics(trigger.record_run_id, trigger.timeline_run_id, trigger.step,
                           signal_metrics(signals, drift, win))
    timeline = read_timeline(trigger.timeline_run_id, ["prompt_embedding/p_value", "prompt_length/p_value",
                                                       "new_vocabulary/p_value"])
    context = ReportContext(f"v{version}" if version else "none", source, decision.describe(m.persistence),
                            decision.episode, retraining, trigger.data_note, embedded_new, trigger.record_run_id)
    report = write_monitoring_report(
        paths.reports / f"drift-{flow_run.get_id() or 'local'}.html", drift, signals, ref, win, embeddings, baseline,
        feedback, context, timeline, m.alpha, m.thresholds.latency_p95_ms)
    finish_monitoring_run(trigger.record_run_id, report)

    table = "".join(f"| {s.group} | {s.name} | {'–' if s.statistic is None else f'{s.statistic:.4g}'} | "
                    f"{_test_text(s)} | "
                    f"**{s.verdict}** |\n" for s in signals)
    create_markdown_artifact(
        key="monitoring-report",
        markdown=(f"## Prompt drift: **{drift.verdict}**\n\n{drift.reason}\n\n"
                  f"{decision.describe(m.persistence)}; retraining: {retraining}\n\n"
                  f"| group | signal | statistic | test / limit | verdict |\n|---|---|---|---|---|\n{table}\n"
                  f"| | |\n|---|---|\n| champion | {context.champion} |\n| window | {len(win.requests)} requests, "
                  f"{win.skipped_total} malformed rows skipped |\n| reference | {source} |\n"
                  f"| MLflow run | `{trigger.record_run_id}` (experiment `{cfg.registry.monitoring_experiment}`, "
                  f"artifact `{report.name}`) |\n| report | `{report}` |\n| episode | {decision.episode or '–'} |\n"
                  f"| retraining data | {trigger.data_note or '–'} |"),
        description=f"Monitoring check: {drift.verdict}",
    )
    return MonitoringResult(drift, version, trigger.record_run_id, trigger.retraining_flow_run_id, signals,
                            decision.episode, trigger.started_now, decision.describe(m.persistence), trigger.data_note,
                            report, win.skipped_total, embedded_new)


if __name__ == "__main__":
    monitoring_flow()
