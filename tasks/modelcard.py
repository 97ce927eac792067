"""A model card per registered version: Markdown, as the version's description and an artifact.

    card = ModelCard.build(cfg, version, kind, size_bytes, lineage, candidate, comparison, verdict, report)
    publish_model_card(cfg.registry, version, card)        # description (summary) + model_card.md

The registry page shows the summary (what it is for, what it learned from, how it scored per
slice with paired intervals, safety figures, known limits, the gate's verdict, who promoted it);
the full card (every rule, every metric) is `model_card.md` in the version's run. The long
lineage stays in the version's tags. Promotion adds who or what promoted it (`record_promoter`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from prefect import task

from tuneloop.config import TuneloopConfig
from tuneloop.reports import fmt

DESCRIPTION_LIMIT = 4800  # MLflow's SQL stores keep 5000 characters of a version description
PROMOTION_HEADING = "## Promotion"
HEADLINE_METRICS = ("token_f1", "rougeL", "exact_match")
SAFETY_METRICS = ("toxicity_rate", "pii_leak_rate")


@dataclass
class ModelCard:
    title: str
    summary: list[str]  # the sections the registry page shows
    details: list[str] = field(default_factory=list)  # only in the artifact

    @property
    def description(self) -> str:
        text = "\n".join(self.summary).strip() + "\n"
        if len(text) > DESCRIPTION_LIMIT:
            text = text[: DESCRIPTION_LIMIT - 60].rsplit("\n", 1)[0] + "\n\n(cut: the full card is model_card.md)\n"
        return text

    @property
    def markdown(self) -> str:
        return "\n".join([*self.summary, *self.details]).strip() + "\n"

    @classmethod
    def build(
        cls,
        tl: TuneloopConfig,
        version: str,
        kind: str,
        size_bytes: int,
        lineage: dict[str, str],
        candidate: Any,
        comparison: list[Any],
        verdict: Any,
        report: Any,
    ) -> ModelCard:
        """The card of a just-registered version (tasks.evaluate's ModelEvaluation, PairedDifference list,
        GateVerdict; tasks.validation's DatasetReport)."""
        name = tl.registry.model_name
        what = {"adapter": "LoRA adapter", "full": "fully fine-tuned weights"}.get(kind, kind)
        derived = lineage.get("tuneloop.derived_from")
        intended = tl.registry.intended_use or "Not stated (registry.intended_use)."
        tag = lineage.get
        base = f"`{tag('tuneloop.base_model', '?')}` (sha256 {tag('tuneloop.base_sha256', '')[:12]}…)"
        model_line = f"- {what} on {base}, {size_bytes / 1e6:.1f} MB on disk; method {tag('tuneloop.method', '?')}"
        if derived:
            model_line += f"; derived from v{derived} ({tag('tuneloop.derivation', '')})"
        training_line = (
            f"- Trained {tag('tuneloop.train.steps', '?')} steps, final loss {tag('tuneloop.train.final_loss', '?')}, "
            f"from {tag('tuneloop.train.started_from', '?')}; trigger: {tag('tuneloop.trigger', '?')}"
        )
        summary = [
            f"# {name} v{version}",
            "",
            f"**Gate: {verdict.decision}** ({verdict.reason}). Compared with {tag('tuneloop.compared_with', '?')}.",
            "",
            "## Intended use",
            intended,
            "",
            "## Model",
            model_line,
            training_line,
        ]
        if lineage.get("tuneloop.prompt_version"):
            summary.append(f"- Trained and gated with prompt version `{lineage['tuneloop.prompt_version']}`")
        summary += [
            "",
            "## Training data",
            f"- `{report.source}`"
            + (f" (held out from `{report.eval_source}`)" if report.eval_source else "")
            + f": {report.train_rows} training rows, {report.eval_rows} held out; digest {report.digest}",
            f"- Validation: {'passed' if report.success else 'failed'}, {len(report.warnings())} warnings",
        ]
        if lineage.get("tuneloop.replay_rows"):
            summary.append(
                f"- {lineage['tuneloop.replay_rows']} replayed rows from {lineage.get('tuneloop.replay_source')}"
            )
        gains = {(d.slice, d.metric): d for d in comparison}
        summary += ["", "## Evaluation per slice (paired gain vs the reference, 95% interval)", ""]
        summary += ["| slice | metric | value | gain [interval] |", "|---|---|---|---|"]
        for sl, r in candidate.reports.items():
            for m in HEADLINE_METRICS:
                if m in r.metrics:
                    d = gains.get((sl, m))
                    gain = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" if d else "—"
                    summary.append(f"| {sl} | {m} | {fmt(r.metrics[m])} | {gain} |")
        summary += ["", "## Safety", ""]
        for sl, r in candidate.reports.items():
            figures = ", ".join(f"{m} {fmt(r.metrics[m])}" for m in SAFETY_METRICS if m in r.metrics)
            summary.append(f"- {sl}: {figures or 'not measured'}")
        summary += ["", "## Bias (counterfactual pairs; lower is better)", ""]
        bias = getattr(candidate, "bias", {}) or {}
        if bias:
            summary += [
                "| category | bias_gap | change vs the reference [interval] | stereotype_score |",
                "|---|---|---|---|",
            ]
            for category, r in bias.items():
                d = gains.get((category, "bias_gap"))
                change = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" if d else "—"
                stereo = fmt(r.metrics["stereotype_score"]) if "stereotype_score" in r.metrics else "—"
                summary.append(f"| {category} | {fmt(r.metrics.get('bias_gap'))} | {change} | {stereo} |")
        else:
            summary.append("- Not measured for this version (eval.bias.categories).")
        limits = list(tl.registry.known_limitations)
        small = [sl for sl, r in candidate.reports.items() if len(r.examples) < 100]
        if small:
            limits.append(f"Evaluated on fewer than 100 examples on {', '.join(small)}: wide intervals.")
        if lineage.get("tuneloop.validation_warnings", "0") != "0":
            limits.append(f"Its training data raised {lineage['tuneloop.validation_warnings']} validation warnings.")
        summary += ["", "## Known limits", "", *([f"- {x}" for x in limits] or ["- None recorded."])]
        summary += ["", PROMOTION_HEADING, "", "- Not promoted (registered; `champion` moves by promotion only)."]
        details = ["", "## Gate rules", "", *[f"- `{line}`" for line in verdict.lines()]]
        details += ["", "## Every figure", ""]
        for sl, r in candidate.reports.items():
            details.append(f"- {sl}: " + ", ".join(f"{m} {fmt(v)}" for m, v in sorted(r.metrics.items())))
        for category, r in bias.items():
            details.append(f"- bias {category}: " + ", ".join(f"{m} {fmt(v)}" for m, v in sorted(r.metrics.items())))
        return cls(f"{name} v{version}", summary, details)


def actor() -> str:
    """Who promotes: `TUNELOOP_ACTOR` when the caller names someone (a reviewer, a key id), else the
    user the flow runs as, with its Prefect flow run."""
    import getpass
    import os

    from prefect.runtime import flow_run

    who = os.environ.get("TUNELOOP_ACTOR") or f"user {getpass.getuser()}"
    run = flow_run.get_id()
    return f"{who} (Prefect flow run {run})" if run else who


def promoted_section(actor: str, strategy: str, reason: str, when: dt.datetime | None = None) -> str:
    stamp = (when or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    return f"{PROMOTION_HEADING}\n\n- Promoted to champion {stamp} by **{actor}** ({strategy}): {reason}\n"


def with_promotion(description: str, section: str) -> str:
    """The description with its promotion section replaced (a card without one gets it appended)."""
    head = description.split(PROMOTION_HEADING, 1)[0].rstrip()
    return f"{head}\n\n{section}" if head else section


@task(name="record-promoter", retries=2, retry_delay_seconds=2)
def record_promoter(model_name: str, version: str, strategy: str, reason: str, approved_by: str | None = None) -> str:
    """Who or what promoted the version (the reviewer who approved it, when one did): its card's
    promotion section and `tuneloop.promoted_by`."""
    from mlflow import MlflowClient

    who = f"{approved_by} (approved in the Prefect UI)" if approved_by else actor()
    client = MlflowClient()
    current = client.get_model_version(model_name, version).description or ""
    section = promoted_section(who, strategy, reason[:400])
    client.update_model_version(model_name, version, description=with_promotion(current, section)[:DESCRIPTION_LIMIT])
    client.set_model_version_tag(model_name, version, "tuneloop.promoted_by", who)
    return who


@task(name="publish-model-card", retries=2, retry_delay_seconds=2)
def publish_model_card(model_name: str, version: str, run_id: str, card: ModelCard) -> None:
    """The card as the version's description (summary) and `model_card.md` in its run (full)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.update_model_version(model_name, version, description=card.description)
    client.log_text(run_id, card.markdown, "model_card.md")
