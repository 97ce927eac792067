"""Training flow: validate → fine-tune → evaluate vs champion → gate → register → alias.

    tuneloop train --data data.jsonl            # CLI
    python -m flows.training                    # the embedded default, configs/local.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.promotion import promotion_flow
from tasks.data import DataValidationError, load_dataset
from tasks.evaluate import PairedDifference, compare_reports, decide_gate, evaluate_model, write_eval_report
from tasks.finetune import finetune, prepare_base_model
from tasks.registry import (
    ModelVersionRef,
    download_version,
    fail_run,
    find_champion,
    log_dataset_inputs,
    log_run_artifact,
    log_validation_report,
    register_adapter,
    set_alias,
    start_training_run,
)
from tasks.validation import report_markdown, validate_dataset
from tuneloop.config import TuneloopConfig, load_config
from tuneloop.state import state_paths, tracking_uri


@dataclass
class TrainingResult:
    version: ModelVersionRef
    champion: bool
    reason: str
    metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    dataset_digest: str
    trigger: str
    comparison: list[PairedDifference]  # candidate - champion with bootstrap intervals


@flow(name="training-flow", log_prints=False)
def training_flow(config: TuneloopConfig | None = None, trigger: str = "manual") -> TrainingResult:
    """Train a LoRA adapter on `config.data`, gate it against the champion, register it."""
    cfg = config or load_config()
    logger = get_run_logger()
    paths = state_paths(cfg).ensure()
    mlflow.set_tracking_uri(tracking_uri(cfg))

    loaded = load_dataset(cfg.data)
    base = prepare_base_model(cfg.model, paths.models)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    report, split = validate_dataset(loaded, cfg.validation, cfg.train.max_seq_len, base,
                                     paths.reports / "validation" / f"{loaded.digest}-{stamp}")
    run_id = start_training_run(cfg.registry, f"train-{split.digest}", _params(cfg),
                                tags={"tuneloop.trigger": trigger})
    log_dataset_inputs(run_id, split)
    log_validation_report(run_id, report)
    create_markdown_artifact(key="dataset-validation", markdown=report_markdown(report, run_id),
                             description=f"{split.source}: validation {'passed' if report.success else 'failed'}")
    if not report.success:  # nothing is trained or registered; the run keeps the evidence
        fail_run(run_id, report.summary())
        raise DataValidationError(report.summary())
    logger.info(report.summary())
    workdir = paths.runs / run_id
    trained = finetune(split.train, base, cfg.model, cfg.train, workdir, run_id)
    candidate = evaluate_model(trained.artifact_dir, split.eval, cfg.eval, "candidate")

    champion_ref = find_champion(cfg.registry)
    champion, comparison = None, []
    if champion_ref is not None:
        champion_dir = download_version(champion_ref, workdir / "champion")
        champion = evaluate_model(champion_dir, split.eval, cfg.eval, f"champion v{champion_ref.version}")
        comparison = compare_reports(candidate, champion)
    verdict = decide_gate(candidate, champion, cfg.gate)
    eval_report = write_eval_report(candidate, champion, comparison, verdict, workdir / "eval_report.html")
    log_run_artifact(run_id, eval_report)

    lineage = {
        "tuneloop.base_model": base.location, "tuneloop.base_sha256": base.sha256,
        "tuneloop.base_revision": base.revision or "", "tuneloop.dataset_digest": split.digest,
        "tuneloop.validation_warnings": str(len(report.warnings())),
        "tuneloop.dataset_source": split.source, "tuneloop.training_run": run_id,
        "tuneloop.trigger": trigger, "tuneloop.gate": "passed" if verdict.passed else "rejected",
        "tuneloop.gate_reason": verdict.reason,
        **({f"tuneloop.champion_{k}": f"{v:.6g}" for k, v in champion.metrics.items()} if champion else {}),
    }
    prompts = list(split.train["prompt"].head(cfg.monitor.reference_samples))
    paired = {f"vs_champion_{d.metric}_{k}": v for d in comparison
              for k, v in (("diff", d.mean), ("ci_low", d.low), ("ci_high", d.high))}
    version = register_adapter(cfg.registry, run_id, trained.artifact_dir, {**candidate.metrics, **paired},
                               lineage, prompts)
    if verdict.passed:
        set_alias(version, cfg.registry.champion_alias, verdict.reason)
        logger.info("Version %s is the new %s: %s", version.version, cfg.registry.champion_alias, verdict.reason)
        if cfg.registry.on_new_champion == "promote":
            promoted = promotion_flow(cfg, version.version, return_state=True)
            if promoted.is_failed():  # the version stays registered; what served before still serves
                logger.warning("Version %s is champion but not served: %s", version.version, promoted.message)
    else:
        logger.warning("Version %s registered without alias: %s", version.version, verdict.reason)
    create_markdown_artifact(
        key="training-result",
        markdown=_summary_markdown(version, verdict.passed, verdict.reason, candidate.metrics,
                                   champion.metrics if champion else None, report.html, comparison),
        description=f"{cfg.registry.model_name} v{version.version}",
    )
    return TrainingResult(version, verdict.passed, verdict.reason, candidate.metrics,
                          champion.metrics if champion else None, split.digest, trigger, comparison)


def _params(cfg: TuneloopConfig) -> dict[str, object]:
    return {
        "base_model": cfg.model.base, **{f"train.{k}": v for k, v in cfg.train.model_dump().items()},
        "eval.max_examples": cfg.eval.max_examples, "gate.metric": cfg.gate.metric,
        "gate.tolerance": cfg.gate.tolerance,
    }


def _summary_markdown(version, passed, reason, metrics, champion_metrics, dataset_report, comparison) -> str:
    rows = "\n".join(
        f"| {k} | {v:.4f} | {champion_metrics.get(k, float('nan')):.4f} |" if champion_metrics
        else f"| {k} | {v:.4f} | – |" for k, v in metrics.items()
    )
    docs = f"\n\nDataset report: `{dataset_report}` (and artifact `validation/` of the run)" if dataset_report else ""
    docs += "\n\nEvaluation report: artifact `eval_report.html` of the training run"
    if comparison:
        docs += "\n\n| candidate − champion | mean | 95% interval |\n|---|---|---|\n" + "\n".join(
            f"| {d.metric} | {d.mean:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] |" for d in comparison)
    return (
        f"## {version.name} v{version.version}: {'champion' if passed else 'rejected'}\n\n"
        f"Gate: {reason}\n\n| metric | candidate | champion |\n|---|---|---|\n{rows}\n\n"
        f"MLflow model: `{version.uri}`, training run `{version.run_id}`{docs}"
    )


if __name__ == "__main__":
    training_flow()
