"""Model-selection flow: evaluate several base models (no adapter) on one evaluation set and rank them.

    tuneloop evaluate --models builtin:smollm2-135m-instruct,/models/other --data eval.jsonl

The first step of the loop: pick the base model to fine-tune. Each model gets one MLflow run
(experiment registry.selection_experiment, nested under a run of the comparison that holds
the leaderboard table), with the same `eval/…` metric names as training runs, so the MLflow
compare view lines them up; a Prefect table artifact shows the leaderboard too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from tasks.data import load_eval_set
from tasks.evaluate import EvalReport, check_model_list, eval_rows, evaluate_base_model, rank_reports
from tasks.finetune import prepare_base_model
from tasks.judge import judge_answers, probe_judge
from tasks.registry import log_leaderboard, log_model_evaluation, open_state, start_selection_run
from tuneloop.config import EvalConfig, TuneloopConfig, evaluated_metrics, load_config


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

        return [{"rank": r.rank, "model": r.model, **{c: figure(r.metrics.get(c)) for c in self.columns},
                 "run_id": r.run_id} for r in self.rows]


@flow(name="model-selection-flow")
def model_selection_flow(config: TuneloopConfig | None = None, models: list[str] | None = None,
                         rank_by: str = "rougeL") -> SelectionResult:
    """Evaluate each base model in `models` on `config.data.path` and rank them by `rank_by`."""
    cfg = config or load_config()
    paths = open_state(cfg)
    # Every input is checked, every model resolved and the judge reached before any generation.
    models = check_model_list(models or [], rank_by, cfg.eval)
    dataset = load_eval_set(cfg.data)  # every row of data.path is the evaluation set
    rows = eval_rows(dataset.frame, cfg.eval, dataset.source)
    bases = [prepare_base_model(cfg.model.model_copy(update={"base": m}), paths.models) for m in models]
    judge = probe_judge(cfg.eval.judge, paths.models)
    params = selection_params(models, rank_by, cfg.eval, judge)
    parent = start_selection_run(cfg.registry, rows, dataset.source, params)
    reports, run_ids = [], {}
    for model, base in zip(models, bases):
        report = evaluate_base_model(base, dataset.frame, cfg.eval, model, cfg.model.dtype)
        if judge:
            report = judge_answers(report, cfg.eval.judge, paths.models)
        run_ids[model] = log_model_evaluation(parent, model, base, report.metrics, report.examples,
                                              {k: str(v) for k, v in params.items() if k.startswith("eval.")})
        reports.append(report)
    return publish_leaderboard(reports, run_ids, rank_by, cfg.eval, parent, f"{dataset.source} ({len(rows)} examples)")


def selection_params(models: list[str], rank_by: str, cfg: EvalConfig, judge: object) -> dict[str, object]:
    return {"models": ",".join(models), "rank_by": rank_by, "eval.max_examples": cfg.max_examples,
            "eval.max_new_tokens": cfg.max_new_tokens, "eval.metrics": ",".join(cfg.metrics),
            **(judge.params() if judge else {})}


@task(name="publish-leaderboard")
def publish_leaderboard(reports: list[EvalReport], run_ids: dict[str, str], rank_by: str, cfg: EvalConfig,
                        parent: str, what: str) -> SelectionResult:
    """Rank the models, attach the leaderboard to the comparison's run and show it as a Prefect artifact."""
    columns = [rank_by, *(m for m in evaluated_metrics(cfg) if m != rank_by)]
    ranked = [LeaderboardRow(i, r.label, run_ids[r.label], r.metrics)
              for i, r in enumerate(rank_reports(reports, rank_by), start=1)]
    result = SelectionResult(rank_by, columns, parent, ranked)
    log_leaderboard.fn(parent, result.table())
    create_table_artifact(key="model-leaderboard", table=result.table(),
                          description=f"{len(reports)} base models on {what}, ranked by {rank_by}")
    get_run_logger().info("Best by %s: %s", rank_by, ranked[0].model)
    return result
