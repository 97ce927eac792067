"""Prompt evaluation flow: a prompt-only candidate through the same slices and gate as a model.

    tuneloop prompt evaluate support/4          # CLI
    prompt_evaluation_flow(cfg, "support/4")

The champion model answers every slice of its lineage (and `eval.slices`) twice: rendered with
the candidate prompt version, and with the prompt that serves now (the prompt's `champion`
alias, else `serve.prompt`, else none). The paired differences go through `gate.rules` like a
model candidate's, and the verdict is tagged on the prompt version (`tuneloop.gate`), which the
prompt promotion flow requires (fail closed, as for models). The figures, the HTML report and
every answer are an MLflow run in `registry.experiment`, linked to the prompt version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlflow
from prefect import flow, get_run_logger

from tasks.deploy import DeployError
from tasks.evaluate import compare_reports, decide_gate, evaluate_model, write_eval_report
from tasks.finetune import prepare_base_model
from tasks.prompts import PromptNotFound, resolve_prompt, tag_prompt_gate
from tasks.registry import champion_or_base, find_champion, open_state, record_evaluation, version_tags
from tasks.slices import lineage_refs, load_slices
from tuneloop.config import TuneloopConfig, load_config
from tuneloop.prompts import PromptSpec
from tuneloop.retrieval import Retriever
from tuneloop.state import collections_location, tracking_uri


@dataclass
class PromptEvaluationResult:
    prompt: str  # name/version
    compared_with: str  # the serving prompt's name/version, or "no prompt"
    decision: str  # passed | rejected | withheld
    reason: str
    run_id: str


def serving_reference(cfg: TuneloopConfig, candidate: PromptSpec) -> PromptSpec | None:
    """The prompt a candidate is compared with: its prompt's champion, else serve.prompt, else none."""
    try:
        return resolve_prompt(cfg, f"{candidate.name}@{cfg.registry.champion_alias}")
    except PromptNotFound:
        return resolve_prompt(cfg, cfg.serve.prompt) if cfg.serve.prompt else None


@flow(name="prompt-evaluation-flow")
def prompt_evaluation_flow(config: TuneloopConfig | None = None, prompt: str = "") -> PromptEvaluationResult:
    """Gate a prompt version against the serving prompt on the champion model's slices."""
    cfg = config or load_config()
    logger = get_run_logger()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    paths = open_state(cfg)
    candidate = resolve_prompt(cfg, prompt)
    reference = serving_reference(cfg, candidate)
    variables = cfg.serve.prompt_variables
    for spec in (candidate, reference):
        if spec is not None:
            spec.check_variables(variables)  # serve.prompt_variables: what clients send
    champion = find_champion(cfg.registry)
    if champion is None:
        raise DeployError("No champion model version: a prompt is evaluated on the model that serves")
    tags = version_tags(champion) or {}
    refs = list(dict.fromkeys([*lineage_refs(tags), *cfg.eval.slices]))
    if not refs:
        raise DeployError(
            f"Champion v{champion.version} names no evaluation slices (tuneloop.slices) and eval.slices is empty"
        )
    slices = load_slices.fn(refs, cfg.registry)
    base = prepare_base_model(cfg.model, paths.models)
    model, _ = champion_or_base(champion, base, paths.eval_cache.parent / "prompt-eval" / champion.version)
    ref_label = reference.ref if reference else "no prompt"
    retriever = Retriever(collections_location(cfg))  # opens only a collection a prompt binds
    mine = evaluate_model(
        model,
        slices,
        cfg.eval,
        f"prompt {candidate.ref}",
        paths.eval_cache,
        cfg.model.dtype,
        candidate,
        variables,
        retriever,
    )
    theirs = evaluate_model(
        model,
        slices,
        cfg.eval,
        f"serving {ref_label}",
        paths.eval_cache,
        cfg.model.dtype,
        reference,
        variables,
        retriever,
    )
    comparison = compare_reports(mine, theirs)
    own = tags.get("tuneloop.slice", slices[0].ref).split("@")[0]
    verdict = decide_gate(mine, theirs, comparison, cfg.gate, own)
    out = paths.eval_cache.parent / "prompt-eval" / f"{candidate.name}-v{candidate.version}" / "eval_report.html"
    html = write_eval_report(mine, theirs, comparison, verdict, out)
    mlflow.set_experiment(cfg.registry.experiment)
    with mlflow.start_run(run_name=f"prompt-{candidate.name}-v{candidate.version}") as run:
        mlflow.set_tags(
            {
                "tuneloop.prompt_version": candidate.ref,
                "tuneloop.compared_prompt": ref_label,
                "tuneloop.model_version": champion.version,
            }
        )
        mlflow.log_metrics({f"eval/{k}": v for k, v in mine.flat().items() if not math.isnan(v)})
        run_id = run.info.run_id
    record_evaluation(run_id, mine, theirs, comparison, verdict, html, slices)
    tag_prompt_gate(cfg, candidate, verdict.decision, verdict.reason, run_id)
    logger.info(
        "Prompt %s vs %s on v%s: %s (%s)", candidate.ref, ref_label, champion.version, verdict.decision, verdict.reason
    )
    return PromptEvaluationResult(candidate.ref, ref_label, verdict.decision, verdict.reason, run_id)
