"""The model-selection leaderboard: rank evaluated base models, record and show the table.

result = publish_leaderboard(reports, run_ids, "rougeL", cfg.eval, parent_run, "eval.jsonl (48 examples)")
result.table()      # one dict per model, best first
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from tasks.evaluate import EvalReport, rank_reports
from tasks.registry import log_leaderboard
from tuneloop.config import EvalConfig, evaluated_metrics


@dataclass
class LeaderboardRow:
    rank: int
    model: str
    run_id: str
    metrics: dict[str, float]


@dataclass
class SelectionResult:
    rank_by: str
    columns: list[str]  # the metrics shown, rank_by first
    parent_run_id: str
    rows: list[LeaderboardRow]  # best first

    def table(self) -> list[dict[str, object]]:
        """Return one dict per model, best first (a missing or NaN figure as None: JSON has no NaN)."""

        def figure(value: float | None) -> float | None:
            return None if value is None or math.isnan(value) else round(value, 6)

        return [
            {
                "rank": r.rank,
                "model": r.model,
                **{c: figure(r.metrics.get(c)) for c in self.columns},
                "run_id": r.run_id,
            }
            for r in self.rows
        ]


def selection_params(models: list[str], rank_by: str, cfg: EvalConfig, judge: object) -> dict[str, object]:
    return {
        "models": ",".join(models),
        "rank_by": rank_by,
        "eval.max_examples": cfg.max_examples,
        "eval.max_new_tokens": cfg.max_new_tokens,
        "eval.metrics": ",".join(cfg.metrics),
        **(judge.params() if judge else {}),
    }


@task(name="publish-leaderboard")
def publish_leaderboard(
    reports: list[EvalReport], run_ids: dict[str, str], rank_by: str, cfg: EvalConfig, parent: str, what: str
) -> SelectionResult:
    """Rank the models, attach the leaderboard to the comparison's run and show it as a Prefect artifact."""
    columns = [rank_by, *(m for m in evaluated_metrics(cfg) if m != rank_by)]
    ranked = [
        LeaderboardRow(i, r.label, run_ids[r.label], r.metrics)
        for i, r in enumerate(rank_reports(reports, rank_by), start=1)
    ]
    result = SelectionResult(rank_by, columns, parent, ranked)
    log_leaderboard.fn(parent, result.table())
    create_table_artifact(
        key="model-leaderboard",
        table=result.table(),
        description=f"{len(reports)} base models on {what}, ranked by {rank_by}",
    )
    get_run_logger().info("Best by %s: %s", rank_by, ranked[0].model)
    return result
