"""Optimization flow: a registered version → a derived one (merged, quantized for llama.cpp) → gate → register.

    tuneloop optimize --version 3 --method q4_k_m     # CLI
    optimization_flow(cfg, version="3", method="q8_0")

The parent's LoRA adapter is merged into its base, converted to GGUF and quantized
(tuneloop.gguf: llama.cpp's own converter and quantizer). The derived version answers every
slice its parent was gated on, next to the parent itself, and `optimize.rules` decide — the
gate's language with the parent in the champion's place: how much quality it may lose per
slice (paired intervals, as for any candidate), the gate's absolute rules, and what it must
gain in memory (`weights_mb`). Registered either way with its lineage (`tuneloop.derived_from`,
method, bits, size on disk); passed → `challenger`, and the promotion flow canaries it against
the float version that serves like any challenger (a replica hot-loads it on llama.cpp next to
the adapters). A parent that did not pass its own gate gives a derived version that cannot
pass either: its verdict says so, and the promotion flow refuses it.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.deploy import DeployError
from tasks.evaluate import (
    EvalSlice,
    GateVerdict,
    ModelEvaluation,
    compare_reports,
    decide_gate,
    evaluate_model,
    write_eval_report,
)
from tasks.prompts import serving_prompt
from tasks.registry import (
    ModelVersionRef,
    assign_alias,
    fail_run,
    fetch_adapter,
    find_alias,
    open_state,
    record_evaluation,
    register_adapter,
    start_training_run,
    version_tags,
)
from tasks.slices import lineage_refs, load_slices
from tuneloop.config import GateConfig, TuneloopConfig, load_config
from tuneloop.gguf import Derivation, derive
from tuneloop.gguf import method as derivation_method
from tuneloop.models import DIGEST_TAG, verify_artifact
from tuneloop.retrieval import Retriever
from tuneloop.state import collections_location, tracking_uri

# The parent's tags a derived version keeps: what it was trained on and with.
INHERITED_TAGS = (
    "tuneloop.base_model",
    "tuneloop.base_sha256",
    "tuneloop.base_revision",
    "tuneloop.dataset_digest",
    "tuneloop.dataset_source",
    "tuneloop.training_run",
    "tuneloop.method",
    "tuneloop.slice",
    "tuneloop.slices",
    "tuneloop.prompt_version",
    "tuneloop.prompt_sha256",
    "tuneloop.collection",
)


@dataclass
class OptimizationResult:
    version: str  # the derived version
    parent: str
    method: str
    decision: str  # passed | rejected | withheld
    reason: str
    alias: str | None
    size_bytes: int
    parent_size_bytes: int
    rules: list[str]
    figures: dict[str, dict[str, float]]  # slice -> metric -> derived figure


def parent_gate(tags: dict[str, str]) -> str | None:
    """Why a parent cannot have a derived version promoted (its own gate did not pass), or None."""
    if tags.get("tuneloop.gate") == "passed":
        return None
    verdict = tags.get("tuneloop.gate") or "no verdict"
    return f"its parent's gate: {tags.get('tuneloop.gate_reason', verdict)}"


def _with_weights(evaluation: ModelEvaluation, mb: float) -> ModelEvaluation:
    """The evaluation with `weights_mb` in every slice's figures (what the memory rules read)."""
    for report in evaluation.reports.values():
        report.metrics["weights_mb"] = mb
    return evaluation


@flow(name="optimization-flow")
def optimization_flow(
    config: TuneloopConfig | None = None,
    version: str = "",
    method: Literal["", "q8_0", "q4_k_m", "q4_0", "f16"] = "",
) -> OptimizationResult:
    """Derive a merged, quantized version of `version` (default: the champion) with `method` (default:
    optimize.method), gate it against it, register it."""
    cfg = config or load_config()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    paths = open_state(cfg)
    name, reg = cfg.registry.model_name, cfg.registry
    how = derivation_method(method or cfg.optimize.method)
    parent = ModelVersionRef(name, version) if version else find_alias(name, reg.champion_alias)
    if parent is None:
        raise DeployError(f"No version of {name} is {reg.champion_alias}: give the version to derive from")
    tags = version_tags(parent)
    if tags is None:
        raise DeployError(f"{name} has no version {parent.version}")
    if tags.get("tuneloop.derived_from"):
        raise DeployError(
            f"v{parent.version} is itself derived (from {tags['tuneloop.derived_from']}): "
            "derive from that float version"
        )
    refs = list(dict.fromkeys([*lineage_refs(tags), *cfg.eval.slices]))
    if not refs:
        raise DeployError(f"v{parent.version} names no evaluation slices (tuneloop.slices) and eval.slices is empty")
    slices = load_slices.fn(refs, reg)
    work = paths.cache / "derive" / f"v{parent.version}-{how.name}"
    shutil.rmtree(work, ignore_errors=True)
    parent_dir = fetch_adapter(f"models:/{name}/{parent.version}", work / "parent")
    verify_artifact(parent_dir, tags.get(DIGEST_TAG), f"Version {parent.version} of {name}")  # as a replica would
    run_id = start_training_run(
        reg,
        f"derive-v{parent.version}-{how.name}",
        {"derive.parent": parent.version, "derive.method": how.name, "derive.bits": how.bits},
        f"derive-v{parent.version}-{how.name}-{tags.get('tuneloop.artifact_sha256', '')[:16]}",
        {"tuneloop.derived_from": f"models:/{name}/{parent.version}"},
    )
    try:
        result = _derive_and_gate(cfg, parent, parent_dir, tags, how.name, slices, work, run_id)
    except BaseException as err:  # the run says why; nothing is registered
        fail_run.fn(run_id, f"{type(err).__name__}: {err}"[:4000])
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the registered artifact is in MLflow
    return result


def _derive_and_gate(
    cfg: TuneloopConfig,
    parent: ModelVersionRef,
    parent_dir: Path,
    tags: dict[str, str],
    how_name: str,
    slices: list[EvalSlice],
    work: Path,
    run_id: str,
) -> OptimizationResult:
    """Derive, evaluate both on every slice, gate, register; the run `run_id` records it all."""
    logger = get_run_logger()
    paths = open_state(cfg)
    name, reg = cfg.registry.model_name, cfg.registry
    how = derivation_method(how_name)
    logger.info("Deriving v%s with %s (merge → GGUF → quantize)", parent.version, how.name)
    info: Derivation = derive(parent_dir, f"models:/{name}/{parent.version}", how.name, work / "derived", work / "tmp")
    logger.info(
        "Derived %s: %.1f MB on disk (the parent holds %.1f MB of weights in float32)",
        how.name,
        info.size_bytes / 1e6,
        info.parent_size_bytes / 1e6,
    )
    prompt = serving_prompt(cfg)  # rendered as the parent was gated and as the chat route renders
    retriever = Retriever(collections_location(cfg)) if prompt is not None and prompt.retrieval is not None else None
    variables = cfg.serve.prompt_variables
    derived = evaluate_model(
        work / "derived",
        slices,
        cfg.eval,
        f"derived {how.name}",
        paths.eval_cache,
        "float32",
        prompt,
        variables,
        retriever,
    )
    reference = evaluate_model(
        parent_dir,
        slices,
        cfg.eval,
        f"parent v{parent.version}",
        paths.eval_cache,
        cfg.model.dtype,
        prompt,
        variables,
        retriever,
    )
    derived = _with_weights(derived, info.size_bytes / 1e6)
    reference = _with_weights(reference, info.parent_size_bytes / 1e6)
    comparison = compare_reports(derived, reference)
    own = tags.get("tuneloop.slice", slices[0].ref).split("@")[0]
    verdict = decide_gate(derived, reference, comparison, GateConfig(rules=cfg.optimize.rules), own)
    blocked = parent_gate(tags)
    if blocked and verdict.decision == "passed":
        verdict = GateVerdict("rejected", f"rejected: {blocked}", verdict.rules)
    html = write_eval_report(derived, reference, comparison, verdict, work / "eval_report.html")
    record_evaluation(run_id, derived, reference, comparison, verdict, html, slices)
    lineage = {
        **{k: tags[k] for k in INHERITED_TAGS if k in tags},
        **info.tags(),
        "tuneloop.trigger": "optimize",
        "tuneloop.compared_with": reference.label,
        "tuneloop.gate": verdict.decision,
        "tuneloop.gate_reason": verdict.reason,
        "tuneloop.gate_rules": "\n".join(verdict.lines()),
        "tuneloop.derivation_run": run_id,
    }
    if not verdict.passed:
        lineage["tuneloop.alias_reason"] = f"no alias: the gate {verdict.reason}"
    registered = register_adapter(reg, run_id, work / "derived", derived.flat(), lineage, [])
    alias = assign_alias(registered, verdict, reg)
    figures = {sl: dict(r.metrics) for sl, r in derived.reports.items()}
    result = OptimizationResult(
        registered.version,
        parent.version,
        how.name,
        verdict.decision,
        verdict.reason,
        alias,
        info.size_bytes,
        info.parent_size_bytes,
        verdict.lines(),
        figures,
    )
    create_markdown_artifact(key="optimization-result", markdown=summary(result, reference), description=name)
    return result


def summary(result: OptimizationResult, reference: ModelEvaluation) -> str:
    """The flow run's Prefect artifact: the derived version, what it weighs, the rules, per slice."""
    rows = [
        f"| {sl} | {m.get('token_f1', math.nan):.3f} | {reference.reports[sl].metrics.get('token_f1', math.nan):.3f} "
        f"| {m.get('generation_tokens_per_second', math.nan):.0f} "
        f"| {reference.reports[sl].metrics.get('generation_tokens_per_second', math.nan):.0f} |"
        for sl, m in result.figures.items()
    ]
    rules = "\n".join(f"- {line}" for line in result.rules)
    return (
        f"# v{result.version}: v{result.parent} derived with {result.method} — {result.decision}\n\n"
        f"{result.reason}\n\nWeights: {result.size_bytes / 1e6:.1f} MB (parent {result.parent_size_bytes / 1e6:.1f} MB "
        f"in float32); alias: {result.alias or 'none'}\n\n"
        "| slice | token F1 | parent | tok/s | parent tok/s |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"## Rules\n{rules}\n"
    )


if __name__ == "__main__":
    optimization_flow()
