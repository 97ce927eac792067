"""Training flow: validate → fine-tune → evaluate vs champion → gate → register → alias.

A version that passes the gate becomes `challenger`; with registry.on_gate_pass=promote the
promotion flow then serves it and, after its smoke test, moves `champion` to it. A rejected
version is registered for comparison, with no alias and the reason in its tags.

    tuneloop train --data data.jsonl            # CLI
    python -m flows.training                    # the embedded default, configs/local.yaml

A flow run whose process died mid-training resumes when it runs again under the same flow
run id (`prefect flow-run retry <id> --entrypoint flows/training.py:training_flow`, or a
worker that picks it up again): its checkpoints and its MLflow run are keyed on that id.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.promotion import promotion_flow
from tasks.data import DataValidationError, load_dataset
from tasks.evaluate import (
    PairedDifference,
    check_eval_set,
    compare_reports,
    decide_gate,
    evaluate_model,
    write_eval_report,
)
from tasks.finetune import check_training_setup, finetune, prepare_base_model, training_key
from tasks.judge import judge_answers, probe_judge
from tasks.registry import (
    ModelVersionRef,
    download_version,
    end_unfinished_run,
    fail_run,
    find_champion,
    log_dataset_inputs,
    log_eval_examples,
    log_run_artifact,
    log_validation_report,
    register_adapter,
    set_challenger,
    start_training_run,
)
from tasks.validation import report_markdown, validate_dataset
from tuneloop.config import TuneloopConfig, load_config
from tuneloop.state import state_paths, tracking_uri


@dataclass
class TrainingResult:
    version: ModelVersionRef
    champion: bool  # the version holds the champion alias when the flow ends (promoted)
    reason: str  # the gate's verdict
    metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    dataset_digest: str
    trigger: str
    comparison: list[PairedDifference]  # candidate - champion with bootstrap intervals
    decision: str  # the gate: passed, rejected, or withheld (incomplete evidence)
    alias: str | None  # the alias the version holds when the flow ends
    rules: list[str]  # one line per gate rule: outcome, rule, values


def _end_mlflow_run(flow, flow_run, state) -> None:
    """End the flow run's MLflow run FAILED (KILLED if crashed); running the flow run again resumes it."""
    try:
        cfg = TuneloopConfig.model_validate(flow_run.parameters["config"]) if flow_run.parameters.get(
            "config") else load_config()
    except (ValueError, OSError):  # the flow failed on its config: it started no run
        return
    end_unfinished_run(str(flow_run.id), cfg.registry.experiment, "KILLED" if state.is_crashed() else "FAILED",
                       state.message or state.name, tracking_uri(cfg))


@flow(name="training-flow", log_prints=False, on_failure=[_end_mlflow_run], on_crashed=[_end_mlflow_run])
def training_flow(config: TuneloopConfig | None = None, trigger: str = "manual") -> TrainingResult:
    """Fine-tune on `config.data` (LoRA adapter or full weights), gate it against the champion, register it."""
    cfg = config or load_config()
    logger = get_run_logger()
    paths = state_paths(cfg).ensure()
    mlflow.set_tracking_uri(tracking_uri(cfg))

    check_training_setup(cfg.train)  # qlora on a CPU worker fails here, before any data is read
    loaded = load_dataset(cfg.data)
    base = prepare_base_model(cfg.model, paths.models)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    report, split = validate_dataset(loaded, cfg.validation, cfg.train.max_seq_len, base,
                                     paths.reports / "validation" / f"{loaded.digest}-{stamp}")
    judge = probe_judge(cfg.eval.judge, paths.models) if report.success else None
    # The flow run id: a restart of this flow run resumes its MLflow run and checkpoints.
    key = training_key(cfg.model, cfg.train, split.digest)
    run_id = start_training_run(cfg.registry, f"train-{split.digest}",
                                {**_params(cfg), **(judge.params() if judge else {})}, key,
                                tags={"tuneloop.trigger": trigger})
    log_dataset_inputs(run_id, split)
    log_validation_report(run_id, report)
    create_markdown_artifact(key="dataset-validation", markdown=report_markdown(report, run_id),
                             description=f"{split.source}: validation {'passed' if report.success else 'failed'}")
    if not report.success:  # nothing is trained or registered; the run keeps the evidence
        fail_run(run_id, report.summary())
        raise DataValidationError(report.summary())
    logger.info(report.summary())
    # Bad evaluation input fails here, before any training or generation.
    check_eval_set(split.eval, cfg.eval, split.source)
    workdir = paths.runs / key
    trained = finetune(split.train, base, cfg.model, cfg.train, workdir, run_id)
    candidate = evaluate_model(trained.artifact_dir, split.eval, cfg.eval, "candidate")

    champion_ref = find_champion(cfg.registry)
    champion, comparison = None, []
    if champion_ref is not None:
        champion_dir = download_version(champion_ref, workdir / "champion")
        champion = evaluate_model(champion_dir, split.eval, cfg.eval, f"champion v{champion_ref.version}")
    if judge:
        candidate = judge_answers(candidate, cfg.eval.judge, paths.models)
        champion = judge_answers(champion, cfg.eval.judge, paths.models) if champion else None
    if champion:
        comparison = compare_reports(candidate, champion)
    verdict = decide_gate(candidate, champion, cfg.gate)
    for line in verdict.lines():
        logger.info("Gate %s", line)
    eval_report = write_eval_report(candidate, champion, comparison, verdict, workdir / "eval_report.html")
    log_run_artifact(run_id, eval_report)
    log_eval_examples(run_id, candidate.examples, "candidate_examples")

    lineage = {
        "tuneloop.base_model": base.location, "tuneloop.base_sha256": base.sha256,
        "tuneloop.base_revision": base.revision or "", "tuneloop.dataset_digest": split.digest,
        "tuneloop.validation_warnings": str(len(report.warnings())),
        "tuneloop.dataset_source": split.source, "tuneloop.training_run": run_id,
        "tuneloop.method": cfg.train.method,
        "tuneloop.trigger": trigger, "tuneloop.gate": verdict.decision,
        "tuneloop.gate_reason": verdict.reason, "tuneloop.gate_rules": "\n".join(verdict.lines()),
        **({"tuneloop.judge": f"{judge.backend}:{judge.model}",
            "tuneloop.judge_rubrics": f"{judge.rubric.name}@{judge.rubric.sha256[:16]},"
                                      f"{judge.hallucination_rubric.name}@{judge.hallucination_rubric.sha256[:16]}"}
           if judge else {}),
        **({"tuneloop.alias_reason": f"no alias: the gate {verdict.reason}"} if not verdict.passed else {}),
        **({f"tuneloop.champion_{k}": f"{v:.6g}" for k, v in champion.metrics.items()} if champion else {}),
    }
    prompts = list(split.train["prompt"].head(cfg.monitor.reference_samples))
    paired = {f"vs_champion_{d.metric}_{k}": v for d in comparison
              for k, v in (("diff", d.mean), ("ci_low", d.low), ("ci_high", d.high))}
    version = register_adapter(cfg.registry, run_id, trained.artifact_dir, {**candidate.metrics, **paired},
                               lineage, prompts)
    alias = None
    if verdict.passed and set_challenger(version, cfg.registry, verdict.reason):
        alias = cfg.registry.challenger_alias
        logger.info("Version %s is %s: %s", version.version, alias, verdict.reason)
        if cfg.registry.on_gate_pass == "promote":
            promoted = promotion_flow(cfg, version.version, return_state=True)
            if promoted.is_failed():  # the version stays challenger; what served before still serves
                logger.warning("Version %s passed the gate but was not promoted: %s", version.version,
                               promoted.message)
            now = find_champion(cfg.registry)
            if now is not None and now.version == version.version:
                alias = cfg.registry.champion_alias
    elif verdict.passed:
        logger.warning("Version %s passed the gate, but a newer version is %s already", version.version,
                       cfg.registry.challenger_alias)
    else:
        logger.warning("Version %s registered without alias: the gate %s", version.version, verdict.reason)
    create_markdown_artifact(
        key="training-result",
        markdown=_summary_markdown(version, verdict, alias, candidate.metrics,
                                   champion.metrics if champion else None, report.html, comparison),
        description=f"{cfg.registry.model_name} v{version.version}",
    )
    return TrainingResult(version, alias == cfg.registry.champion_alias, verdict.reason, candidate.metrics,
                          champion.metrics if champion else None, split.digest, trigger, comparison,
                          verdict.decision, alias, verdict.lines())


def _params(cfg: TuneloopConfig) -> dict[str, object]:
    return {
        "base_model": cfg.model.base, **{f"train.{k}": v for k, v in cfg.train.model_dump().items()},
        "eval.max_examples": cfg.eval.max_examples, "eval.metrics": ",".join(cfg.eval.metrics),
        "gate.rules": " ; ".join(cfg.gate.rules), "judge.backend": cfg.eval.judge.backend,
    }


def _summary_markdown(version, verdict, alias, metrics, champion_metrics, dataset_report, comparison) -> str:
    rows = "\n".join(
        f"| {k} | {v:.4f} | {champion_metrics.get(k, float('nan')):.4f} |" if champion_metrics
        else f"| {k} | {v:.4f} | – |" for k, v in metrics.items()
    )
    docs = f"\n\nDataset report: `{dataset_report}` (and artifact `validation/` of the run)" if dataset_report else ""
    docs += "\n\nEvaluation report: artifact `eval_report.html` of the training run"
    if comparison:
        docs += "\n\n| candidate − champion | mean | 95% interval |\n|---|---|---|\n" + "\n".join(
            f"| {d.metric} | {d.mean:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] |" for d in comparison)
    rules = "\n".join(f"| {r.outcome} | `{r.rule}` | {r.detail} |" for r in verdict.rules)
    outcome = (f"alias **{alias}**" if alias else
               "no alias: " + ("a newer version is challenger" if verdict.passed else verdict.reason))
    return (
        f"## {version.name} v{version.version}: gate {verdict.decision}, {outcome}\n\n"
        f"Gate: {verdict.reason}\n\n| outcome | rule | values |\n|---|---|---|\n{rules}\n\n"
        f"| metric | candidate | champion |\n|---|---|---|\n{rows}\n\n"
        f"MLflow model: `{version.uri}`, training run `{version.run_id}`{docs}"
    )


if __name__ == "__main__":
    training_flow()
