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


METRICS_DIR = Path(__file__).parent / "metrics"  # local `evaluate` modules (hub metrics need a hub)
METRIC_MODULES = {"rougeL": "rouge_l", "bleu": "bleu", "chrf": "chrf", "exact_match": "exact_match",
                  "token_f1": "token_f1"}


def reference_metrics(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Return each named text metric of predictions against references (in [0, 1])."""
    import evaluate

    scores: dict[str, float] = {}
    for name in names:
        if name in METRIC_MODULES:
            module = evaluate.load(str(METRICS_DIR / METRIC_MODULES[name]))
            scores.update(module.compute(predictions=predictions, references=references))
    return {k: float(v) for k, v in scores.items()}


def perplexity(model, tokenizer, rows: pd.DataFrame, max_seq_len: int, batch_size: int) -> float:
    """Return exp(mean loss) of the reference answers given their prompts (response tokens only)."""
    import math

    import torch

    from tasks.finetune import tokenize_examples

    examples = tokenize_examples(tokenizer, rows, max_seq_len)
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            pad = tokenizer.pad_token_id

            def padded(key, fill, batch=batch, width=width):
                return torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in batch])

            labels = padded("labels", -100)
            logits = model(input_ids=padded("input_ids", pad), attention_mask=padded("attention_mask", 0)).logits
            loss = torch.nn.functional.cross_entropy(  # next-token loss, summed over answer tokens
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total += loss.item()
            count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / count) if count else float("nan")


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
    metrics = reference_metrics(predictions, references, cfg.metrics)
    if "perplexity" in cfg.metrics:
        metrics["perplexity"] = perplexity(model, tok, rows, cfg.max_seq_len, cfg.batch_size)
    metrics["generation_tokens_per_second"] = tokens / seconds
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
