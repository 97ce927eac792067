"""Training flow: validate → fine-tune → evaluate on every slice vs the champion → gate → register → alias.

The champion is the version that serves, or the base model itself while none does: a first
version must beat the model it started from. The candidate and the champion answer the same
examples of every slice of the champion's lineage and the new data's own held-out slice, and
the gate's rules read their figures per slice and the paired intervals of the gains.

A version that passes the gate becomes `challenger`; with registry.on_gate_pass=promote the
promotion flow then serves it and, after its smoke test and canary, moves `champion` to it. A
rejected version is registered for comparison, with no alias and the reason in its tags.

    tuneloop train --data data.jsonl            # CLI
    python -m flows.training                    # the embedded default, configs/local.yaml

A flow run whose process died mid-training resumes when it runs again under the same flow
run id (`prefect flow-run retry <id> --entrypoint flows/training.py:training_flow`, or a
worker that picks it up again): its checkpoints and its MLflow run are keyed on that id.
"""

from __future__ import annotations

from prefect import flow

from flows.promotion import promotion_flow
from tasks.bias import augment_rows
from tasks.data import load_dataset
from tasks.evaluate import compare_reports, decide_gate, eval_rows, evaluate_model, write_eval_report
from tasks.finetune import check_training_setup, finetune, prepare_base_model, training_key
from tasks.judge import judge_evaluation, probe_judge
from tasks.modelcard import ModelCard, publish_model_card
from tasks.prompts import render_rows, serving_prompt
from tasks.registry import (
    TrainingResult,
    assign_alias,
    champion_or_base,
    current_alias,
    end_unfinished_run,
    find_champion,
    open_state,
    publish_training_summary,
    record_evaluation,
    record_training_inputs,
    register_adapter,
    require_valid_data,
    start_training_run,
    training_params,
    version_lineage,
)
from tasks.slices import collect_slices
from tasks.validation import validate_dataset
from tuneloop.config import TuneloopConfig, check_run_parameters, load_config
from tuneloop.models import artifact_kind
from tuneloop.retrieval import Retriever, rendering_key
from tuneloop.state import collections_location, tracking_uri


def _end_mlflow_run(flow, flow_run, state) -> None:
    """End the flow run's MLflow run FAILED (KILLED if crashed); running the flow run again resumes it."""
    try:
        cfg = (
            TuneloopConfig.model_validate(flow_run.parameters["config"])
            if flow_run.parameters.get("config")
            else load_config()
        )
    except (ValueError, OSError):  # the flow failed on its config: it started no run
        return
    end_unfinished_run(
        str(flow_run.id),
        cfg.registry.experiment,
        "KILLED" if state.is_crashed() else "FAILED",
        state.message or state.name,
        tracking_uri(cfg),
    )


@flow(name="training-flow", log_prints=False, on_failure=[_end_mlflow_run], on_crashed=[_end_mlflow_run])
def training_flow(config: TuneloopConfig | None = None, trigger: str = "manual") -> TrainingResult:
    """Fine-tune on `config.data`, gate it against the champion (or the base) on every slice, register it."""
    cfg = config or load_config()
    check_run_parameters(cfg)  # a run's config may not point beyond the worker's allow-lists
    paths = open_state(cfg)
    check_training_setup(cfg.train)  # qlora on a CPU worker fails here, before any data is read
    loaded = load_dataset(cfg.data)
    base = prepare_base_model(cfg.model, paths.models)
    report, split = validate_dataset(
        loaded, cfg.validation, cfg.train.max_seq_len, base, paths.validation_report(loaded.digest)
    )
    judge = probe_judge(cfg.eval.judge, paths.models) if report.success else None
    prompt = serving_prompt(cfg)  # trains and evaluates rendered as the chat route will render it
    augment = cfg.data.counterfactual_augment  # bias mitigation: swapped copies of the training rows
    # a prompt that retrieves renders each example with its collection's chunks: trained with context
    retriever = Retriever(collections_location(cfg)) if prompt is not None and prompt.retrieval is not None else None
    collection = rendering_key(prompt, retriever)
    rendered = "-".join(
        [split.digest, *augment, *([prompt.sha256[:12]] if prompt else []), *([collection] if collection else [])]
    )
    key = training_key(cfg.model, cfg.train, rendered)  # the flow run id: a restart resumes run and checkpoints
    run_id = start_training_run(
        cfg.registry, f"train-{split.digest}", training_params(cfg, judge), key, {"tuneloop.trigger": trigger}
    )
    record_training_inputs(run_id, split, report)
    require_valid_data(run_id, report)  # nothing is trained or registered past a failed validation
    eval_rows(split.eval, cfg.eval, split.source)  # bad evaluation input fails before any training
    champion = find_champion(cfg.registry)
    slices = collect_slices(cfg, split, champion)
    target, label = champion_or_base(champion, base, paths.training_run(key) / "champion")
    augmented = augment_rows(split.training_rows, augment)
    rows = render_rows(augmented, prompt, cfg.serve.prompt_variables, retriever)
    trained = finetune(rows, base, cfg.model, cfg.train, paths.training_run(key), run_id, target)
    variables = cfg.serve.prompt_variables
    candidate = evaluate_model(
        trained.artifact_dir,
        slices.all,
        cfg.eval,
        "candidate",
        paths.eval_cache,
        prompt=prompt,
        prompt_variables=variables,
        retriever=retriever,
    )
    reference = evaluate_model(
        target, slices.all, cfg.eval, label, paths.eval_cache, cfg.model.dtype, prompt, variables, retriever
    )
    if judge:
        candidate = judge_evaluation(candidate, cfg.eval.judge, paths.models)
        reference = judge_evaluation(reference, cfg.eval.judge, paths.models)
    comparison = compare_reports(candidate, reference)
    verdict = decide_gate(candidate, reference, comparison, cfg.gate, slices.new.name)
    html = write_eval_report(candidate, reference, comparison, verdict, paths.training_run(key) / "eval_report.html")
    record_evaluation(run_id, candidate, reference, comparison, verdict, html, slices.all)
    lineage = version_lineage(cfg, base, split, report, run_id, trigger, verdict, judge, slices, reference, trained)
    if augment:
        lineage |= {
            "tuneloop.counterfactual_augment": ",".join(augment),
            "tuneloop.counterfactual_rows": str(len(augmented) - len(split.training_rows)),
        }
    if prompt is not None:  # what it was trained and gated with: promoting it with another prompt warns
        lineage |= {"tuneloop.prompt_version": prompt.ref, "tuneloop.prompt_sha256": prompt.sha256}
    if collection:  # the collection version its examples were rendered with
        lineage["tuneloop.collection"] = collection
    version = register_adapter(
        cfg.registry,
        run_id,
        trained.artifact_dir,
        candidate.flat(),
        lineage,
        list(split.train["prompt"].head(cfg.monitor.reference_samples)),
    )
    card = ModelCard.build(
        cfg,
        version.version,
        artifact_kind(trained.artifact_dir),
        sum(f.stat().st_size for f in trained.artifact_dir.rglob("*") if f.is_file()),
        lineage,
        candidate,
        comparison,
        verdict,
        report,
    )
    publish_model_card(cfg.registry.model_name, version.version, run_id, card)
    alias = assign_alias(version, verdict, cfg.registry)
    if alias == cfg.registry.challenger_alias and cfg.registry.on_gate_pass == "promote":
        promotion_flow(cfg, version.version, return_state=True)  # a failed promotion leaves it challenger
        alias = current_alias(version, cfg.registry)
    return publish_training_summary(
        cfg.registry, version, verdict, alias, candidate, reference, comparison, slices, split, report, trigger
    )


if __name__ == "__main__":
    training_flow()
