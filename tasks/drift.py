"""Drift stage: read a window of the inference log and compute every monitoring signal.

Each signal has a statistic, a p-value (hypothesis tests, drift when p < alpha) or a limit
(SLOs and rates, alert above it), and a verdict: `alert`, `ok`, or `no_data` when the window
holds too little to judge. Groups: prompt (embeddings, lengths, vocabulary), output
(response length, refusals, toxicity), operations (latency, errors, tokens and cost per
version) and quality (feedback per version).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneloop.config import MonitorConfig, MonitorThresholds
from tuneloop.inferencelog import InferenceLog

log = logging.getLogger(__name__)

Verdict = Literal["drift", "no_drift", "no_data"]  # the window as a whole (what retraining acts on)
SignalVerdict = Literal["alert", "ok", "no_data"]
Group = Literal["prompt", "output", "operations", "quality"]


# --------------------------------------------------------------------------- the window


@dataclass(frozen=True)
class LoggedRequest:
    id: str
    created_at: dt.datetime
    status: int
    prompt: str
    response: str | None
    model_version: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None
    arm: str | None
    guardrail: str | None = None  # what the output guardrails did to the answer (comma-separated actions)
    prompt_version: str | None = None  # the chat route's prompt version (name/version) that rendered it
    retrieved: list[dict[str, Any]] | None = None  # the chunks retrieved for it: [{id, source, position, score}]


@dataclass
class Window:
    requests: list[LoggedRequest]  # oldest first (ties by id): one order for one set of requests
    skipped: dict[str, int] = field(default_factory=dict)  # malformed rows left out, by reason

    @property
    def answered(self) -> list[LoggedRequest]:
        """Requests that got an answer (status < 400): the ones whose prompts and outputs are tested."""
        return [r for r in self.requests if r.status < 400]

    @property
    def newest(self) -> LoggedRequest | None:
        return self.requests[-1] if self.requests else None

    @property
    def window_id(self) -> str | None:
        """Names the window by its newest request: the same rows give the same id in every run."""
        newest = self.newest
        return f"{newest.created_at.strftime('%Y%m%dT%H%M%S%f')}-{newest.id}" if newest else None

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class MalformedRow(ValueError):
    """A log row that cannot be read as a request; the reason is the message."""


def _int(value: Any, name: str, required: bool = False) -> int | None:
    if value is None:
        if required:
            raise MalformedRow(f"{name} missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MalformedRow(f"{name} not a number")
    try:
        number = float(value)
    except ValueError:
        raise MalformedRow(f"{name} not a number") from None
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise MalformedRow(f"{name} not a count")
    return int(number)


def _float(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MalformedRow(f"{name} not a number") from None
    if not math.isfinite(number) or number < 0:
        raise MalformedRow(f"{name} negative or not finite")
    return number


def _timestamp(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value)
        except ValueError:
            raise MalformedRow("created_at not a timestamp") from None
    else:
        raise MalformedRow("created_at not a timestamp")
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)  # the log stores UTC


def parse_row(raw: dict[str, Any]) -> LoggedRequest:
    """Return a typed request from a raw log row; raise MalformedRow naming what is wrong."""
    rid = raw.get("id")
    if not isinstance(rid, str) or not rid:
        raise MalformedRow("id missing")
    status = _int(raw.get("status"), "status", required=True)
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or (status < 400 and not prompt.strip()):
        raise MalformedRow("prompt empty or not text")
    response = raw.get("response")
    if response is not None and not isinstance(response, str):
        raise MalformedRow("response not text")
    version = raw.get("model_version")
    return LoggedRequest(
        id=rid,
        created_at=_timestamp(raw.get("created_at")),
        status=status,
        prompt=prompt,
        response=response,
        model_version=None if version is None else str(version),
        prompt_tokens=_int(raw.get("prompt_tokens"), "prompt_tokens"),
        completion_tokens=_int(raw.get("completion_tokens"), "completion_tokens"),
        latency_ms=_float(raw.get("latency_ms"), "latency_ms"),
        arm=raw.get("arm"),
        guardrail=raw.get("guardrail") if isinstance(raw.get("guardrail"), str) else None,
        prompt_version=raw.get("prompt_version") if isinstance(raw.get("prompt_version"), str) else None,
        retrieved=_retrieved(raw.get("retrieved")),
    )


def _retrieved(value: Any) -> list[dict[str, Any]] | None:
    """The logged chunks of a retrieving request (JSON), or None; a garbled value counts as none."""
    if not isinstance(value, str) or not value:
        return None
    try:
        hits = json.loads(value)
    except ValueError:
        return None
    ok = isinstance(hits, list) and all(isinstance(h, dict) and isinstance(h.get("score"), (int, float)) for h in hits)
    return hits if ok else None


def _parse_rows(raw_rows: Sequence[dict[str, Any]]) -> Window:
    requests, skipped = [], Counter()
    for row in raw_rows:
        try:
            requests.append(parse_row(row))
        except MalformedRow as err:
            skipped[str(err)] += 1
    requests.sort(key=lambda r: (r.created_at, r.id))
    return Window(requests, dict(skipped))


@task(name="read-inference-window", retries=2, retry_delay_seconds=2)
def read_window(db_url: str, window: int) -> Window:
    """Return the newest `window` rows of the inference log (every status, shadow answers left out).

    Malformed rows are skipped and counted by reason (the window then holds fewer requests).
    """
    store = InferenceLog(db_url)
    try:
        return _parse_rows(store.newest_served(window))
    finally:
        store.close()


@task(name="read-launch-window", retries=2, retry_delay_seconds=2)
def read_launch_window(db_url: str, version: str | None, size: int, exclude: list[str]) -> list[LoggedRequest]:
    """Return the first `size` answered requests of a model version, leaving out `exclude`.

    Outputs are compared with how the same version answered when it started serving.
    """
    if version is None:
        return []
    store = InferenceLog(db_url)
    try:
        rows = _parse_rows(store.first_answers(version, size + len(exclude))).requests
    finally:
        store.close()
    excluded = set(exclude)
    return [r for r in rows if r.id not in excluded][:size]


@task(name="read-feedback", retries=2, retry_delay_seconds=2)
def read_feedback(db_url: str, request_ids: list[str]) -> dict[str, float]:
    """Return the mean feedback score of each request that has any."""
    store = InferenceLog(db_url)
    try:
        return store.feedback_for(request_ids)
    finally:
        store.close()


# --------------------------------------------------------------------------- signals


@dataclass
class Signal:
    name: str
    group: Group
    verdict: SignalVerdict
    statistic: float | None
    p_value: float | None  # hypothesis tests: alert when p < threshold (alpha)
    threshold: float | None  # alpha for tests; the limit otherwise (alert above it)
    detail: str
    metrics: dict[str, float] = field(default_factory=dict)  # further figures for MLflow

    @property
    def is_test(self) -> bool:
        """A hypothesis test (judged by p < alpha), even when it had no data to run on."""
        return self.name in TEST_SIGNALS


TEST_SIGNALS = frozenset({"prompt_embedding", "prompt_length", "new_vocabulary", "response_length", "feedback"})


def _no_data(name: str, group: Group, detail: str, threshold: float | None = None) -> Signal:
    return Signal(name, group, "no_data", None, None, threshold, detail)


def _median_gamma(z: np.ndarray, rng: np.random.Generator, sample: int = 1000) -> float:
    """γ = 1 / median squared distance of the pooled sample (a subsample of at most 1000)."""
    if len(z) > sample:
        z = z[rng.choice(len(z), sample, replace=False)]
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    median = float(np.median(d2[np.triu_indices_from(d2, k=1)])) if len(z) > 1 else 0.0
    return 1.0 / median if median > 0 else 1.0


def mmd_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    permutations: int,
    seed: int = 0,
    bandwidth: float = 1.0,
    max_exact: int = 4096,
    features: int = 2048,
) -> tuple[float, float]:
    """Return (MMD², permutation p-value) between samples x and y with an RBF kernel.

    k(a, b) = exp(-|a - b|² / (bandwidth² · median |z - z'|²)): `bandwidth` scales the
    median heuristic's. Up to `max_exact` pooled points: the unbiased
    MMD² on the full kernel matrix, every permutation in one matrix product (permutation ×
    point weights @ kernel). Beyond: random Fourier features (`features` of them), where
    MMD² is the squared distance of the two feature means and a permutation costs one
    product of its weights with the feature matrix: O((n + m) · features) instead of
    O((n + m)²). The p-value counts permutations at least as extreme, plus one (never 0).
    """
    n, m = len(x), len(y)
    z = np.concatenate([x, y]).astype(np.float32)
    rng = np.random.default_rng(seed)
    gamma = _median_gamma(z.astype(np.float64), rng) / bandwidth**2
    labels = np.zeros((permutations + 1, n + m), dtype=np.float32)
    labels[:, :n] = 1.0
    labels[1:] = rng.permuted(labels[1:], axis=1)  # row 0: the observed split
    if n + m <= max_exact:
        sq = np.sum(z * z, axis=1)
        k = np.exp(-gamma * np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0))
        ka = labels @ k  # (P+1) × N: each point's kernel sum over the permutation's x side
        a_k_a = np.einsum("pi,pi->p", ka, labels, dtype=np.float64)  # Σ over x-x pairs (diagonal included)
        a_k_1 = labels.astype(np.float64) @ k.sum(axis=0, dtype=np.float64)
        total = float(k.sum(dtype=np.float64))
        b_k_b = total - 2 * a_k_1 + a_k_a
        a_k_b = a_k_1 - a_k_a
        # k(z, z) = 1 on the diagonal: the unbiased estimate leaves those n (and m) terms out.
        stats = (a_k_a - n) / (n * (n - 1)) + (b_k_b - m) / (m * (m - 1)) - 2 * a_k_b / (n * m)
    else:
        w = rng.normal(scale=math.sqrt(2 * gamma), size=(z.shape[1], features)).astype(np.float32)
        phi = np.cos(z @ w + rng.uniform(0, 2 * np.pi, size=features).astype(np.float32))
        phi *= math.sqrt(2.0 / features)
        sums = labels @ phi
        diff = sums / n - (phi.sum(axis=0) - sums) / m
        stats = np.einsum("pf,pf->p", diff, diff, dtype=np.float64)
    observed = float(stats[0])
    extreme = int(np.sum(stats[1:] >= observed))
    return observed, (extreme + 1) / (permutations + 1)


def prompt_embedding_signal(
    reference: np.ndarray,
    current: np.ndarray,
    min_samples: int,
    permutations: int,
    alpha: float,
    bandwidth: float = 1.0,
) -> Signal:
    """Two-sample MMD permutation test of prompt embeddings against the reference."""
    name, group = "prompt_embedding", "prompt"
    if len(current) < min_samples or len(reference) < 2:
        return _no_data(name, group, f"{len(current)} requests in the window, {min_samples} needed", alpha)
    stat, p = mmd_permutation_test(reference, current, permutations, bandwidth=bandwidth)
    verdict: SignalVerdict = "alert" if p < alpha else "ok"
    centroid = reference.mean(axis=0)
    centroid /= np.linalg.norm(centroid) or 1.0
    cos = float(current.mean(axis=0) @ centroid / (np.linalg.norm(current.mean(axis=0)) or 1.0))
    return Signal(
        name,
        group,
        verdict,
        stat,
        p,
        alpha,
        f"MMD²={stat:.4f}, p={p:.4f} {'<' if verdict == 'alert' else '>='} alpha={alpha}",
        {"centroid_cosine": cos},
    )


WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins (0: same; > 0.25: a large shift)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1) / len(current)
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def _length_signal(
    name: str,
    group: Group,
    reference: Sequence[str],
    current: Sequence[str],
    min_samples: int,
    alpha: float,
    what: str,
    reference_name: str,
) -> Signal:
    from scipy.stats import ks_2samp

    if len(current) < min_samples or len(reference) < min_samples:
        return _no_data(
            name,
            group,
            f"{len(current)} {what} in the window and {len(reference)} in {reference_name}, {min_samples} needed",
            alpha,
        )
    ref = np.array([len(words(t)) for t in reference], dtype=float)
    cur = np.array([len(words(t)) for t in current], dtype=float)
    result = ks_2samp(ref, cur)
    p = float(result.pvalue)
    verdict: SignalVerdict = "alert" if p < alpha else "ok"
    stability = psi(ref, cur)
    return Signal(
        name,
        group,
        verdict,
        float(result.statistic),
        p,
        alpha,
        f"KS D={result.statistic:.3f}, p={p:.4f}; mean {cur.mean():.1f} words vs {ref.mean():.1f}; PSI={stability:.3f}",
        {"psi": stability, "mean_words": float(cur.mean()), "reference_mean_words": float(ref.mean())},
    )


def prompt_length_signal(reference: Sequence[str], current: Sequence[str], min_samples: int, alpha: float) -> Signal:
    """KS test of prompt lengths (words) against the reference; PSI alongside."""
    return _length_signal("prompt_length", "prompt", reference, current, min_samples, alpha, "prompts", "the reference")


def new_vocabulary_signal(
    reference: Sequence[str], current: Sequence[str], min_samples: int, alpha: float, seed: int = 0
) -> Signal:
    """Share of words never seen in the reference, tested against a held-out half of the reference.

    Half the reference gives the vocabulary; the other half shows how many new words prompts
    from the reference distribution bring anyway. A one-sided Mann-Whitney test compares the
    per-prompt new-word shares of the window with those of the held-out half.
    """
    from scipy.stats import mannwhitneyu

    name, group = "new_vocabulary", "prompt"
    if len(current) < min_samples or len(reference) < 2 * min_samples:
        return _no_data(
            name,
            group,
            f"{len(current)} prompts in the window and {len(reference)} in the reference; "
            f"{min_samples} and {2 * min_samples} needed",
            alpha,
        )
    order = np.random.default_rng(seed).permutation(len(reference))
    half = len(reference) // 2
    vocabulary = {w for i in order[:half] for w in words(reference[i])}

    def shares(texts: Sequence[str]) -> tuple[np.ndarray, float]:
        per_prompt, new, total = [], 0, 0
        for text in texts:
            tokens = words(text)
            unseen = sum(t not in vocabulary for t in tokens)
            per_prompt.append(unseen / len(tokens) if tokens else 0.0)
            new, total = new + unseen, total + len(tokens)
        return np.array(per_prompt), new / total if total else 0.0

    held_out, held_rate = shares([reference[i] for i in order[half:]])
    cur, rate = shares(current)
    p = float(mannwhitneyu(cur, held_out, alternative="greater").pvalue)
    verdict: SignalVerdict = "alert" if p < alpha else "ok"
    return Signal(
        name,
        group,
        verdict,
        rate,
        p,
        alpha,
        f"{rate:.1%} of words new vs {held_rate:.1%} in held-out reference prompts, p={p:.4f}",
        {"reference_rate": held_rate},
    )


def response_length_signal(baseline: Sequence[str], current: Sequence[str], min_samples: int, alpha: float) -> Signal:
    """KS test of answer lengths against the same version's first answers (its launch window)."""
    return _length_signal(
        "response_length",
        "output",
        baseline,
        current,
        min_samples,
        alpha,
        "answers",
        "the version's first answers before the window",
    )


def _rate_signal(
    name: str,
    group: Group,
    flags: Sequence[bool],
    limit: float,
    min_samples: int,
    what: str,
    baseline: Sequence[bool] | None = None,
) -> Signal:
    if len(flags) < min_samples:
        return _no_data(name, group, f"{len(flags)} answers in the window, {min_samples} needed", limit)
    rate = float(np.mean(flags))
    detail = f"{rate:.1%} {what} ({sum(flags)}/{len(flags)}), limit {limit:.1%}"
    metrics = {}
    if baseline:
        metrics["baseline_rate"] = float(np.mean(baseline))
        detail += f"; {metrics['baseline_rate']:.1%} in the version's first answers"
    return Signal(name, group, "alert" if rate > limit else "ok", rate, None, limit, detail, metrics)


def refusal_signal(
    responses: Sequence[str], patterns: Sequence[str], limit: float, min_samples: int, baseline: Sequence[str] = ()
) -> Signal:
    """Share of answers matching a refusal pattern, against a limit."""
    pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None

    def refused(texts: Sequence[str]) -> list[bool]:
        return [bool(pattern and pattern.search(t)) for t in texts]

    return _rate_signal(
        "refusal_rate",
        "output",
        refused(responses),
        limit,
        min_samples,
        "refusals",
        refused(baseline) if baseline else None,
    )


def toxicity_signal(
    responses: Sequence[str],
    limits: MonitorThresholds,
    min_samples: int,
    score: Callable[[Sequence[str]], list[float]] | None = None,
) -> Signal:
    """Share of answers whose offensive probability reaches the threshold, against a limit."""
    if len(responses) < min_samples:
        return _no_data(
            "toxicity_rate",
            "output",
            f"{len(responses)} answers in the window, {min_samples} needed",
            limits.toxicity_rate,
        )
    if score is None:
        from tuneloop.safety import toxicity_probabilities as score
    flags = [p >= limits.toxicity_probability for p in score(list(responses))]
    return _rate_signal(
        "toxicity_rate",
        "output",
        flags,
        limits.toxicity_rate,
        min_samples,
        f"toxic (p >= {limits.toxicity_probability})",
    )


BLOCKING_ACTIONS = ("pii_blocked", "toxicity_blocked")


def guardrail_signal(requests: Sequence[LoggedRequest], limit: float, min_samples: int) -> Signal:
    """Share of answers the output guardrails blocked, overall against a limit and per model version
    (redactions and flags counted beside): a version that starts saying what a route refuses alerts."""
    if len(requests) < min_samples:
        return _no_data(
            "guardrail_rate", "output", f"{len(requests)} answers in the window, {min_samples} needed", limit
        )
    by_version: dict[str, list[set[str]]] = {}
    for r in requests:
        by_version.setdefault(_version(r.model_version), []).append(set((r.guardrail or "").split(",")) - {""})
    metrics, parts, alerts = {}, [], []
    for version, acts in sorted(by_version.items()):
        blocked = sum(bool(a & set(BLOCKING_ACTIONS)) for a in acts) / len(acts)
        redacted = sum("pii_redacted" in a for a in acts) / len(acts)
        flagged = sum("toxicity_flagged" in a for a in acts) / len(acts)
        metrics |= {f"blocked_v{version}": blocked, f"redacted_v{version}": redacted, f"flagged_v{version}": flagged}
        parts.append(
            f"v{version}: {blocked:.1%} blocked, {redacted:.1%} redacted, {flagged:.1%} flagged of {len(acts)}"
        )
        if len(acts) >= min_samples and blocked > limit:
            alerts.append(f"v{version}")
    overall = sum(bool(set((r.guardrail or "").split(",")) & set(BLOCKING_ACTIONS)) for r in requests) / len(requests)
    detail = "; ".join(parts) + f"; limit {limit:.1%}" + (f": {', '.join(alerts)} above it" if alerts else "")
    verdict = "alert" if alerts or overall > limit else "ok"
    return Signal("guardrail_rate", "output", verdict, overall, None, limit, detail, metrics)


def retrieval_signal(
    requests: Sequence[LoggedRequest],
    limits: MonitorThresholds,
    min_samples: int,
    launch: Sequence[LoggedRequest] = (),
    alpha: float = 0.01,
) -> Signal:
    """How well the collection answers the questions asked of it.

    - The share of retrieving requests whose best chunk scores under `retrieval_min_score` —
      questions the collection cannot answer — overall against a limit and per prompt version.
    - Drift of the queries against the collection: the best scores of the window against those of
      the version's first answers (`launch`), a one-sided Mann-Whitney test that they fell. Best
      scores measure each question against the documents, not against other questions: they fall
      when users ask about what the collection does not hold, before many fall under the threshold.
    """
    from scipy.stats import mannwhitneyu

    retrieving = [r for r in requests if r.retrieved is not None]
    if len(retrieving) < min_samples:
        return _no_data(
            "retrieval",
            "prompt",
            f"{len(retrieving)} retrieving requests in the window, {min_samples} needed",
            limits.unanswerable_rate,
        )

    def best_score(r: LoggedRequest) -> float:
        return max((h["score"] for h in r.retrieved or []), default=-1.0)

    best = {r.id: best_score(r) for r in retrieving}
    low = [best[r.id] < limits.retrieval_min_score for r in retrieving]
    rate = float(np.mean(low))
    metrics = {"median_best_score": float(np.median(list(best.values())))}
    parts = []
    for version in sorted({r.prompt_version or "?" for r in retrieving}):
        mine = [best[r.id] < limits.retrieval_min_score for r in retrieving if (r.prompt_version or "?") == version]
        metrics[f"unanswerable_{version}"] = float(np.mean(mine))
        parts.append(f"{version}: {np.mean(mine):.1%} of {len(mine)}")
    detail = (
        f"{rate:.1%} of {len(retrieving)} retrieving requests had no chunk scoring {limits.retrieval_min_score} "
        f"or more (limit {limits.unanswerable_rate:.1%}); median best score {metrics['median_best_score']:.3f}; "
        + "; ".join(parts)
    )
    then = [best_score(r) for r in launch if r.retrieved is not None and r.id not in best]
    shifted = False
    if len(then) >= min_samples:
        p = float(mannwhitneyu(list(best.values()), then, alternative="less").pvalue)
        metrics |= {"launch_median_best_score": float(np.median(then)), "best_score_p_value": p}
        shifted = p < alpha
        detail += (
            f"; best scores against the version's first {len(then)}: median {metrics['launch_median_best_score']:.3f}"
            f" then, p = {p:.3g} that they fell" + (" (the questions moved away from the documents)" if shifted else "")
        )
    else:
        detail += f"; {len(then)} retrieving requests among the version's first answers: too few to test a shift"
    return Signal(
        "retrieval",
        "prompt",
        "alert" if rate > limits.unanswerable_rate or shifted else "ok",
        rate,
        metrics.get("best_score_p_value"),
        limits.unanswerable_rate,
        detail,
        metrics,
    )


def collections_signal(stale: dict[str, dict[str, int]] | str | None) -> Signal:
    """Collections whose documents changed since they were ingested (chunks that would be added,
    updated or removed by ingesting again): answers retrieve from an outdated version. A string:
    the collection server could not be reached (the gateway answers retrieving requests 503)."""
    if isinstance(stale, str):
        return Signal("collections", "prompt", "alert", None, None, 0.0, f"collections not checked: {stale}")
    if stale is None:
        return _no_data("collections", "prompt", "no collection built from a folder to compare with")
    changed = {name: d for name, d in stale.items() if sum(d.values())}
    detail = (
        "; ".join(
            f"{name}: {d['added']} chunks new, {d['updated']} changed, {d['removed']} gone since its version"
            for name, d in changed.items()
        )
        or f"{len(stale)} collections match their documents"
    )
    metrics = {f"stale_chunks_{name}": float(sum(d.values())) for name, d in stale.items()}
    return Signal(
        "collections",
        "prompt",
        "alert" if changed else "ok",
        float(len(changed)),
        None,
        0.0,
        detail + ("; run `tuneloop docs ingest` again" if changed else ""),
        metrics,
    )


def latency_signal(requests: Sequence[LoggedRequest], limits: MonitorThresholds, min_samples: int) -> Signal:
    """Latency percentiles of answered requests against the SLOs."""
    latencies = np.array([r.latency_ms for r in requests if r.status < 400 and r.latency_ms is not None])
    if len(latencies) < min_samples:
        return _no_data(
            "latency", "operations", f"{len(latencies)} timed answers, {min_samples} needed", limits.latency_p95_ms
        )
    p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
    breaches = [
        f"p{q} {v:.0f} ms > SLO {slo:.0f} ms"
        for q, v, slo in ((95, p95, limits.latency_p95_ms), (99, p99, limits.latency_p99_ms))
        if slo is not None and v > slo
    ]
    detail = f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms" + (f": {'; '.join(breaches)}" if breaches else "")
    return Signal(
        "latency",
        "operations",
        "alert" if breaches else "ok",
        p95,
        None,
        limits.latency_p95_ms,
        detail,
        {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99},
    )


def error_rate_signal(requests: Sequence[LoggedRequest], limit: float, min_samples: int) -> Signal:
    """Share of requests that failed on the server's side (status >= 500), against a limit."""
    if len(requests) < min_samples:
        return _no_data("error_rate", "operations", f"{len(requests)} requests, {min_samples} needed", limit)
    server = sum(r.status >= 500 for r in requests)
    client = sum(400 <= r.status < 500 for r in requests)
    rate = server / len(requests)
    return Signal(
        "error_rate",
        "operations",
        "alert" if rate > limit else "ok",
        rate,
        None,
        limit,
        f"{rate:.1%} server errors ({server}/{len(requests)}), limit {limit:.1%}; {client} client errors (4xx)",
        {"client_error_rate": client / len(requests)},
    )


def _version(v: str | None) -> str:
    return v if v is not None else "unknown"


def cost_signal(requests: Sequence[LoggedRequest], prices: dict[str, float]) -> Signal:
    """Tokens and cost per model version (informational: no limit)."""
    if not requests:
        return _no_data("cost", "operations", "no requests")
    tokens: Counter[str] = Counter()
    for r in requests:
        tokens[_version(r.model_version)] += (r.prompt_tokens or 0) + (r.completion_tokens or 0)
    metrics, parts, total_cost = {}, [], 0.0
    priced = bool(prices)
    for version, count in sorted(tokens.items()):
        metrics[f"tokens_v{version}"] = float(count)
        part = f"v{version}: {count} tokens"
        price = prices.get(version, prices.get("*"))
        if price is not None:
            cost = count / 1000 * price
            total_cost += cost
            metrics[f"cost_v{version}"] = cost
            part += f", {cost:.4g}"
        parts.append(part)
    total_tokens = float(sum(tokens.values()))
    metrics["tokens"] = total_tokens
    return Signal(
        "cost",
        "operations",
        "ok",
        total_cost if priced else total_tokens,
        None,
        None,
        ("cost " if priced else "tokens (unpriced) ") + "; ".join(parts),
        metrics,
    )


def prompt_version_signal(
    requests: Sequence[LoggedRequest], scores: dict[str, float], patterns: Sequence[str], min_samples: int
) -> Signal:
    """The window's figures per prompt version (informational; a prompt change is judged by its
    canary): requests, server errors, p95 latency, answer length, refusals, guardrail blocks,
    mean feedback. Requests rendered with no prompt count as `none`."""
    if not requests:
        return _no_data("prompt_versions", "quality", "no requests")
    pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None
    groups: dict[str, list[LoggedRequest]] = {}
    for r in requests:
        groups.setdefault(r.prompt_version or "none", []).append(r)
    metrics, parts = {}, []
    for ref, rows in sorted(groups.items()):
        answered = [r for r in rows if r.status < 400]
        texts = [r.response or "" for r in answered]
        latencies = [r.latency_ms for r in answered if r.latency_ms is not None]
        rated = [scores[r.id] for r in rows if r.id in scores]
        figures = {
            "requests": float(len(rows)),
            "error_rate": sum(r.status >= 500 for r in rows) / len(rows),
            "p95_latency_ms": float(np.percentile(latencies, 95)) if latencies else float("nan"),
            "response_words": float(np.mean([len(t.split()) for t in texts])) if texts else float("nan"),
            "refusal_rate": (sum(bool(pattern and pattern.search(t)) for t in texts) / len(texts)) if texts else 0.0,
            "blocked_rate": (
                sum(bool(set((r.guardrail or "").split(",")) & set(BLOCKING_ACTIONS)) for r in answered) / len(answered)
                if answered
                else 0.0
            ),
            "feedback": float(np.mean(rated)) if rated else float("nan"),
        }
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", ref)
        metrics |= {f"{name}_{key}": v for name, v in figures.items() if not math.isnan(v)}
        few = " (few)" if len(rows) < min_samples else ""
        parts.append(
            f"{ref}: {len(rows)} requests{few}, {figures['error_rate']:.1%} errors, "
            f"{figures['response_words']:.1f} words, {figures['refusal_rate']:.1%} refusals, "
            f"{figures['blocked_rate']:.1%} blocked" + (f", feedback {figures['feedback']:.2f}" if rated else "")
        )
    return Signal("prompt_versions", "quality", "ok", float(len(groups)), None, None, "; ".join(parts), metrics)


def feedback_signal(
    requests: Sequence[LoggedRequest], scores: dict[str, float], limits: MonitorThresholds, alpha: float
) -> Signal:
    """Feedback per model version: its mean, and whether it falls over the window (linear trend test)."""
    from scipy.stats import linregress

    name, group = "feedback", "quality"
    by_version: dict[str, list[tuple[float, float]]] = {}
    for r in requests:
        if r.id in scores:
            by_version.setdefault(_version(r.model_version), []).append((r.created_at.timestamp(), scores[r.id]))
    tested = {v: pts for v, pts in by_version.items() if len(pts) >= limits.min_feedback}
    if not tested:
        return _no_data(
            name,
            group,
            f"{sum(map(len, by_version.values()))} scored requests; a version needs {limits.min_feedback}",
            alpha,
        )
    metrics, parts, alerts, worst_p = {}, [], [], 1.0
    for version, pts in sorted(tested.items()):
        t = np.array([p[0] for p in pts]) / 3600.0
        s = np.array([p[1] for p in pts])
        mean = float(s.mean())
        metrics[f"mean_v{version}"] = mean
        if np.ptp(t) > 0 and np.ptp(s) > 0:
            fit = linregress(t, s)
            # One-sided: only a falling score is an alarm.
            p = float(fit.pvalue / 2 if fit.slope < 0 else 1 - fit.pvalue / 2)
            metrics[f"slope_per_hour_v{version}"] = float(fit.slope)
        else:
            p, fit = 1.0, None
        worst_p = min(worst_p, p)
        parts.append(
            f"v{version}: mean {mean:.2f} over {len(s)}"
            + (f", trend {fit.slope:+.3g}/h (p={p:.3f})" if fit is not None else "")
        )
        if p < alpha:
            alerts.append(f"v{version} falling")
        if limits.min_feedback_score is not None and mean < limits.min_feedback_score:
            alerts.append(f"v{version} mean below {limits.min_feedback_score}")
    overall = float(np.mean([p[1] for pts in tested.values() for p in pts]))
    detail = "; ".join(parts) + (f": {', '.join(alerts)}" if alerts else "")
    return Signal(name, group, "alert" if alerts else "ok", overall, worst_p, alpha, detail, metrics)


@dataclass
class Reference:
    prompts: list[str]
    embeddings: np.ndarray
    source: str  # what the prompts are: "champion v3 training prompts" or a file


def distinct(
    prompts: Sequence[str], embeddings: np.ndarray, exclude: set[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Return each prompt once (its first occurrence) with its embedding row, leaving out `exclude`."""
    first: dict[str, int] = {}
    for i, text in enumerate(prompts):
        if not exclude or text not in exclude:
            first.setdefault(text, i)
    keep = sorted(first.values())
    rows = embeddings[keep] if len(embeddings) == len(prompts) and len(prompts) else embeddings
    return [prompts[i] for i in keep], rows


@task(name="compute-signals", cache_policy=NO_CACHE)
def compute_signals(
    reference: Reference,
    window: Window,
    embeddings: np.ndarray,
    baseline: list[LoggedRequest],
    feedback: dict[str, float],
    cfg: MonitorConfig,
    stale: dict[str, dict[str, int]] | str | None = None,
) -> list[Signal]:
    """Return every signal of the window, in report order (prompt, output, operations, quality)."""
    answered = window.answered
    # Prompt signals compare the distinct prompts the model was not trained on with its training
    # prompts. Traffic repeats itself and replays training questions; training prompts are
    # deduplicated. Kept in, repeats and exact copies of reference prompts made the window look
    # *more* alike than any permutation (measured: p = 1.0 on a window with 10% new topics).
    ref_prompts, ref_emb = distinct(reference.prompts, reference.embeddings)
    answered_prompts = [r.prompt for r in answered]
    prompts, cur_emb = distinct(answered_prompts, embeddings, exclude=set(ref_prompts))
    responses = [r.response for r in answered if r.response is not None]
    base_responses = [r.response for r in baseline if r.response is not None]
    t, n, alpha = cfg.thresholds, cfg.min_samples, cfg.alpha
    embedding = prompt_embedding_signal(ref_emb, cur_emb, n, cfg.permutations, alpha, cfg.kernel_bandwidth)
    if len(prompts) < len(answered_prompts):
        embedding.detail += f" ({len(prompts)} distinct prompts of {len(answered_prompts)} outside the reference)"
    return [
        embedding,
        prompt_length_signal(ref_prompts, prompts, n, alpha),
        new_vocabulary_signal(ref_prompts, prompts, n, alpha),
        response_length_signal(base_responses, responses, n, alpha),
        refusal_signal(responses, cfg.refusal_patterns, t.refusal_rate, n, base_responses),
        toxicity_signal(responses, t, n),
        guardrail_signal(answered, t.guardrail_rate, n),
        latency_signal(window.requests, t, n),
        error_rate_signal(window.requests, t.error_rate, n),
        cost_signal(window.requests, cfg.cost_per_1k_tokens),
        feedback_signal(answered, feedback, t, alpha),
        prompt_version_signal(window.requests, feedback, cfg.refusal_patterns, n),
        retrieval_signal(answered, t, n, baseline, alpha),
        collections_signal(stale),
    ]


@dataclass
class DriftResult:
    """The window's drift verdict: what retraining acts on (monitor.retrain_signals)."""

    verdict: Verdict
    statistic: float | None  # MMD² of the prompt embeddings
    p_value: float | None  # its permutation p-value
    reference_size: int
    window_size: int
    newest_request_id: str | None
    reason: str


def drift_verdict(
    signals: Sequence[Signal], retrain_signals: Sequence[str], reference_size: int, window: Window
) -> DriftResult:
    """Combine the retraining signals: drift when any alerts, no_data when none could judge."""
    by_name = {s.name: s for s in signals}
    chosen = [by_name[n] for n in retrain_signals if n in by_name]
    judged = [s for s in chosen if s.verdict != "no_data"]
    alerts = [s for s in judged if s.verdict == "alert"]
    emb = by_name.get("prompt_embedding")
    if not judged:
        verdict: Verdict = "no_data"
        reason = "; ".join(f"{s.name}: {s.detail}" for s in chosen) or "no signal"
    else:
        verdict = "drift" if alerts else "no_drift"
        reason = "; ".join(f"{s.name}: {s.detail}" for s in (alerts or judged))
    newest = window.newest
    return DriftResult(
        verdict,
        emb.statistic if emb else None,
        emb.p_value if emb else None,
        reference_size,
        len(window.answered),
        newest.id if newest else None,
        reason,
    )


# --------------------------------------------------------------------------- the check's inputs and verdict


def monitor_settings(cfg: MonitorConfig, **overrides: Any) -> MonitorConfig:
    """The monitoring settings of one check: the config's, with the flow's parameters that are set."""
    return MonitorConfig.model_validate({**cfg.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})


def read_prompts_file(path: Path) -> list[str]:
    """Prompts from a JSONL file (field prompt, question or text) or a text file (one per line)."""
    import json

    if not path.exists():
        raise FileNotFoundError(f"monitor.reference {path} does not exist: give `champion` or a prompts file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    out = []
    for i, line in enumerate(lines, 1):
        row = json.loads(line)
        text = next((row[k] for k in ("prompt", "question", "text") if isinstance(row.get(k), str)), None)
        if text is None:
            raise ValueError(f"{path} line {i}: no prompt, question or text field")
        out.append(text)
    return out


@task(name="read-reference", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def read_reference(m: MonitorConfig, champion: Any, cache: Path) -> Reference:
    """Return the reference the window is compared with: prompts (a seeded sample of at most
    monitor.reference_samples) with their embeddings, and what they are."""
    import random

    from tasks.embeddings import embed_reference
    from tasks.registry import reference_prompts

    if m.reference == "champion":
        if champion is None:
            prompts, source = [], "no champion to compare with"
        else:
            prompts = reference_prompts.fn(champion, cache / "reference" / champion.version)
            source = f"training prompts of champion v{champion.version}"
    else:
        prompts, source = read_prompts_file(Path(m.reference)), f"prompts file {m.reference}"
    if len(prompts) > m.reference_samples:
        prompts = random.Random(0).sample(prompts, m.reference_samples)
    vectors = embed_reference.fn(prompts, m.embedding_model, m.embedding_max_tokens, cache / "embeddings")
    return Reference(prompts, vectors, source)


@task(name="judge-drift", cache_policy=NO_CACHE)
def judge_drift(signals: list[Signal], m: MonitorConfig, reference: Reference, window: Window) -> DriftResult:
    """The window's drift verdict from the retraining signals (monitor.retrain_signals)."""
    drift = drift_verdict(signals, m.retrain_signals, len(reference.prompts), window)
    if not reference.prompts and drift.verdict == "no_data":
        drift.reason = f"{reference.source}; {drift.reason}"
    log.info("Drift verdict: %s (%s)", drift.verdict, drift.reason)
    return drift
