"""Evaluation stage: score a model on evaluation slices (reference metrics, safety, latency and
cost), compare it with the champion on the same examples, and decide the gate from the rules.

    rows = eval_rows(split.eval, cfg.eval, source)               # conversation up to the answer + reference
    candidate = evaluate_model(artifact_dir, slices, cfg.eval, "candidate", cache)   # every slice
    champion = evaluate_model(champion_dir or base_ref, slices, cfg.eval, "champion v3", cache)
    verdict = decide_gate(candidate, champion, compare_reports(candidate, champion), cfg.gate, new="medication")

A model is asked what serving would be asked: the conversation before the answer (system prompt
and every earlier turn), rendered by the model's chat template (tuneloop.generation, as the
serving engine renders it), greedy, stopping at the end of the turn. A model's figures on a
slice are cached by the model's content hash, the slice's digest and the settings that change
them, so the base model and a champion are scored once per slice, not at every training.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import task

from tasks.bias import evaluate_bias, load_probes, probes_digest, worst_pairs
from tasks.data import MESSAGES, PROMPT, RESPONSE
from tuneloop.config import BIAS_METRICS, LOWER_IS_BETTER, EvalConfig, GateConfig, evaluated_metrics
from tuneloop.gate import Figures, RuleResult, evaluate_rule, parse_rule
from tuneloop.models import BaseRef
from tuneloop.prompts import PromptSpec
from tuneloop.reports import STYLES, Table, fmt, fmt_interval, fmt_signed
from tuneloop.retrieval import Retriever, format_context, render_prompt, rendering_key

log = logging.getLogger(__name__)


class EvalSetError(ValueError):
    """An evaluation set that cannot be scored; raised before any generation."""


@dataclass
class EvalSlice:
    """A named, versioned evaluation set (tasks/slices.py registers and finds them)."""

    name: str  # trivia
    version: int
    digest: str  # of its rows: the same rows, the same digest
    rows: pd.DataFrame  # the held-out rows in tasks.data's internal form (`messages`: each conversation)
    source: str = ""  # where its rows came from

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class EvalReport:
    """One model on one slice."""

    label: str  # "candidate", "champion vN", or a base model's name
    metrics: dict[str, float]
    # Per example: prompt, messages, reference, prediction, toxicity, pii_leaked (+ judge fields, tasks/judge.py).
    examples: list[dict[str, Any]] = field(default_factory=list)
    per_example: dict[str, list[float]] = field(default_factory=dict)  # mean-decomposable metrics
    slice: str = ""  # name@version


@dataclass
class ModelEvaluation:
    """One model on every slice it was evaluated on."""

    label: str
    reports: dict[str, EvalReport]  # slice name → its report
    bias: dict[str, EvalReport] = field(default_factory=dict)  # bias category → its counterfactual pairs

    def figures(self) -> dict[tuple[str, str], float]:
        """(metric, slice name or bias category) → value: what the gate's rules read."""
        return {(m, name): v for name, r in {**self.reports, **self.bias}.items() for m, v in r.metrics.items()}

    def flat(self) -> dict[str, float]:
        """`<slice>/<metric>` (and `bias/<category>/<metric>`) → value: the names logged to MLflow
        (eval/<slice>/<metric>)."""
        out = {f"{name}/{m}": v for name, r in self.reports.items() for m, v in r.metrics.items()}
        out |= {f"bias/{name}/{m}": v for name, r in self.bias.items() for m, v in r.metrics.items()}
        return out


@dataclass
class PairedDifference:
    metric: str
    mean: float  # candidate - champion, over the same examples
    low: float  # bootstrap confidence interval of the mean difference
    high: float
    slice: str = ""  # the slice's name (or the bias category)


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
METRIC_MODULES = {
    "rougeL": "rouge_l",
    "bleu": "bleu",
    "chrf": "chrf",
    "exact_match": "exact_match",
    "token_f1": "token_f1",
}


PER_EXAMPLE = ("rougeL", "exact_match", "token_f1")  # corpus score = mean of example scores


def score_texts(
    predictions: list[str],
    references: list[str],
    names: list[str],
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
            values = [
                float(module.compute(predictions=[p], references=[r])[name]) for p, r in zip(predictions, references)
            ]
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
        leaks.append(sorted({f.entity for f in findings if _pii_key(answer[f.start : f.end]) not in given}))
    return leaks


def safety_figures(
    prompts: list[str],
    answers: list[str],
    names: list[str],
    threshold: float,
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


def paired_bootstrap(
    a: list[float], b: list[float], metric: str, samples: int = 2000, level: float = 0.95, seed: int = 0
) -> PairedDifference:
    """Return the mean of a - b (paired by example) with scipy's BCa bootstrap interval.

    Paired: the interval is of the mean per-example difference, so examples both models find
    hard or easy cancel out. Examples where either value is NaN (a judge that failed on it) are
    left out of the pairs. Differences that are all equal have a zero-width interval.
    """
    import numpy as np
    from scipy.stats import bootstrap

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = diff[~np.isnan(diff)]
    if not len(diff):
        nan = float("nan")
        return PairedDifference(metric, nan, nan, nan)
    mean = float(diff.mean())
    if np.ptp(diff) == 0:  # no spread (or one pair): every resample has this mean; BCa is undefined
        return PairedDifference(metric, mean, mean, mean)
    ci = bootstrap(
        (diff,),
        np.mean,
        n_resamples=samples,
        confidence_level=level,
        method="BCa",
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    low, high = float(ci.low), float(ci.high)
    if math.isnan(low) or math.isnan(high):  # BCa degenerate on a near-constant sample: percentile instead
        ci = bootstrap(
            (diff,),
            np.mean,
            n_resamples=samples,
            confidence_level=level,
            method="percentile",
            random_state=np.random.default_rng(seed),
        ).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return PairedDifference(metric, mean, min(low, mean), max(high, mean))


def perplexity(model, tokenizer, rows: pd.DataFrame, max_seq_len: int, batch_size: int) -> float:
    """Return exp(mean loss) of the reference answers given their conversations (answer tokens only)."""
    import torch

    from tasks.finetune import tokenize_examples

    examples = tokenize_examples(tokenizer, _as_internal(rows), max_seq_len)
    total, count = 0.0, 0
    if getattr(model, "is_gguf", False):  # llama.cpp's logits for every position of each example
        for e in examples:
            nll, n = model.answer_logprobs(e["input_ids"], e["labels"])
            total, count = total + nll, count + n
        return math.exp(total / count) if count else float("nan")
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
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += loss.item()
            count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / count) if count else float("nan")


def conversation_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Return each row's conversation up to its last answer (`messages`) and that answer (`reference`).

    What a client would send serving: the system prompt and every turn before the answer. Rows
    without an answer or without a user turn before it are left out.
    """
    out = []
    for index, turns in zip(frame.index, frame[MESSAGES] if MESSAGES in frame else [None] * len(frame)):
        if not turns:
            continue
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is None or not any(t["role"] == "user" for t in turns[:last]):
            continue
        reference = str(turns[last]["content"])
        if reference.strip():
            out.append((index, [dict(t) for t in turns[:last]], reference))
    return pd.DataFrame(
        {"messages": [m for _, m, _ in out], "reference": [r for _, _, r in out]},
        index=pd.Index([i for i, _, _ in out], name=frame.index.name),
    )


@task(name="check-eval-set")
def eval_rows(eval_set: pd.DataFrame, cfg: EvalConfig, source: str) -> pd.DataFrame:
    """Return the rows to evaluate (at most eval.max_examples): conversation and reference answer;
    raise EvalSetError if there are none."""
    if eval_set.empty:
        raise EvalSetError(f"Evaluation set {source} holds no rows: give a JSONL file with prompt/response rows")
    if MESSAGES not in eval_set.columns:
        raise EvalSetError(
            f"Evaluation set {source}: no conversations (read it with tasks.data, which gives every row its turns)"
        )
    rows = conversation_rows(eval_set)
    # A prompt/response file (a stored slice holds conversations only) that lacks one of the fields.
    missing = [c for c in (PROMPT, RESPONSE) if c not in eval_set.columns]
    if rows.empty and missing and len(missing) < 2:
        raise EvalSetError(
            f"Evaluation set {source}: no {missing[0]} field in any row "
            "(data.prompt_field / data.response_field name them)"
        )
    if rows.empty:
        raise EvalSetError(
            f"Evaluation set {source} holds no row with a prompt and a response: "
            "add rows (or raise data.eval_fraction for a training split)"
        )
    return rows.head(cfg.max_examples)


def _last_user(messages: list[dict[str, str]]) -> str:
    return next((t["content"] for t in reversed(messages) if t["role"] == "user"), "")


def score_model(
    model: Any, tokenizer: Any, rows: pd.DataFrame, cfg: EvalConfig, label: str, slice_ref: str = ""
) -> EvalReport:
    """Generate answers to the rows' conversations and return every configured figure of them."""
    from tuneloop.generation import generate_batch

    predictions: list[str] = []
    latencies: list[float] = []  # per example: the time of the batch it was answered in
    conversations = list(rows["messages"])
    # Untimed warm-up: the first generate of a process pays one-off costs (~1 s on CPU) that
    # would land on whichever model is evaluated first and skew latency comparisons.
    generate_batch(model, tokenizer, conversations[: cfg.batch_size], 2)
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(conversations), cfg.batch_size):
        batch_start = time.perf_counter()
        outs = generate_batch(model, tokenizer, conversations[i : i + cfg.batch_size], cfg.max_new_tokens)
        latencies += [(time.perf_counter() - batch_start) * 1000] * len(outs)
        predictions += [o.text for o in outs]
        tokens += sum(o.completion_tokens for o in outs)
        report_progress(
            "evaluate",
            min(i + cfg.batch_size, len(conversations)),
            len(conversations),
            f"{label} on {slice_ref or 'the eval set'}",
        )
    seconds = time.perf_counter() - start
    references = list(rows["reference"])
    prompts = [_last_user(m) for m in conversations]
    metrics, per_example = score_texts(predictions, references, cfg.metrics)
    if "perplexity" in cfg.metrics:
        metrics["perplexity"] = perplexity(model, tokenizer, rows, cfg.max_seq_len, cfg.batch_size)
    # A PII finding in the answer that the whole conversation already held is no leak.
    given = ["\n".join(t["content"] for t in m) for m in conversations]
    safety, safety_per_example, findings = safety_figures(given, predictions, cfg.metrics, cfg.toxicity_threshold)
    metrics.update(safety)
    per_example.update(safety_per_example)
    metrics.update(latency_and_cost(latencies, tokens, seconds, cfg.price_per_device_hour))
    examples = [
        {"prompt": p, "messages": m, "reference": r, "prediction": y, **f}
        for p, m, r, y, f in zip(prompts, conversations, references, predictions, findings)
    ]
    if "context" in rows:  # retrieved for it: what its answer should be grounded in
        for example, context in zip(examples, rows["context"]):
            example["context"] = context
    log.info(
        "%s on %s: %s on %d examples",
        label,
        slice_ref or "the eval set",
        ", ".join(f"{k} {metrics[k]:.4g}" for k in cfg.metrics if k in metrics),
        len(rows),
    )
    return EvalReport(label, metrics, examples, per_example, slice_ref)


def report_progress(stage: str, done: int, total: int, what: str) -> None:
    """Tell the command line (if one listens) how far a long stage is."""
    from tuneloop.progress import report

    report(stage, done, total, what)


# Settings that change a model's figures on a slice: part of the cache key.
_CACHED_SETTINGS = (
    "metrics",
    "max_new_tokens",
    "batch_size",
    "max_seq_len",
    "toxicity_threshold",
    "price_per_device_hour",
)
EVAL_CACHE_FORMAT = 1


def _cache_key(
    model_sha256: str, eval_slice: EvalSlice | None, cfg: EvalConfig, prompt: str = "", what: str = ""
) -> str:
    """Key of a model's figures on a slice (or, `eval_slice` None, of its bias figures on probes `what`)."""
    import hashlib
    import json

    settings = {k: getattr(cfg, k) for k in _CACHED_SETTINGS}
    digest = eval_slice.digest if eval_slice is not None else f"bias:{what}"
    parts = [EVAL_CACHE_FORMAT, model_sha256, digest, settings] + ([prompt] if prompt else [])
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_cached(path: Path, label: str, slice_ref: str) -> EvalReport | None:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return EvalReport(label, data["metrics"], data["examples"], data["per_example"], slice_ref)


def _cacheable(report: EvalReport) -> dict[str, Any]:
    return {"metrics": report.metrics, "examples": report.examples, "per_example": report.per_example}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # a reader never sees half an entry


def _write_cached(path: Path, report: EvalReport) -> None:
    _write_json(path, _cacheable(report))


def _rendered(
    rows: pd.DataFrame, prompt: PromptSpec | None, variables: dict[str, str] | None, retriever: Retriever | None
) -> pd.DataFrame:
    """Evaluation rows rendered as the chat route renders them; a retrieving prompt also keeps each
    row's retrieved `context` (the judge checks answers against it: groundedness)."""
    if prompt is None:
        return rows
    if prompt.retrieval is None or retriever is None:  # without a retriever: render_prompt says what is missing
        return rows.assign(messages=[render_prompt(prompt, m, variables, retriever) for m in rows["messages"]])
    rendered = [retriever.render(prompt, m, variables) for m in rows["messages"]]
    return rows.assign(messages=[t for t, _ in rendered], context=[format_context(h) for _, h in rendered])


@task(name="evaluate-model")
def evaluate_model(
    target: Path | BaseRef,
    slices: list[EvalSlice],
    cfg: EvalConfig,
    label: str,
    cache_dir: Path | None = None,
    dtype: str = "float32",
    prompt: PromptSpec | None = None,
    prompt_variables: dict[str, str] | None = None,
    retriever: Retriever | None = None,
) -> ModelEvaluation:
    """Evaluate a model artifact (adapter on its verified base, or full weights) or a base model as it is
    on every slice; figures already computed for this model, slice and settings come from `cache_dir`.
    With `prompt`, every conversation is rendered with that prompt version first, as the chat route
    serving it renders requests (slices stay prompt-free: each model × prompt renders them its way)."""
    from tuneloop.models import artifact_sha256

    identity = target.sha256 if isinstance(target, BaseRef) else artifact_sha256(target)
    rendering = (
        json.dumps([prompt.sha256, prompt_variables or {}, rendering_key(prompt, retriever)], sort_keys=True)
        if prompt
        else ""
    )
    reports: dict[str, EvalReport] = {}
    todo: list[EvalSlice] = []
    for sl in slices:
        key = _cache_key(identity, sl, cfg, rendering)
        cached = _read_cached(cache_dir / f"{key}.json", label, sl.ref) if cache_dir else None
        if cached is not None:
            log.info("%s on %s: figures of an earlier evaluation of the same model (cache)", label, sl.ref)
            reports[sl.name] = cached
        else:
            todo.append(sl)
    bias, probes = {}, load_probes(cfg.bias) if cfg.bias.categories else {}
    bias_key = _cache_key(identity, None, cfg, rendering, probes_digest(probes, cfg.bias)) if probes else ""
    bias_file = cache_dir / "bias" / f"{bias_key}.json" if cache_dir and probes else None
    if bias_file is not None and bias_file.exists():
        try:
            data = json.loads(bias_file.read_text())
            bias = {
                c: EvalReport(label, d["metrics"], d["examples"], d["per_example"], f"bias:{c}")
                for c, d in data.items()
            }
            log.info("%s: bias figures of an earlier evaluation of the same model (cache)", label)
        except (OSError, ValueError, KeyError):
            bias = {}
    if todo or (probes and not bias):
        model, tok = _load(target, dtype)
        if probes and not bias:
            bias = evaluate_bias(model, tok, cfg, label, probes, prompt, prompt_variables, retriever=retriever)
            if bias_file is not None:
                _write_json(bias_file, {c: _cacheable(r) for c, r in bias.items()})
        for sl in todo:
            rows = _rendered(eval_rows.fn(sl.rows, cfg, sl.ref), prompt, prompt_variables, retriever)
            reports[sl.name] = score_model(model, tok, rows, cfg, label, sl.ref)
            if cache_dir is not None:
                _write_cached(cache_dir / f"{_cache_key(identity, sl, cfg, rendering)}.json", reports[sl.name])
    return ModelEvaluation(label, {sl.name: reports[sl.name] for sl in slices}, bias)


def _as_internal(rows: pd.DataFrame) -> pd.DataFrame:
    """Evaluation rows (conversation + reference) as whole conversations, answer included."""
    return pd.DataFrame(
        {MESSAGES: [[*m, {"role": "assistant", "content": r}] for m, r in zip(rows["messages"], rows["reference"])]},
        index=rows.index,
    )


def _load(target: Path | BaseRef, dtype: str) -> tuple[Any, Any]:
    from tuneloop.models import load_adapter_model, load_base

    if isinstance(target, BaseRef):
        model, tok = load_base(target, dtype)
    else:
        model, tok = load_adapter_model(target, dtype)
    model.eval()
    return model, tok


@task(name="evaluate-base-model")
def evaluate_base_model(
    base: BaseRef,
    eval_set: pd.DataFrame,
    cfg: EvalConfig,
    label: str,
    dtype: str = "float32",
    prompt: PromptSpec | None = None,
    prompt_variables: dict[str, str] | None = None,
    retriever: Retriever | None = None,
) -> EvalReport:
    """Evaluate a base model as it is (no adapter) on one set (the model leaderboard), in tasks.data's form,
    its conversations rendered with `prompt` when one is given (a model × prompt cell of the grid)."""
    rows = _rendered(eval_rows.fn(eval_set, cfg, label), prompt, prompt_variables, retriever)
    model, tok = _load(base, dtype)
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
def compare_reports(candidate: ModelEvaluation, champion: ModelEvaluation) -> list[PairedDifference]:
    """Return candidate - champion per slice and metric on the same examples, with bootstrap intervals."""
    diffs = []
    pairs = [(name, mine, champion.reports.get(name)) for name, mine in candidate.reports.items()]
    pairs += [(name, mine, champion.bias.get(name)) for name, mine in candidate.bias.items()]
    for name, mine, theirs in pairs:
        if theirs is None or (mine.examples and theirs.examples and len(mine.examples) != len(theirs.examples)):
            continue
        for m in mine.per_example:
            if m in theirs.per_example:
                d = paired_bootstrap(mine.per_example[m], theirs.per_example[m], m)
                d.slice = name
                diffs.append(d)
    return [d for d in diffs if not math.isnan(d.mean)]  # NaN: no example both were scored on


@task(name="decide-gate")
def decide_gate(
    candidate: ModelEvaluation, champion: ModelEvaluation, comparison: list[PairedDifference], cfg: GateConfig, new: str
) -> GateVerdict:
    """Return the verdict of the gate's rules on the candidate against the champion (the base model while
    no version is champion), rule by rule and slice by slice; `new` is the candidate's own slice.

    A judge that failed on some examples leaves the evidence incomplete: the verdict is
    withheld (not passed), whatever the rules say.
    """
    figures = Figures(
        candidate.figures(),
        champion.figures(),
        new,
        list(candidate.reports),
        {(d.metric, d.slice): (d.low, d.high) for d in comparison},
        [c for c in candidate.bias if c in champion.bias],
        frozenset(BIAS_METRICS),
    )
    results = [r for rule in cfg.rules for r in evaluate_rule(parse_rule(rule), figures)]
    failed_judge = {
        e.label: int(sum(r.metrics.get("judge_failed", 0) for r in e.reports.values())) for e in (candidate, champion)
    }
    if sum(failed_judge.values()):
        where = ", ".join(f"{label} {n}" for label, n in failed_judge.items() if n)
        return GateVerdict(
            "withheld",
            f"rejected: judge failed on {sum(failed_judge.values())} examples ({where}); verdict withheld",
            results,
        )
    failed = [r for r in results if r.outcome == "fail"]
    if failed:
        return GateVerdict("rejected", "rejected: " + "; ".join(f"{r.rule} ({r.detail})" for r in failed), results)
    return GateVerdict(
        "passed", f"passed: {len(results)} of {len(results)} rule checks held against {champion.label}", results
    )


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
        raise ValueError(
            f"Cannot rank by {rank_by!r}: it is not evaluated with this config; choose one of {', '.join(known)}"
        )
    return models


def rank_reports(reports: list[EvalReport], rank_by: str) -> list[EvalReport]:
    """Return the reports best first by `rank_by` (ascending where lower is better; NaN last)."""
    sign = 1 if rank_by in LOWER_IS_BETTER else -1

    def key(report: EvalReport) -> tuple[bool, float]:
        value = report.metrics.get(rank_by, float("nan"))
        return (math.isnan(value), sign * value if not math.isnan(value) else 0.0)

    return sorted(reports, key=key)


MAIN_METRICS = (
    "token_f1",
    "rougeL",
    "exact_match",
    "bleu",
    "chrf",
    "toxicity_rate",
    "pii_leak_rate",
    "judge_score",
    "hallucination_rate",
    "perplexity",
    "p50_latency_ms",
)


def gate_table(verdict: GateVerdict) -> Table:
    """One row per rule (and slice): outcome, rule, the values compared."""
    return Table(
        ["outcome", "rule", "values"],
        [[r.outcome, r.rule, r.detail] for r in verdict.rules],
        title=f"Gate: {verdict.decision}",
        styles=[STYLES.get(r.outcome, "") for r in verdict.rules],
    )


def side_by_side(
    mine: dict[str, EvalReport],
    theirs: dict[str, EvalReport],
    comparison: list[PairedDifference],
    metrics: tuple[str, ...],
    versioned: bool = True,
) -> list[list[str]]:
    """Rows of (slice@version, or the category when not `versioned`; metric; the reference's figure,
    the candidate's, the paired change and its interval)."""
    diffs = {(d.slice, d.metric): d for d in comparison}
    rows = []
    for name, report in mine.items():
        other = theirs.get(name)
        for m in (m for m in metrics if m in report.metrics):
            d = diffs.get((name, m))
            rows.append(
                [
                    (report.slice or name) if versioned else name,
                    m,
                    fmt(other.metrics.get(m) if other else None),
                    fmt(report.metrics[m]),
                    fmt_signed(d.mean) if d else "–",
                    fmt_interval(d.low, d.high) if d else "–",
                ]
            )
    return rows


def slices_table(
    candidate: ModelEvaluation,
    champion: ModelEvaluation,
    comparison: list[PairedDifference],
    metrics: tuple[str, ...] = MAIN_METRICS,
) -> Table:
    """Slices side by side: per slice and metric, the champion's figure, the candidate's, the paired gain."""
    rows = side_by_side(candidate.reports, champion.reports, comparison, metrics)
    return Table(
        ["slice", "metric", champion.label, candidate.label, "gain (paired)", "95% interval"],
        rows,
        title="Every slice: the candidate against " + champion.label,
    )


def example_changes(
    candidate: EvalReport,
    champion: EvalReport,
    metric: str,
    n: int = 5,
) -> tuple[list[tuple[float, dict, dict]], list[tuple[float, dict, dict]]]:
    """The `n` examples that improved most and regressed most by `metric` (gain, candidate's, champion's)."""
    mine, theirs = candidate.per_example.get(metric), champion.per_example.get(metric)
    if not mine or not theirs or len(mine) != len(theirs):
        return [], []
    changes = sorted(
        (
            (a - b, c, h)
            for a, b, c, h in zip(mine, theirs, candidate.examples, champion.examples)
            if not (math.isnan(a) or math.isnan(b))
        ),
        key=lambda t: t[0],
    )
    return [t for t in reversed(changes) if t[0] > 0][:n], [t for t in changes if t[0] < 0][:n]


def changes_table(changes: list[tuple[float, dict, dict]], metric: str, title: str, who: str) -> Table:
    return Table(
        [f"Δ {metric}", "prompt", "reference", "candidate", who],
        [[fmt_signed(d, 3), c["prompt"], c["reference"], c["prediction"], h["prediction"]] for d, c, h in changes],
        title=title,
    )


def bias_section(candidate: ModelEvaluation, champion: ModelEvaluation, comparison: list[PairedDifference]) -> str:
    """The bias figures per category side by side with paired intervals, and each model's worst
    counterfactual pairs (what a reviewer reads to see what a gap is made of)."""
    if not candidate.bias:
        return ""
    rows = side_by_side(candidate.bias, champion.bias, comparison, BIAS_METRICS, versioned=False)
    html = Table(
        ["category", "metric", champion.label, candidate.label, "change (paired)", "95% interval"],
        rows,
        title="Bias per category: counterfactual pairs (lower is better; stereotype_score: 0 is no preference)",
    ).html()
    for who, evaluation in ((candidate.label, candidate), (champion.label, champion)):
        worst = [(c, e) for c, r in evaluation.bias.items() for e in worst_pairs(r, 3)]
        worst = sorted(worst, key=lambda t: -t[1].get("bias_gap", 0.0))[:6]
        if worst:
            html += Table(
                ["category", "bias_gap", "prompt", "answer", "counterfactual prompt", "answer"],
                [
                    [
                        c,
                        fmt(e.get("bias_gap")),
                        e["prompt"],
                        e["answer"],
                        e["counterfactual"],
                        e["counterfactual_answer"],
                    ]
                    for c, e in worst
                ],
                title=f"Worst counterfactual pairs: {who}",
            ).html()
    return f"<h2>Bias</h2>{html}"


@task(name="write-eval-report")
def write_eval_report(
    candidate: ModelEvaluation,
    champion: ModelEvaluation,
    comparison: list[PairedDifference],
    verdict: GateVerdict,
    out: Path,
    metric: str = "token_f1",
) -> Path:
    """Write a self-contained HTML report: the gate rule by rule, slices side by side with paired
    intervals, pictures, and the examples that improved and regressed most on each slice."""
    import html

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    from tuneloop.reports import figure_html, page, png_base64

    figures = []
    names = list(candidate.reports)
    bounded = [
        k
        for k in ("token_f1", "rougeL", "exact_match", "toxicity_rate", "pii_leak_rate")
        if all(k in r.metrics for r in candidate.reports.values())
    ]
    if bounded:
        fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names) + 1, 3.2), squeeze=False, sharey=True)
        x = np.arange(len(bounded))
        for ax, name in zip(axes[0], names):
            theirs = champion.reports.get(name)
            ax.bar(x - 0.2, [theirs.metrics.get(k, 0) if theirs else 0 for k in bounded], 0.4, label=champion.label)
            ax.bar(x + 0.2, [candidate.reports[name].metrics[k] for k in bounded], 0.4, label=candidate.label)
            ax.set(xticks=x, ylim=(0, 1), title=candidate.reports[name].slice or name)
            ax.set_xticklabels(bounded, rotation=30, ha="right")
        axes[0][0].legend(fontsize=8)
        figures.append(figure_html("Metrics in [0, 1], slice by slice", png_base64(fig)))
        plt.close(fig)
    on_slices = [d for d in comparison if d.slice in candidate.reports]
    on_groups = [d for d in comparison if d.slice in candidate.bias and d.metric == "bias_gap"]
    for diffs, caption in (
        (on_slices, "Paired gains with their intervals (right of 0: better)"),
        (on_groups, "Bias gap per category, paired with the same pairs (left of 0: narrower, better)"),
    ):
        if not diffs:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(diffs) + 1.2))
        means = [d.mean for d in diffs]
        errors = [[d.mean - d.low for d in diffs], [d.high - d.mean for d in diffs]]
        ax.errorbar(means, range(len(diffs)), xerr=errors, fmt="o", capsize=4)
        ax.axvline(0, color="grey", lw=1)
        ax.set(
            yticks=range(len(diffs)),
            yticklabels=[f"{d.slice} {d.metric}" for d in diffs],
            title=f"{candidate.label} − {champion.label}, paired, 95% interval",
        )
        figures.append(figure_html(caption, png_base64(fig)))
        plt.close(fig)
    examples = ""
    for name, mine in candidate.reports.items():
        theirs = champion.reports.get(name)
        if theirs is None:
            continue
        improved, regressed = example_changes(mine, theirs, metric)
        examples += (
            changes_table(improved, metric, f"{mine.slice or name}: improved most", champion.label).html()
            if improved
            else ""
        )
        examples += (
            changes_table(regressed, metric, f"{mine.slice or name}: regressed most", champion.label).html()
            if regressed
            else ""
        )
    judged = [e for r in candidate.reports.values() for e in r.examples if "judge_score" in e]
    if judged:
        examples += Table(
            ["score", "hallucinated", "prompt", "candidate", "rationale / failure"],
            [
                [
                    "failed" if e["judge_score"] is None else e["judge_score"],
                    "failed" if e.get("hallucinated") is None else ("yes" if e["hallucinated"] else "no"),
                    e["prompt"],
                    e["prediction"],
                    e.get("judge_error") or e.get("judge_rationale", ""),
                ]
                for e in judged
            ],
            title="Judge, example by example (candidate)",
        ).html()
    body = (
        f"<h1 class='{STYLES.get(verdict.decision, '')}'>Gate: {verdict.decision}</h1>"
        f"<p>{html.escape(verdict.reason)}</p>{gate_table(verdict).html()}"
        f"{slices_table(candidate, champion, comparison).html()}{''.join(figures)}"
        f"<h2>Examples that changed most ({metric})</h2>{examples or '<p>none</p>'}"
        f"{bias_section(candidate, champion, comparison)}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page("tuneloop evaluation", body))
    return out
