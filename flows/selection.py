"""Model-selection flow: evaluate several base models (no adapter) on one evaluation set and rank them.

    tuneloop evaluate --models builtin:smollm2-135m-instruct,/models/other --data eval.jsonl

The first step of the loop: pick the base model to fine-tune. Each model gets one MLflow run
(experiment registry.selection_experiment, nested under a run of the comparison that holds
the leaderboard table), with the same `eval/…` metric names as training runs, so the MLflow
compare view lines them up; a Prefect table artifact shows the leaderboard too.
"""

from __future__ import annotations

from prefect import flow

from tasks.data import load_eval_set
from tasks.evaluate import check_model_list, eval_rows, evaluate_base_model
from tasks.finetune import prepare_base_model
from tasks.judge import judge_answers, probe_judge
from tasks.leaderboard import SelectionResult, publish_leaderboard, selection_params
from tasks.prompts import resolve_prompt
from tasks.registry import log_model_evaluation, open_state, start_selection_run
from tuneloop.config import TuneloopConfig, check_run_parameters, load_config


@flow(name="model-selection-flow")
def model_selection_flow(
    config: TuneloopConfig | None = None,
    models: list[str] | None = None,
    rank_by: str = "rougeL",
    prompts: list[str] | None = None,
) -> SelectionResult:
    """Evaluate each base model in `models` on `config.data.path` and rank them by `rank_by`; with
    `prompts` (prompt versions: name/VERSION, name@alias), every model × prompt pair is a row."""
    cfg = config or load_config()
    check_run_parameters(cfg)  # a run's config may not point beyond the worker's allow-lists
    paths = open_state(cfg)
    # Every input is checked, every model resolved and the judge reached before any generation.
    models = check_model_list(models or [], rank_by, cfg.eval)
    dataset = load_eval_set(cfg.data)  # every row of data.path is the evaluation set
    rows = eval_rows(dataset.frame, cfg.eval, dataset.source)
    bases = [prepare_base_model(cfg.model.model_copy(update={"base": m}), paths.models) for m in models]
    specs = [resolve_prompt(cfg, p) for p in prompts or []]
    for spec in specs:
        spec.check_variables(cfg.serve.prompt_variables)  # before any generation
    grid = [(m, b, s) for m, b in zip(models, bases) for s in (specs or [None])]
    judge = probe_judge(cfg.eval.judge, paths.models)
    params = selection_params(models, rank_by, cfg.eval, judge)
    parent = start_selection_run(cfg.registry, rows, dataset.source, params)
    reports, run_ids = [], {}
    for model, base, spec in grid:
        label = f"{model} × {spec.ref}" if spec else model
        report = evaluate_base_model(
            base, dataset.frame, cfg.eval, label, cfg.model.dtype, spec, cfg.serve.prompt_variables
        )
        if judge:
            report = judge_answers(report, cfg.eval.judge, paths.models)
        run_ids[label] = log_model_evaluation(
            parent,
            label,
            base,
            report.metrics,
            report.examples,
            {k: str(v) for k, v in params.items() if k.startswith("eval.")},
        )
        reports.append(report)
    return publish_leaderboard(reports, run_ids, rank_by, cfg.eval, parent, f"{dataset.source} ({len(rows)} examples)")
