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
    per_example: dict[str, list[float]] = field(default_factory=dict)  # mean-decomposable metrics


@dataclass
class PairedDifference:
    metric: str
    mean: float  # candidate - champion, over the same examples
    low: float  # bootstrap confidence interval of the mean difference
    high: float


@dataclass
class GateVerdict:
    passed: bool
    reason: str


METRICS_DIR = Path(__file__).parent / "metrics"  # local `evaluate` modules (hub metrics need a hub)
METRIC_MODULES = {"rougeL": "rouge_l", "bleu": "bleu", "chrf": "chrf", "exact_match": "exact_match",
                  "token_f1": "token_f1"}


PER_EXAMPLE = ("rougeL", "exact_match", "token_f1")  # corpus score = mean of example scores


def score_texts(
    predictions: list[str], references: list[str], names: list[str],
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Return (corpus score per named text metric, per-example scores of the mean-decomposable ones).

    Each metric is computed once: per example where the corpus score is their mean (the
    paired comparison needs them), on the corpus otherwise (BLEU, chrF).
    """
    import evaluate

    scores: dict[str, float] = {}
    per_example: dict[str, list[float]] = {}
    for name in (n for n in names if n in METRIC_MODULES):
        module = evaluate.load(str(METRICS_DIR / METRIC_MODULES[name]))
        if name in PER_EXAMPLE:
            values = [float(module.compute(predictions=[p], references=[r])[name])
                      for p, r in zip(predictions, references)]
            per_example[name] = values
            scores[name] = sum(values) / len(values) if values else 0.0
        else:
            scores[name] = float(module.compute(predictions=predictions, references=references)[name])
    return scores, per_example


def reference_metrics(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Return each named text metric of predictions against references (in [0, 1])."""
    return score_texts(predictions, references, names)[0]


def paired_bootstrap(a: list[float], b: list[float], metric: str, samples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """Return the mean of a - b (paired by example) with a percentile bootstrap interval."""
    import numpy as np

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return PairedDifference(metric, float(diff.mean()), float(np.percentile(means, tail)),
                            float(np.percentile(means, 100 - tail)))


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
    latencies: list[float] = []  # per example: the time of the batch it was answered in
    tokens, start = 0, time.perf_counter()
    prompts = list(rows["prompt"])
    for i in range(0, len(prompts), cfg.batch_size):
        chats = [[{"role": "user", "content": p}] for p in prompts[i : i + cfg.batch_size]]
        batch_start = time.perf_counter()
        outs = generate_batch(model, tok, chats, cfg.max_new_tokens)
        latencies += [(time.perf_counter() - batch_start) * 1000] * len(outs)
        predictions += [o.text for o in outs]
        tokens += sum(o.completion_tokens for o in outs)
    seconds = time.perf_counter() - start
    references = list(rows["response"])
    metrics, per_example = score_texts(predictions, references, cfg.metrics)
    if "perplexity" in cfg.metrics:
        metrics["perplexity"] = perplexity(model, tok, rows, cfg.max_seq_len, cfg.batch_size)
    metrics.update(latency_and_cost(latencies, tokens, seconds, cfg.price_per_device_hour))
    examples = [
        {"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(prompts, references, predictions)
    ]
    log.info("%s: ROUGE-L %.4f on %d examples", label, metrics["rougeL"], len(rows))
    return EvalReport(label, metrics, examples, per_example)


def latency_and_cost(latencies_ms: list[float], tokens: int, seconds: float, price_per_hour: float) -> dict[str, float]:
    """Return generation tok/s, p50/p95 latency (ms) and cost per 1k generated tokens."""
    import numpy as np

    return {
        "generation_tokens_per_second": tokens / seconds if seconds else 0.0,
        "p50_latency_ms": float(np.percentile(latencies_ms, 50)),
        "p95_latency_ms": float(np.percentile(latencies_ms, 95)),
        "cost_per_1k_tokens": price_per_hour * seconds / 3600 / tokens * 1000 if tokens else 0.0,
    }


@task(name="compare-with-champion")
def compare_reports(candidate: EvalReport, champion: EvalReport) -> list[PairedDifference]:
    """Return candidate - champion per metric on the same examples, with bootstrap intervals."""
    return [paired_bootstrap(candidate.per_example[m], champion.per_example[m], m)
            for m in candidate.per_example if m in champion.per_example]


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


@task(name="write-eval-report")
def write_eval_report(candidate: EvalReport, champion: EvalReport | None, comparison: list[PairedDifference],
                      verdict: GateVerdict, out: Path) -> Path:
    """Write a self-contained HTML report: metric bars, paired differences, worst regressions."""
    import html

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    from tuneloop.reports import png_base64

    bounded = [k for k in ("rougeL", "bleu", "chrf", "exact_match", "token_f1") if k in candidate.metrics]
    x = np.arange(len(bounded))
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.bar(x - 0.2, [candidate.metrics[k] for k in bounded], 0.4, label="candidate")
    if champion is not None:
        ax.bar(x + 0.2, [champion.metrics.get(k, 0) for k in bounded], 0.4, label=champion.label)
    ax.set(xticks=x, xticklabels=bounded, ylim=(0, 1), title="Reference metrics on the held-out set")
    ax.legend()
    images = [png_base64(fig)]
    plt.close(fig)
    if comparison:
        fig, ax = plt.subplots(figsize=(6.5, 3))
        means = [d.mean for d in comparison]
        errors = [[d.mean - d.low for d in comparison], [d.high - d.mean for d in comparison]]
        ax.errorbar(means, range(len(comparison)), xerr=errors, fmt="o", capsize=4)
        ax.axvline(0, color="grey", lw=1)
        ax.set(yticks=range(len(comparison)), yticklabels=[d.metric for d in comparison],
               title="candidate − champion, paired, 95% bootstrap interval")
        images.append(png_base64(fig))
        plt.close(fig)
    rows = ""
    if champion is not None and "rougeL" in candidate.per_example and "rougeL" in champion.per_example:
        deltas = np.asarray(candidate.per_example["rougeL"]) - np.asarray(champion.per_example["rougeL"])
        for i in np.argsort(deltas)[:10]:
            c, h = candidate.examples[i], champion.examples[i]
            rows += (f"<tr><td>{deltas[i]:+.3f}</td><td>{html.escape(c['prompt'])}</td>"
                     f"<td>{html.escape(c['reference'])}</td><td>{html.escape(c['prediction'])}</td>"
                     f"<td>{html.escape(h['prediction'])}</td></tr>")
        rows = ("<h2>Worst regressions (ROUGE-L, example by example)</h2><table><tr><th>Δ</th><th>prompt</th>"
                f"<th>reference</th><th>candidate</th><th>champion</th></tr>{rows}</table>")
    theirs = champion.metrics if champion else {}
    metrics = "".join(
        f"<tr><td>{k}</td><td>{v:.4f}</td><td>{'' if k not in theirs else format(theirs[k], '.4f')}</td></tr>"
        for k, v in candidate.metrics.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tuneloop evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}td,th{{padding:.2em .8em;text-align:left;vertical-align:top}}
img{{max-width:48%;margin:.5em}}</style></head><body>
<h1>Gate: {"passed" if verdict.passed else "rejected"}</h1><p>{html.escape(verdict.reason)}</p>
{"".join(f'<img src="data:image/png;base64,{i}">' for i in images)}
<h2>Metrics</h2><table><tr><th>metric</th><th>candidate</th><th>{html.escape(champion.label) if champion else ""}</th></tr>
{metrics}</table>{rows}</body></html>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
