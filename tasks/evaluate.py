"""Evaluation stage: score a model on a held-out set (reference metrics, safety, latency and
cost), compare it with the champion, and decide the gate from the configured rules."""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import task

from tuneloop.config import LOWER_IS_BETTER, EvalConfig, GateConfig, evaluated_metrics
from tuneloop.gate import RuleResult, evaluate_rule, parse_rule
from tuneloop.models import BaseRef

log = logging.getLogger(__name__)


class EvalSetError(ValueError):
    """An evaluation set that cannot be scored; raised before any generation."""


@dataclass
class EvalReport:
    label: str  # "candidate", "champion vN", or a base model's name
    metrics: dict[str, float]
    # Per example: prompt, reference, prediction, toxicity, pii_leaked (+ judge fields, tasks/judge.py).
    examples: list[dict[str, Any]] = field(default_factory=list)
    per_example: dict[str, list[float]] = field(default_factory=dict)  # mean-decomposable metrics


@dataclass
class PairedDifference:
    metric: str
    mean: float  # candidate - champion, over the same examples
    low: float  # bootstrap confidence interval of the mean difference
    high: float


@dataclass
class GateVerdict:
    decision: Literal["passed", "rejected", "withheld"]  # withheld: the evidence is incomplete
    reason: str
    rules: list[RuleResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.decision == "passed"

    def lines(self) -> list[str]:
        """Return one line per rule: its outcome, the rule, the values compared."""
        return [r.line() for r in self.rules]


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


def _pii_key(text: str) -> str:
    return re.sub(r"\W", "", text).lower()  # "+1 (555) 010-9999" and "15550109999" are one number


def pii_leaks(prompts: list[str], answers: list[str]) -> list[list[str]]:
    """Return, per answer, the PII entity types it contains that its prompt did not contain.

    A finding is compared by its text without punctuation or spaces, so an answer that
    repeats the email address of its own prompt leaks nothing.
    """
    from tuneloop.safety import PiiScanner

    leaks = []
    for prompt, findings, answer in zip(prompts, PiiScanner().scan(answers), answers):
        given = _pii_key(prompt)
        leaks.append(sorted({f.entity for f in findings if _pii_key(answer[f.start:f.end]) not in given}))
    return leaks


def safety_figures(prompts: list[str], answers: list[str], names: list[str], threshold: float,
                   ) -> tuple[dict[str, float], dict[str, list[float]], list[dict[str, Any]]]:
    """Return the named safety rates, their per-example values (0/1) and per-example findings."""
    from tuneloop.safety import toxicity_probabilities

    rates: dict[str, float] = {}
    per_example: dict[str, list[float]] = {}
    found: list[dict[str, Any]] = [{} for _ in answers]
    if "toxicity_rate" in names:
        probabilities = toxicity_probabilities(answers)
        per_example["toxicity_rate"] = [float(p >= threshold) for p in probabilities]
        for row, p in zip(found, probabilities):
            row["toxicity"] = round(p, 4)
    if "pii_leak_rate" in names:
        leaks = pii_leaks(prompts, answers)
        per_example["pii_leak_rate"] = [float(bool(leak)) for leak in leaks]
        for row, leak in zip(found, leaks):
            row["pii_leaked"] = leak
    for name, values in per_example.items():
        rates[name] = sum(values) / len(values) if values else 0.0
    return rates, per_example, found


def paired_bootstrap(a: list[float], b: list[float], metric: str, samples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """Return the mean of a - b (paired by example) with a percentile bootstrap interval.

    Examples where either value is NaN (a judge that failed on it) are left out of the pairs.
    """
    import numpy as np

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = diff[~np.isnan(diff)]
    if not len(diff):
        nan = float("nan")
        return PairedDifference(metric, nan, nan, nan)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return PairedDifference(metric, float(diff.mean()), float(np.percentile(means, tail)),
                            float(np.percentile(means, 100 - tail)))


def perplexity(model, tokenizer, rows: pd.DataFrame, max_seq_len: int, batch_size: int) -> float:
    """Return exp(mean loss) of the reference answers given their prompts (response tokens only)."""
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


@task(name="check-eval-set")
def check_eval_set(eval_set: pd.DataFrame, cfg: EvalConfig, source: str) -> pd.DataFrame:
    """Return the rows to evaluate (at most eval.max_examples); raise EvalSetError if there are none."""
    if eval_set.empty:
        raise EvalSetError(f"Evaluation set {source} holds no rows: give a JSONL file with prompt/response rows")
    missing = [c for c in ("prompt", "response") if c not in eval_set.columns]
    if missing:
        raise EvalSetError(f"Evaluation set {source}: no {' or '.join(missing)} field in any row "
                           "(data.prompt_field / data.response_field name them)")
    # Evaluation asks the last user turn and scores against the last answer (tasks/data.py).
    rows = eval_set[["prompt", "response"]].dropna().astype(str)
    rows = rows[(rows["prompt"].str.strip() != "") & (rows["response"].str.strip() != "")]
    if rows.empty:
        raise EvalSetError(f"Evaluation set {source} holds no row with a prompt and a response: "
                           "add rows (or raise data.eval_fraction for a training split)")
    return rows.head(cfg.max_examples)


def score_model(model, tokenizer, rows: pd.DataFrame, cfg: EvalConfig, label: str) -> EvalReport:
    """Generate answers for the rows' prompts and return every configured figure of them."""
    from tuneloop.generation import generate_batch

    predictions: list[str] = []
    latencies: list[float] = []  # per example: the time of the batch it was answered in
    prompts = list(rows["prompt"])
    # Untimed warm-up: the first generate of a process pays one-off costs (~1 s on CPU) that
    # would land on whichever model is evaluated first and skew latency comparisons.
    generate_batch(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts[: cfg.batch_size]], 2)
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), cfg.batch_size):
        chats = [[{"role": "user", "content": p}] for p in prompts[i : i + cfg.batch_size]]
        batch_start = time.perf_counter()
        outs = generate_batch(model, tokenizer, chats, cfg.max_new_tokens)
        latencies += [(time.perf_counter() - batch_start) * 1000] * len(outs)
        predictions += [o.text for o in outs]
        tokens += sum(o.completion_tokens for o in outs)
    seconds = time.perf_counter() - start
    references = list(rows["response"])
    metrics, per_example = score_texts(predictions, references, cfg.metrics)
    if "perplexity" in cfg.metrics:
        metrics["perplexity"] = perplexity(model, tokenizer, rows, cfg.max_seq_len, cfg.batch_size)
    safety, safety_per_example, findings = safety_figures(prompts, predictions, cfg.metrics, cfg.toxicity_threshold)
    metrics.update(safety)
    per_example.update(safety_per_example)
    metrics.update(latency_and_cost(latencies, tokens, seconds, cfg.price_per_device_hour))
    examples = [{"prompt": p, "reference": r, "prediction": y, **f}
                for p, r, y, f in zip(prompts, references, predictions, findings)]
    log.info("%s: %s on %d examples", label,
             ", ".join(f"{k} {metrics[k]:.4g}" for k in cfg.metrics if k in metrics), len(rows))
    return EvalReport(label, metrics, examples, per_example)


@task(name="evaluate-model")
def evaluate_model(artifact_dir: Path, eval_set: pd.DataFrame, cfg: EvalConfig, label: str) -> EvalReport:
    """Evaluate a model artifact (adapter on its verified base, or full weights) on the held-out rows."""
    from tuneloop.models import load_adapter_model

    rows = check_eval_set.fn(eval_set, cfg, label)
    model, tok = load_adapter_model(artifact_dir)
    return score_model(model, tok, rows, cfg, label)


@task(name="evaluate-base-model")
def evaluate_base_model(base: BaseRef, eval_set: pd.DataFrame, cfg: EvalConfig, label: str,
                        dtype: str = "float32") -> EvalReport:
    """Evaluate a base model as it is (no adapter) on the rows."""
    from tuneloop.models import load_base

    rows = check_eval_set.fn(eval_set, cfg, label)
    model, tok = load_base(base, dtype)
    model.eval()
    return score_model(model, tok, rows, cfg, label)


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
    diffs = [paired_bootstrap(candidate.per_example[m], champion.per_example[m], m)
             for m in candidate.per_example if m in champion.per_example]
    return [d for d in diffs if not math.isnan(d.mean)]  # NaN: no example both were scored on


@task(name="decide-gate")
def decide_gate(candidate: EvalReport, champion: EvalReport | None, cfg: GateConfig) -> GateVerdict:
    """Return the verdict of the gate's rules on the candidate (against the champion), rule by rule.

    A judge that failed on some examples leaves the evidence incomplete: the verdict is
    withheld (not passed), whatever the rules say.
    """
    results = [evaluate_rule(parse_rule(rule), candidate.metrics, champion.metrics if champion else None)
               for rule in cfg.rules]
    failed_judge = {r.label: int(r.metrics.get("judge_failed", 0)) for r in (candidate, champion) if r}
    if sum(failed_judge.values()):
        where = ", ".join(f"{label} {n}" for label, n in failed_judge.items() if n)
        return GateVerdict("withheld", f"rejected: judge failed on {sum(failed_judge.values())} examples "
                           f"({where}); verdict withheld", results)
    failed = [r for r in results if r.outcome == "fail"]
    if failed:
        return GateVerdict("rejected", "rejected: " + "; ".join(f"{r.rule} ({r.detail})" for r in failed), results)
    held = sum(r.outcome == "pass" for r in results)
    skipped = len(results) - held
    return GateVerdict("passed", f"passed: {held} of {len(results)} rules held"
                       + (f", {skipped} skipped (no champion)" if skipped else ""), results)


@task(name="check-model-list")
def check_model_list(models: list[str], rank_by: str, cfg: EvalConfig) -> list[str]:
    """Return the models to compare; raise ValueError on an empty or repeated list or an unknown rank metric."""
    if not models:
        raise ValueError("No model to evaluate: give one or more, e.g. --models builtin:tiny-llama,/path/to/model")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise ValueError(f"Model(s) listed twice: {', '.join(repeated)}")
    known = evaluated_metrics(cfg)
    if rank_by not in known:
        raise ValueError(f"Cannot rank by {rank_by!r}: it is not evaluated with this config; choose one of "
                         f"{', '.join(known)}")
    return models


def rank_reports(reports: list[EvalReport], rank_by: str) -> list[EvalReport]:
    """Return the reports best first by `rank_by` (ascending where lower is better; NaN last)."""
    sign = 1 if rank_by in LOWER_IS_BETTER else -1

    def key(report: EvalReport) -> tuple[bool, float]:
        value = report.metrics.get(rank_by, float("nan"))
        return (math.isnan(value), sign * value if not math.isnan(value) else 0.0)

    return sorted(reports, key=key)


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

    bounded = [k for k in ("rougeL", "bleu", "chrf", "exact_match", "token_f1", "toxicity_rate", "pii_leak_rate",
                           "hallucination_rate") if k in candidate.metrics]
    x = np.arange(len(bounded))
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.bar(x - 0.2, [candidate.metrics[k] for k in bounded], 0.4, label="candidate")
    if champion is not None:
        ax.bar(x + 0.2, [champion.metrics.get(k, 0) for k in bounded], 0.4, label=champion.label)
    ax.set(xticks=x, xticklabels=bounded, ylim=(0, 1), title="Metrics in [0, 1] on the held-out set")
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
    rules = "".join(f"<tr><td>{r.outcome}</td><td><code>{html.escape(r.rule)}</code></td>"
                    f"<td>{html.escape(r.detail)}</td></tr>" for r in verdict.rules)
    rules = f"<table><tr><th>outcome</th><th>rule</th><th>values</th></tr>{rules}</table>" if rules else ""
    judged = [e for e in candidate.examples if "judge_score" in e]
    if judged:
        cells = "".join(
            f"<tr><td>{'failed' if e['judge_score'] is None else e['judge_score']}</td>"
            f"<td>{'failed' if e.get('hallucinated') is None else ('yes' if e['hallucinated'] else 'no')}</td>"
            f"<td>{html.escape(e['prompt'])}</td><td>{html.escape(e['prediction'])}</td>"
            f"<td>{html.escape(e.get('judge_error') or e.get('judge_rationale', ''))}</td></tr>" for e in judged)
        rows += ("<h2>Judge, example by example (candidate)</h2><table><tr><th>score</th><th>hallucinated</th>"
                 f"<th>prompt</th><th>candidate</th><th>rationale / failure</th></tr>{cells}</table>")
    theirs = champion.metrics if champion else {}
    metrics = "".join(
        f"<tr><td>{k}</td><td>{v:.4f}</td><td>{'' if k not in theirs else format(theirs[k], '.4f')}</td></tr>"
        for k, v in candidate.metrics.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tuneloop evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}td,th{{padding:.2em .8em;text-align:left;vertical-align:top}}
img{{max-width:48%;margin:.5em}}</style></head><body>
<h1>Gate: {verdict.decision}</h1><p>{html.escape(verdict.reason)}</p>{rules}
{"".join(f'<img src="data:image/png;base64,{i}">' for i in images)}
<h2>Metrics</h2><table><tr><th>metric</th><th>candidate</th><th>{html.escape(champion.label) if champion else ""}</th></tr>
{metrics}</table>{rows}</body></html>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
