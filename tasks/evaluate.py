"""Evaluation stage: score a model on the held-out split, and decide the gate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import task

from tuneloop.config import EvalConfig, GateConfig

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    label: str  # "candidate" or "champion vN"
    metrics: dict[str, float]
    examples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class GateVerdict:
    passed: bool
    reason: str


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Return the mean ROUGE-L F-measure of predictions against references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / len(scores) if scores else 0.0


@task(name="evaluate-model")
def evaluate_model(artifact_dir: Path, eval_set: pd.DataFrame, cfg: EvalConfig, label: str) -> EvalReport:
    """Generate answers for the held-out prompts and return their reference metrics."""
    from tuneloop.generation import generate_batch
    from tuneloop.models import load_adapter_model

    if eval_set.empty:
        raise ValueError("The evaluation split is empty: lower data.eval_fraction or add rows")
    rows = eval_set.head(cfg.max_examples)
    model, tok = load_adapter_model(artifact_dir)
    predictions: list[str] = []
    tokens, start = 0, time.perf_counter()
    prompts = list(rows["prompt"])
    for i in range(0, len(prompts), cfg.batch_size):
        chats = [[{"role": "user", "content": p}] for p in prompts[i : i + cfg.batch_size]]
        outs = generate_batch(model, tok, chats, cfg.max_new_tokens)
        predictions += [o.text for o in outs]
        tokens += sum(o.completion_tokens for o in outs)
    seconds = time.perf_counter() - start
    references = list(rows["response"])
    metrics = {"rougeL": rouge_l(predictions, references), "generation_tokens_per_second": tokens / seconds}
    examples = [
        {"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(prompts, references, predictions)
    ]
    log.info("%s: ROUGE-L %.4f on %d examples", label, metrics["rougeL"], len(rows))
    return EvalReport(label, metrics, examples)


@task(name="decide-gate")
def decide_gate(candidate: EvalReport, champion: EvalReport | None, cfg: GateConfig) -> GateVerdict:
    """Return whether the candidate may take the champion alias, and why."""
    ours = candidate.metrics[cfg.metric]
    if champion is None:
        return GateVerdict(True, f"no champion yet; candidate {cfg.metric}={ours:.4f}")
    theirs = champion.metrics[cfg.metric]
    passed = ours >= theirs - cfg.tolerance
    rel = ">=" if passed else "<"
    return GateVerdict(
        passed,
        f"candidate {cfg.metric}={ours:.4f} {rel} champion {theirs:.4f} - tolerance {cfg.tolerance}",
    )
