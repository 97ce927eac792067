"""The monitoring report: a self-contained HTML page with every signal and its pictures, and
the check's figures in MLflow (on the check's run, and step by step on the model's timeline)."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.drift import DriftResult, LoggedRequest, Reference, Signal, Window, words
from tuneloop.config import MonitorConfig
from tuneloop.reports import STYLES, Table, figure_html, fmt, page, png_base64

PLOT_POINTS = 2000  # per sample in the scatter: more only blurs the picture


@dataclass
class ReportContext:
    """What the report says about the check beyond its signals."""

    champion: str  # "v3" or "none"
    reference_source: str
    decision: str  # "drift holds: 2 of the last 3 windows drifted (k=2)"
    episode: str | None
    retraining: str  # what happened about retraining, in words
    data_note: str
    embedded_new: int
    mlflow_run_id: str


def signal_metrics(signals: list[Signal], drift: DriftResult, window: Window) -> dict[str, float]:
    """Return the check's figures as MLflow metric names and values."""
    out: dict[str, float] = {
        "window/requests": len(window.requests),
        "window/answered": len(window.answered),
        "window/skipped_rows": window.skipped_total,
        "drift/detected": float(drift.verdict == "drift"),
    }
    if drift.statistic is not None:
        out.update({"drift/mmd2": drift.statistic, "drift/p_value": drift.p_value})
    for s in signals:
        if s.verdict == "no_data":
            continue
        out[f"{s.name}/alert"] = float(s.verdict == "alert")
        if s.statistic is not None:
            out[f"{s.name}/statistic"] = s.statistic
        if s.p_value is not None:
            out[f"{s.name}/p_value"] = s.p_value
        out.update({f"{s.name}/{k}": v for k, v in s.metrics.items()})
    return out


@task(name="log-monitoring-metrics", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def log_monitoring_metrics(record_run: str, timeline_run: str, step: int, metrics: dict[str, float]) -> None:
    """Log the check's figures on its own run and at `step` of the timeline (one batch each)."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
    for i in range(0, len(batch), 900):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(record_run, metrics=batch[i : i + 900])
        client.log_batch(timeline_run, metrics=batch[i : i + 900])


@task(name="finish-monitoring-run", retries=2, retry_delay_seconds=2)
def finish_monitoring_run(record_run: str, report: Path) -> None:
    """Attach the report to the check's MLflow run and end the run."""
    client = MlflowClient()
    client.log_artifact(record_run, str(report))
    client.set_terminated(record_run)


def read_timeline(timeline_run: str, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient()
    return {n: sorted((m.step, m.value) for m in client.get_metric_history(timeline_run, n)) for n in names}


def _figure(plt, width: float = 6, height: float = 3.6):
    return plt.subplots(figsize=(width, height))


def _png(plt, fig) -> str:
    image = png_base64(fig)
    plt.close(fig)
    return image


def _sample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    return x if len(x) <= n else x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


def _pictures(
    reference: Reference,
    window: Window,
    embeddings: np.ndarray,
    baseline: list[LoggedRequest],
    feedback: dict[str, float],
    timeline: dict[str, list[tuple[int, float]]],
    signals: list[Signal],
    alpha: float,
    slo_ms: float | None,
) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    answered = window.answered
    out: list[tuple[str, str]] = []
    ref_emb, cur_emb = reference.embeddings, embeddings
    if len(ref_emb) and len(cur_emb):
        pooled = np.concatenate([ref_emb, cur_emb])
        centre = pooled.mean(axis=0)
        centred = _sample(pooled, 4000) - centre
        # The 2 principal axes from the 384×384 covariance: an SVD of the samples costs seconds.
        axes = np.linalg.eigh(centred.T @ centred)[1][:, ::-1][:, :2]
        ref_xy, cur_xy = (
            (_sample(ref_emb, PLOT_POINTS) - centre) @ axes,
            (_sample(cur_emb, PLOT_POINTS) - centre) @ axes,
        )
        fig, ax = _figure(plt, 6, 4.5)
        ax.scatter(*ref_xy.T, s=10, alpha=0.45, label=f"reference ({len(ref_emb)})")
        ax.scatter(*cur_xy.T, s=14, alpha=0.7, color="crimson", label=f"window ({len(cur_emb)})")
        ax.set(title="Prompt embeddings, 2-D PCA", xlabel="PC 1", ylabel="PC 2")
        ax.legend()
        out.append(("Reference and window prompts in embedding space", _png(plt, fig)))
        centroid = ref_emb.mean(axis=0)
        centroid /= np.linalg.norm(centroid) or 1.0
        fig, ax = _figure(plt)
        ref_sim, cur_sim = ref_emb @ centroid, cur_emb @ centroid
        bins = np.linspace(min(ref_sim.min(), cur_sim.min()), max(ref_sim.max(), cur_sim.max()), 30)
        ax.hist(ref_sim, bins=bins, alpha=0.6, density=True, label="reference")
        ax.hist(cur_sim, bins=bins, alpha=0.6, density=True, color="crimson", label="window")
        ax.set(title="Cosine similarity to the reference centroid", xlabel="cosine", ylabel="density")
        ax.legend()
        out.append(("Similarity to the reference", _png(plt, fig)))

    def lengths(title: str, ref: list[str], cur: list[str], ref_label: str) -> None:
        if not ref and not cur:
            return
        a = np.array([len(words(t)) for t in ref]) if ref else np.zeros(0)
        b = np.array([len(words(t)) for t in cur]) if cur else np.zeros(0)
        top = max(a.max() if len(a) else 1, b.max() if len(b) else 1)
        bins = np.arange(0, top + 2, max(1, int(top // 30) or 1))
        fig, ax = _figure(plt)
        if len(a):
            ax.hist(a, bins=bins, alpha=0.6, density=True, label=ref_label)
        if len(b):
            ax.hist(b, bins=bins, alpha=0.6, density=True, color="crimson", label="window")
        ax.set(title=title, xlabel="words", ylabel="density")
        ax.legend()
        out.append((title, _png(plt, fig)))

    lengths("Prompt length", reference.prompts, [r.prompt for r in answered], "reference")
    lengths(
        "Answer length",
        [r.response for r in baseline if r.response],
        [r.response for r in answered if r.response],
        "version's first answers",
    )

    timed = [r for r in answered if r.latency_ms is not None]
    if timed:
        t0 = timed[0].created_at
        minutes = np.array([(r.created_at - t0).total_seconds() / 60 for r in timed])
        latency = np.array([r.latency_ms for r in timed])
        fig, ax = _figure(plt)
        ax.scatter(minutes, latency, s=8, alpha=0.5, label="request")
        if len(latency) >= 20:
            k = max(10, len(latency) // 20)
            at = np.unique(np.linspace(k, len(latency), min(200, len(latency) - k + 1)).astype(int))
            rolling = [np.percentile(latency[i - k : i], 95) for i in at]  # at most 200 points on the line
            ax.plot(minutes[at - 1], rolling, color="black", label=f"rolling p95 ({k} requests)")
        if slo_ms:
            ax.axhline(slo_ms, color="crimson", linestyle="--", label=f"p95 SLO {slo_ms:.0f} ms")
        ax.set(title="Latency over the window", xlabel=f"minutes since {t0:%Y-%m-%d %H:%M} UTC", ylabel="ms")
        ax.legend()
        out.append(("Latency over time", _png(plt, fig)))

    scored = [r for r in answered if r.id in feedback]
    if scored:
        t0 = scored[0].created_at
        fig, ax = _figure(plt)
        for version in sorted({str(r.model_version) for r in scored}):
            pts = [r for r in scored if str(r.model_version) == version]
            ax.plot(
                [(r.created_at - t0).total_seconds() / 60 for r in pts],
                [feedback[r.id] for r in pts],
                "o-",
                ms=3,
                alpha=0.7,
                label=f"v{version}",
            )
        ax.set(title="Feedback score per version", xlabel="minutes", ylabel="score")
        ax.legend()
        out.append(("Feedback over time", _png(plt, fig)))

    p_values = timeline.get("prompt_embedding/p_value", [])
    if p_values:
        fig, ax = _figure(plt)
        steps = [s for s, _ in p_values]
        ax.semilogy(steps, [max(v, 1e-4) for _, v in p_values], "o-", label="prompt embedding (MMD)")
        for name, style in (("prompt_length/p_value", "s--"), ("new_vocabulary/p_value", "^:")):
            series = timeline.get(name, [])
            if series:
                ax.semilogy(
                    [s for s, _ in series],
                    [max(v, 1e-4) for _, v in series],
                    style,
                    alpha=0.7,
                    label=name.split("/")[0].replace("_", " "),
                )
        ax.axhline(alpha, color="crimson", linestyle="--", label=f"alpha {alpha}")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set(title="p-values over the checks", xlabel="check", ylabel="p-value")
        ax.legend(fontsize=8)
        out.append(("Drift tests over time", _png(plt, fig)))
    return out


def signal_test(s: Signal) -> str:
    """How a signal is judged: its p-value and alpha, or its limit."""
    if s.is_test:
        return (f"p = {fmt(s.p_value)} " if s.p_value is not None else "") + f"(alpha {fmt(s.threshold)})"
    return "–" if s.threshold is None else f"limit {fmt(s.threshold)}"


def signals_table(signals: list[Signal], title: str = "") -> Table:
    """One row per signal: group, name, statistic, test or limit, verdict, detail."""
    return Table(
        ["group", "signal", "statistic", "p-value / limit", "verdict", "detail"],
        [[s.group, s.name, fmt(s.statistic), signal_test(s), s.verdict, s.detail] for s in signals],
        title=title,
        styles=[STYLES.get(s.verdict, "") for s in signals],
    )


def check_table(drift: DriftResult, window: Window, context: ReportContext) -> Table:
    """What the check compared and decided, beyond its signals."""
    skipped = ", ".join(f"{n} {reason}" for reason, n in window.skipped.items()) or "none"
    rows = [
        ["champion", context.champion],
        ["reference", f"{context.reference_source} ({drift.reference_size} prompts)"],
        [
            "window",
            (f"{len(window.requests)} requests ({len(window.answered)} answered), newest {window.window_id or '–'}"),
        ],
        ["malformed rows skipped", skipped],
        ["prompts embedded by this check", f"{context.embedded_new} (the others were embedded by earlier checks)"],
        ["persistence", context.decision],
        ["episode", context.episode or "–"],
        ["retraining", context.retraining],
        ["retraining data", context.data_note or "–"],
        ["MLflow run", context.mlflow_run_id],
    ]
    return Table(["", ""], rows)


@task(name="write-monitoring-report", cache_policy=NO_CACHE)
def write_monitoring_report(
    out: Path,
    drift: DriftResult,
    signals: list[Signal],
    reference: Reference,
    window: Window,
    embeddings: np.ndarray,
    baseline: list[LoggedRequest],
    feedback: dict[str, float],
    context: ReportContext,
    timeline: dict[str, list[tuple[int, float]]],
    alpha: float,
    slo_ms: float | None,
) -> Path:
    """Write the check as a self-contained HTML page: verdicts, retraining, signals, pictures, outliers."""
    e = html.escape
    pictures = _pictures(reference, window, embeddings, baseline, feedback, timeline, signals, alpha, slo_ms)
    figures = "".join(figure_html(title, img) for title, img in pictures)
    outliers = ""
    answered = window.answered
    if len(reference.embeddings) and len(embeddings):
        centroid = reference.embeddings.mean(axis=0)
        centroid /= np.linalg.norm(centroid) or 1.0
        sim = embeddings @ centroid
        outliers = Table(
            ["cosine to the reference centroid", "prompt"],
            [[f"{sim[i]:.3f}", answered[i].prompt[:300]] for i in np.argsort(sim)[:10]],
            title="Requests least like the reference",
        ).html()
    body = (
        f"<h1>Prompt drift: <span class='{STYLES.get(drift.verdict, '')}'>{drift.verdict}</span></h1>"
        f"<p>{e(drift.reason)}</p>{check_table(drift, window, context).html()}<h2>Signals</h2>"
        f"{signals_table(signals).html()}<h2>Pictures</h2>{figures}{outliers}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(page("tuneloop monitoring report", body))
    tmp.replace(out)
    return out


TIMELINE_SIGNALS = ["prompt_embedding/p_value", "prompt_length/p_value", "new_vocabulary/p_value"]


@task(name="publish-monitoring-report", cache_policy=NO_CACHE)
def publish_monitoring_report(
    out: Path,
    drift: DriftResult,
    signals: list[Signal],
    reference: Reference,
    window: Window,
    embeddings: np.ndarray,
    baseline: list[LoggedRequest],
    feedback: dict[str, float],
    context: ReportContext,
    trigger: Any,
    m: MonitorConfig,
    experiment: str,
) -> Path:
    """Log the check's figures (its run and the model's timeline), write the HTML report onto its run,
    end the run, and show the check as a Prefect artifact; return the report's path."""
    from prefect.artifacts import create_markdown_artifact

    log_monitoring_metrics.fn(
        trigger.record_run_id, trigger.timeline_run_id, trigger.step, signal_metrics(signals, drift, window)
    )
    timeline = read_timeline(trigger.timeline_run_id, TIMELINE_SIGNALS)
    report = write_monitoring_report.fn(
        out,
        drift,
        signals,
        reference,
        window,
        embeddings,
        baseline,
        feedback,
        context,
        timeline,
        m.alpha,
        m.thresholds.latency_p95_ms,
    )
    finish_monitoring_run.fn(trigger.record_run_id, report)
    create_markdown_artifact(
        key="monitoring-report",
        markdown=(
            f"## Prompt drift: **{drift.verdict}**\n\n{drift.reason}\n\n"
            f"{context.decision}; retraining: {context.retraining}\n\n{signals_table(signals).markdown()}\n"
            f"{check_table(drift, window, context).markdown()}\n| report | `{report}` (artifact `{report.name}` "
            f"of the run, experiment `{experiment}`) |"
        ),
        description=f"Monitoring check: {drift.verdict}",
    )
    return report
