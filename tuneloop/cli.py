"""The `tuneloop` command line: the one module that stands above every layer.

    tuneloop demo                      # the whole loop on the embedded default
    tuneloop up / tuneloop down        # local Prefect, MLflow and Ray (+ Serve) on 127.0.0.1
    tuneloop train --data data.jsonl   # one training flow run
    tuneloop promote [--version N]     # serve the challenger (or version N) and make it champion
    tuneloop evaluate --models A,B --data eval.jsonl   # compare base models: a leaderboard
    tuneloop monitor [--window 500]    # one monitoring check: every signal's verdict
    tuneloop validate data.jsonl       # data validation only

Heavy libraries are imported inside commands: `tuneloop --help` stays instant.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tuneloop.config import DEFAULT_CONFIG, ConfigError, TuneloopConfig, load_config
from tuneloop.reports import STYLES, Table, fmt

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="An LLMOps loop: validate, fine-tune, evaluate, register, serve, monitor, retrain.",
)
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default configs/local.yaml)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override, e.g. train.max_steps=5")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show every flow and task log line")]


def _config(path: Path | None, overrides: list[str] | None, extra: list[str] | None = None) -> TuneloopConfig:
    try:
        return load_config(path, [*(overrides or []), *(extra or [])])
    except ConfigError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None


def _environment(cfg: TuneloopConfig, *, use_server: bool, verbose: bool = False) -> None:
    """Export the state dir's environment; use the local Prefect server when one is up."""
    from tuneloop.services import port_open
    from tuneloop.state import apply_environment

    server = use_server or port_open("127.0.0.1", cfg.prefect.port)
    apply_environment(cfg, prefect_api=server)
    if not server:
        os.environ.pop("PREFECT_API_URL", None)  # ephemeral API on the state dir's database
    if not verbose:
        # Full logs still reach the Prefect UI; the terminal shows progress and warnings.
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("mlflow", "ray", "ray.serve", "great_expectations", "transformers", "py.warnings"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _fail(err: BaseException) -> typer.Exit:
    console.print(f"[red]Failed:[/red] {err}")
    return typer.Exit(1)


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    )


@contextmanager
def _flow_progress(title: str) -> Iterator[None]:
    """Show what a flow run in this process reports (tuneloop.progress): a bar per training, per
    model evaluated on a slice (steps with the loss, examples answered), under a line for the flow."""
    from tuneloop.progress import listen

    console.print(title)
    with _progress() as progress:
        current: dict[str, tuple[Any, int, int]] = {}  # stage -> (bar, done, total)

        def show(stage: str, done: int, total: int, what: str) -> None:
            bar = current.get(stage)
            if bar is None or done <= bar[1] or total != bar[2]:  # the stage starts over: a new bar
                bar = (progress.add_task(f"{stage} {what}", total=total), 0, total)
            progress.update(bar[0], completed=done, description=f"{stage} {what}")
            current[stage] = (bar[0], done, total)

        with listen(show):
            yield


def _run_flow(cfg: TuneloopConfig, verbose: bool, title: str, target: str, *args: Any, bars: bool = True) -> Any:
    """Run the flow `target` ("module:function") in this process with `cfg`: the state dir's settings
    first (the flow's modules are imported after them), then progress bars (or a spinner), and a
    failure printed as the command line prints errors."""
    import importlib

    _environment(cfg, use_server=False, verbose=verbose)
    module, _, name = target.partition(":")
    flow = getattr(importlib.import_module(module), name)
    with _flow_progress(title) if bars else console.status(title):
        try:
            return flow(cfg, *args)
        except Exception as err:
            raise _fail(err) from err


# --------------------------------------------------------------------------- demo


@dataclass
class DemoReport:
    stages: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage, in order
    topics: tuple[str, str] = ("first", "drifted")  # the first training's topic, the drifted one


def run_demo(
    cfg: TuneloopConfig,
    data: Any,
    max_tokens: int = 16,
    on_stage: Callable[[str], None] = lambda s: None,
    retraining_timeout_s: int = 1800,
) -> DemoReport:
    """Run the loop's stages in order against running local services; return what each did.

    `data` is a tasks.data.DemoData. A version that passes the gate is promoted (registry.on_gate_pass):
    served, smoke-tested, then made champion; retraining is started by the monitoring flow through
    the training deployment.
    """
    from flows.monitoring import monitoring_flow
    from flows.training import training_flow
    from tasks.deploy import endpoint, serving_version
    from tasks.retrain import wait_for_retraining
    from tasks.traffic import ChatLoad, canary_open, send_chat_traffic

    start = time.perf_counter()
    cfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"path": str(data.first_train), "slice": data.first_topic}),
            "monitor": cfg.monitor.model_copy(update={"retrain_data": data.drifted_train}),
        }
    )
    report = DemoReport(topics=(data.first_topic, data.drifted_topic))
    url, name = endpoint(cfg.serve), cfg.registry.model_name
    current, since = "", start

    def stage(name: str) -> None:  # time the stage that ends here, announce the next ("": none)
        nonlocal current, since
        now = time.perf_counter()
        if current:
            report.stage_seconds[current] = now - since
        current, since = name, now
        if name:
            on_stage(name)

    stage(f"train on {data.first_topic}, gate against the base model, register, promote to Ray Serve")
    report.stages["first_training"] = training_flow(cfg, trigger="demo: initial training")
    stage(f"send {len(data.first_traffic)} {data.first_topic} requests")
    report.stages["first_traffic"] = send_chat_traffic(url, name, data.first_traffic, max_tokens)
    stage(f"monitor: drift check on {data.first_topic} traffic")
    report.stages["check_before"] = monitoring_flow(cfg)
    stage(f"send {len(data.drifted_traffic)} {data.drifted_topic} requests")
    report.stages["drifted_traffic"] = send_chat_traffic(url, name, data.drifted_traffic, max_tokens)
    stage(f"monitor: drift check on {data.drifted_topic} traffic")
    after = report.stages["check_after"] = monitoring_flow(cfg)
    stage(f"retrain on {data.drifted_topic} data with replay (training deployment), gate, canary, promote")
    if after.retraining_flow_run_id:
        # Users ask while the new version takes its canary share: the promotion decides on these
        # live answers. The traffic waits while the version trains and is evaluated, so the
        # evaluation's figures (latency included) are the model's on a quiet machine, not the
        # contention of 2 cores shared with the demo's own requests.
        with ChatLoad(
            url, name, data.drifted_traffic, max_tokens, clients=2, pause_s=0.25, only_when=lambda: canary_open(url)
        ) as live:
            report.stages["retraining_state"] = wait_for_retraining(after.retraining_flow_run_id, retraining_timeout_s)
        report.stages["live_traffic"] = live.result()
    stage("collections: ingest story summaries, ask the serving version with and without them")
    report.stages["retrieval"] = demo_retrieval(cfg, url, name)
    stage("")
    report.stages["serving"] = serving_version.fn(cfg.serve)
    report.seconds = time.perf_counter() - start
    return report


DEMO_STAGES = 7


def demo_retrieval(cfg: TuneloopConfig, url: str, model: str, max_tokens: int = 24) -> Any:
    """Ingest NarrativeQA story summaries (the ingest flow), register a prompt version bound to
    them, and ask questions about the stories alone and with it (tasks/retrieval/demo.py)."""
    from flows.collections import ingest_collection_flow
    from tasks.prompts import register_prompt
    from tasks.retrieval.demo import COLLECTION, TEMPLATE, RetrievalShowcase, ask_with_and_without, export_stories
    from tuneloop.prompts import Retrieval
    from tuneloop.retrieval import Retriever
    from tuneloop.state import collections_location, state_paths

    folder, questions = export_stories(state_paths(cfg).data)
    ingested = ingest_collection_flow(cfg, str(folder), COLLECTION)
    spec, _ = register_prompt(
        cfg,
        "story-qa",
        TEMPLATE,
        "demo: answer from the story summaries",
        retrieval=Retrieval(collection=COLLECTION, k=2),
    )
    rows = ask_with_and_without(url, model, spec, Retriever(collections_location(cfg)), questions, max_tokens)
    return RetrievalShowcase(COLLECTION, ingested.version, ingested.chunks, spec.ref, rows)


def registry_table(cfg: TuneloopConfig, metric: str = "token_f1") -> Table:
    """Return a table of the registered versions: aliases, what each was trained and gated on, and,
    per slice it was evaluated on, its `metric` next to its reference's (the champion it was
    compared with, or the base model) and the paired gain with its 95% interval."""
    import math

    import mlflow

    from tuneloop.state import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(cfg))
    table = Table(
        ["version", "aliases", "gate", "slice", "reference", "version's", "gain [95% CI]"],
        title=f"Registered versions of {cfg.registry.model_name}: {metric} per slice, the version "
        "next to what it was gated against (the base model, or the champion then)",
    )
    versions = client.search_model_versions(f"name='{cfg.registry.model_name}'")
    aliases: dict[str, list[str]] = {}
    if versions:  # search results carry no aliases; the registered model does
        for alias, version in client.get_registered_model(cfg.registry.model_name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)

    def three(value: float | None) -> str:
        return "–" if value is None or math.isnan(value) else f"{value:.3f}"

    for mv in sorted(versions, key=lambda v: int(v.version)):
        t = mv.tags
        figures = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        slices = [ref.split("@")[0] for ref in t.get("tuneloop.slices", "").split(",") if ref] or ["–"]
        against = t.get("tuneloop.compared_with", "?")
        against = "base" if against.startswith("base") else against.replace("champion ", "")
        for i, name in enumerate(slices):
            gain = figures.get(f"eval/{name}/gain/{metric}")
            low, high = (figures.get(f"eval/{name}/gain/{metric}_ci_{end}") for end in ("low", "high"))
            interval = "–" if gain is None else f"{gain:+.3f} [{low:+.3f}, {high:+.3f}]"
            head = (
                (str(mv.version), ", ".join(aliases.get(str(mv.version), [])) or "–", t.get("tuneloop.gate", "?"))
                if i == 0
                else ("", "", "")
            )
            table.rows.append(
                [
                    *head,
                    name + (" (new)" if i == 0 else ""),
                    f"{three(figures.get(f'eval/{name}/champion/{metric}'))} {against}",
                    three(figures.get(f"eval/{name}/{metric}")),
                    interval,
                ]
            )
        table.section_ends.append(len(table.rows) - 1)
    return table


def _demo_summary(cfg: TuneloopConfig, report: DemoReport) -> None:
    from tasks.deploy import endpoint

    console.print(registry_table(cfg).rich())
    checks = Table(
        ["check", "window", "MMD²", "p-value", "verdict", "retraining run"],
        title="Drift checks (MMD² on MiniLM embeddings, permutation test)",
    )
    first, drifted = report.topics
    for key, label in (("check_before", f"after {first} traffic"), ("check_after", f"after {drifted} traffic")):
        m = report.stages[key]
        d = m.drift
        checks.rows.append(
            [
                label,
                str(d.window_size),
                f"{d.statistic:.4f}" if d.statistic is not None else "–",
                f"{d.p_value:.4f}" if d.p_value is not None else "–",
                d.verdict,
                m.retraining_flow_run_id[:8] if m.retraining_flow_run_id else "–",
            ]
        )
        checks.styles.append(STYLES.get(d.verdict, ""))
    console.print(checks.rich())
    for key, label in (
        ("first_traffic", f"{first} traffic"),
        ("drifted_traffic", f"{drifted} traffic"),
        ("live_traffic", f"{drifted} traffic during the canary"),
    ):
        if key in report.stages:
            t = report.stages[key]
            console.print(f"{label}: {t.ok}/{t.sent} answered, by version {t.versions}")
    if "retrieval" in report.stages:
        _retrieval_summary(report.stages["retrieval"])
    console.print(
        f"Retraining run: {report.stages.get('retraining_state', 'not started')}; now serving "
        f"v{report.stages['serving']}; loop took {report.seconds:.0f} s:"
    )
    for name, seconds in report.stage_seconds.items():
        console.print(f"  {seconds:6.0f} s  {name}")
    console.print(
        "\n[bold]Look around[/bold] (state in "
        f"{cfg.home}):\n  .venv/bin/tuneloop up      # Prefect UI http://127.0.0.1:{cfg.prefect.port}, "
        f"MLflow UI http://127.0.0.1:{cfg.mlflow.ui_port}, Ray dashboard http://127.0.0.1:{cfg.serve.dashboard_port}\n"
        f"  curl -s {endpoint(cfg.serve)}/v1/chat/completions -H 'content-type: application/json' \\\n"
        '       -d \'{"messages": [{"role": "user", "content": "Which medicine is this question about? '
        "Answer with its generic name.\\n\\ncan i take ibuprofen with a cold?\"}]}'\n"
        "  .venv/bin/tuneloop down    # stop everything"
    )


def _retrieval_summary(shown: Any) -> None:
    table = Table(
        ["question (references)", "alone", "with retrieval (cited)", "token F1"],
        title=f"Questions about stories, asked of the serving version alone and through {shown.prompt} "
        f"(collection {shown.collection} v{shown.version}, {shown.chunks} chunks)",
    )
    for r in shown.rows:
        cited = ", ".join(c["source"].split("#")[-1] for c in r["cited"])
        table.rows.append(
            [
                f"{r['question']} ({' / '.join(r['references'])})",
                r["alone"],
                f"{r['with_retrieval']} [{cited}]",
                f"{r['f1_alone']:.2f} → {r['f1_with_retrieval']:.2f}",
            ]
        )
    console.print(table.rich())
    right = sum(r["f1_with_retrieval"] > r["f1_alone"] for r in shown.rows)
    console.print(
        f"token F1 {shown.mean('f1_alone'):.3f} alone → {shown.mean('f1_with_retrieval'):.3f} with retrieval; "
        f"better with it on {right} of {len(shown.rows)} (a 135M model: retrieval gives it the names, "
        "not always the answer)"
    )


# What the demo trains with: the recipe measured to make SmolLM2-135M learn both demo tasks on
# 2 CPU cores (BENCHMARKS.md, "The demo"); a --set of the user's comes after and wins.
DEMO_SETTINGS = [
    "train.max_steps=40",
    "train.lora_rank=16",
    "train.lora_alpha=32",
    "train.target_modules=auto",
    "train.learning_rate=0.001",
    "train.max_seq_len=128",
    "data.eval_fraction=0.2",
    "eval.max_examples=48",
    "eval.max_new_tokens=12",  # monitor.replay_share stays at its default, 0.5: 0.25 forgot more (BENCHMARKS.md)
    # No perplexity: a forward pass over every reference, a third of each evaluation's time, in no demo rule.
    "eval.metrics=[rougeL,bleu,chrf,exact_match,token_f1,toxicity_rate,pii_leak_rate]",
]


@app.command()
def demo(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    keep_up: Annotated[bool, typer.Option(help="Leave the servers running at the end")] = False,
    first_rows: Annotated[int, typer.Option(help="Training rows of the first task (arithmetic word problems)")] = 400,
    traffic: Annotated[int, typer.Option(help="Requests per traffic phase")] = 24,
) -> None:
    """Run the whole loop on the embedded default: train, serve, drift, retrain, promote."""
    set_ = [*DEMO_SETTINGS, *(set_ or [])]
    cfg = _config(config, set_)
    _environment(cfg, use_server=True, verbose=verbose)
    from tasks.data import export_demo_data
    from tuneloop import services
    from tuneloop.state import state_paths

    paths = state_paths(cfg).ensure()
    with _progress() as progress:
        task = progress.add_task("start Prefect, Ray and the flow runner", total=DEMO_STAGES + 2)
        try:
            services.start_prefect_server(cfg)
            services.start_ray(cfg)
            data = export_demo_data.fn(paths.data, first_rows, traffic)
            services.start_flow_runner(cfg, config or DEFAULT_CONFIG, schedules=False, overrides=set_ or [])
            progress.advance(task)

            def stage(name: str) -> None:
                progress.update(task, description=name)
                progress.advance(task)

            report = run_demo(cfg, data, on_stage=stage)
            progress.advance(task)
        except Exception as err:
            raise _fail(err) from err
        finally:
            if not keep_up:
                progress.update(task, description="stop servers")
                _stop_all(cfg)
    _demo_summary(cfg, report)


# --------------------------------------------------------------------------- up / down


def _stop_all(cfg: TuneloopConfig) -> list[str]:
    from tuneloop import services

    stopped = [n for n in ("runner", "worker", "mlflow") if services.stop_service(cfg, n)]
    services.stop_ray(cfg)
    if services.stop_service(cfg, "prefect"):
        stopped.append("prefect")
    return stopped + ["ray"]


@app.command()
def up(config: ConfigOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Start Prefect, MLflow and Ray on 127.0.0.1, register the flows, serve the champion."""
    cfg = _config(config, set_)
    _environment(cfg, use_server=True, verbose=verbose)
    from flows.promotion import promotion_flow
    from tasks.deploy import endpoint
    from tasks.registry import find_champion
    from tuneloop import services
    from tuneloop.state import tracking_uri

    with _progress() as progress:
        task = progress.add_task("start servers", total=5)
        try:
            for label, start in (
                ("Prefect server", services.start_prefect_server),
                ("MLflow server", services.start_mlflow_server),
                ("Ray (with dashboard)", lambda c: services.start_ray(c, dashboard=True)),
            ):
                progress.update(task, description=f"start {label}")
                start(cfg)
                progress.advance(task)
            progress.update(task, description="register flows as deployments")
            if cfg.prefect.deployments == "work_pools":  # prefect.yaml on work pools, a worker here
                services.apply_work_pool_deployments(cfg, config or DEFAULT_CONFIG, overrides=set_ or [])
                services.start_worker(cfg)
            else:  # the embedded default: one runner serves and runs them
                services.start_flow_runner(cfg, config or DEFAULT_CONFIG, schedules=True, overrides=set_ or [])
            progress.advance(task)
            import mlflow

            mlflow.set_tracking_uri(tracking_uri(cfg))
            champion = find_champion.fn(cfg.registry)
            if champion:
                progress.update(task, description=f"serve champion v{champion.version}")
                promotion_flow(cfg, champion.version)
            progress.advance(task)
        except Exception as err:
            raise _fail(err) from err
    console.print(
        f"Prefect UI    http://127.0.0.1:{cfg.prefect.port}\n"
        f"MLflow UI     http://127.0.0.1:{cfg.mlflow.ui_port}\n"
        f"Ray dashboard http://127.0.0.1:{cfg.serve.dashboard_port}\n"
        f"Endpoint      {endpoint(cfg.serve)}/v1/chat/completions "
        f"({'champion v' + champion.version if champion else 'nothing serves yet: run a training'})\n"
        "Stop with: tuneloop down"
    )


@app.command()
def down(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Stop every server `up` or `demo` started; leave the state dir as it is."""
    cfg = _config(config, set_)
    _environment(cfg, use_server=False)
    with console.status("stopping servers"):
        stopped = _stop_all(cfg)
    console.print(f"Stopped: {', '.join(stopped)}")


# --------------------------------------------------------------------------- single flows


@app.command()
def train(
    data: Annotated[str, typer.Option("--data", "-d", help="JSONL/CSV/Parquet file, save_to_disk folder, or hub id")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Validate DATA, fine-tune, evaluate against the champion, register (and promote)."""
    cfg = _config(config, set_, [f"data.path={data}"])
    title = "training flow: validate, train, evaluate against the champion, register"
    result = _run_flow(cfg, verbose, title, "flows.training:training_flow", "cli")
    console.print(
        f"Registered {result.version.name} v{result.version.version}: gate {result.decision}, "
        f"{'alias ' + result.alias if result.alias else 'no alias'}"
    )
    for line in result.rules:
        console.print(f"  {line}")


@app.command()
def promote(
    version: Annotated[
        str | None, typer.Option(help="Version to serve (default: the challenger; with none, the champion again)")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Deploy a version that passed the gate to Ray Serve and make it champion; keep the old one if it fails."""
    cfg = _config(config, set_)
    result = _run_flow(cfg, verbose, "promotion flow", "flows.promotion:promotion_flow", version, bars=False)
    console.print(
        f"v{result.serving} serves at {result.endpoint} (was {result.previous or 'nothing'}; {result.strategy})"
    )
    for line in result.rules:
        console.print(f"  {line}")


@app.command()
def optimize(
    version: Annotated[str | None, typer.Option(help="Version to derive from (default: the champion)")] = None,
    method: Annotated[
        str | None, typer.Option(help="q8_0, q4_k_m, q4_0 or f16 (llama.cpp's types; default: optimize.method)")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Derive a merged, quantized version for llama.cpp; gate it against its parent on every slice; register it."""
    cfg = _config(config, set_)
    result = _run_flow(
        cfg, verbose, "optimization flow", "flows.optimization:optimization_flow", version or "", method or ""
    )
    colour = "green" if result.decision == "passed" else "red"
    console.print(
        f"v{result.version} = v{result.parent} {result.method} ({result.size_bytes / 1e6:.1f} MB, parent "
        f"{result.parent_size_bytes / 1e6:.1f} MB): [{colour}]{result.decision}[/{colour}], "
        f"{'alias ' + result.alias if result.alias else 'no alias'}"
    )
    for line in result.rules:
        console.print(f"  {line}")


@app.command(name="serve-config")
def serve_config_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout")] = None,
) -> None:
    """Print the Ray Serve config of this tuneloop config, for `serve deploy` (it serves the champion)."""
    import yaml

    from tuneloop.servespec import serve_config

    cfg = _config(config, set_)
    path = str(config) if config else "configs/local.yaml"
    text = (
        f"# Ray Serve config: `serve deploy {out or 'serve-config.yaml'}` on a running Ray cluster.\n"
        f"# Written by `tuneloop serve-config --config {path}`; the app serves the registry's champion\n"
        "# (ModelServer user_config.adapters empty) and routes all traffic to it. The promotion\n"
        "# flow applies the same config with adapters and canary routing filled in.\n"
        + yaml.safe_dump(
            serve_config(cfg, {"config": path, "set": list(set_ or [])} if set_ else {"config": path}), sort_keys=False
        )
    )
    if out:
        out.write_text(text)
        console.print(f"Wrote {out}")
    else:
        typer.echo(text, nl=False)


api_key_app = typer.Typer(help="API keys of the serving gateway (stored as SHA-256 only).")
app.add_typer(api_key_app, name="api-key")


@api_key_app.command("new")
def api_key_new(
    key_id: Annotated[str, typer.Option("--id", help="Public name of the key, e.g. team-a")],
    rate: Annotated[int | None, typer.Option(help="Requests per minute for this key")] = None,
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="infer (default), feedback, admin; repeat for several")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Add it to this keys file (serve.api_keys_file): live at once")
    ] = None,
) -> None:
    """Make a key: print it once, and its entry (the hash) for the config or a keys file."""
    from tuneloop.apikeys import key_sha256, new_key
    from tuneloop.config import ApiKeyConfig

    key = new_key()
    entry = {"id": key_id, "sha256": key_sha256(key), "scopes": scope or ["infer"]}
    if rate:
        entry["rate_per_minute"] = rate
    try:
        ApiKeyConfig.model_validate(entry)
    except ValueError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    console.print(f"Key (shown once, give it to the client): [bold]{key}[/bold]")
    if file is not None:
        entries = [e for e in _read_keys(file) if e["id"] != key_id]  # a new key for an id replaces the old
        _write_keys(file, [*entries, entry])
        console.print(f"Added to {file} as {key_id!r} (the gateway picks it up within seconds)")
        return
    console.print("Add to the config under serve.api_keys:")
    typer.echo("  - " + ", ".join(f"{k}: {v}" for k, v in entry.items()).join("{}"))


@api_key_app.command("revoke")
def api_key_revoke(
    key_id: Annotated[str, typer.Option("--id", help="The key to remove")],
    file: Annotated[Path, typer.Option("--file", help="The keys file (serve.api_keys_file)")],
) -> None:
    """Remove a key from a keys file: the gateway refuses it within seconds, no restart."""
    entries = _read_keys(file)
    kept = [e for e in entries if e["id"] != key_id]
    if len(kept) == len(entries):
        console.print(f"[red]{file} has no key {key_id!r}[/red]")
        raise typer.Exit(1)
    _write_keys(file, kept)
    console.print(f"Revoked {key_id!r} ({len(kept)} keys left in {file})")


def _read_keys(path: Path) -> list[dict]:
    import yaml

    from serving.guard import read_keys_file

    try:
        return read_keys_file(path) if path.exists() else []
    except (ValueError, TypeError, yaml.YAMLError) as err:  # never overwrite keys it cannot read
        console.print(f"[red]{path} is not a readable keys file, left as it is: {err}[/red]")
        raise typer.Exit(1) from None


def _write_keys(path: Path, entries: list[dict]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump([{k: v for k, v in e.items() if v is not None} for e in entries], sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)  # the gateway never reads half a file


@app.command(name="artifact-key")
def artifact_key() -> None:
    """Print a new key for registry.encrypt_artifacts (put it in TUNELOOP_ARTIFACT_KEY; keep it safe)."""
    from cryptography.fernet import Fernet

    typer.echo(Fernet.generate_key().decode())


prompt_app = typer.Typer(help="Prompt versions in MLflow's Prompt Registry (system prompts, templates, few-shot).")
app.add_typer(prompt_app, name="prompt")


def _registry_config(config: Path | None, set_: list[str] | None) -> TuneloopConfig:
    cfg = _config(config, set_)
    _environment(cfg, use_server=False)  # MLflow's settings of the state dir, quiet logs
    return cfg


@prompt_app.command("register")
def prompt_register(
    name: Annotated[str, typer.Argument(help="Prompt name, e.g. support")],
    file: Annotated[Path, typer.Option("--file", "-f", help="YAML/JSON list of messages, or a text file")],
    message: Annotated[str, typer.Option("--message", "-m", help="What changed (the version's commit message)")],
    author: Annotated[str | None, typer.Option(help="Who wrote it (default: the user)")] = None,
    alias: Annotated[str | None, typer.Option(help="Move this alias to the version")] = None,
    collection: Annotated[
        str | None, typer.Option(help="Bind a collection: its chunks fill the template's {{context}}")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", min=1, max=20, help="Chunks retrieved (with --collection)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Register a template as the next version of a prompt (an equal template gives its version back)."""
    from tasks.prompts import read_retrieval_file, read_template_file, register_prompt
    from tuneloop.prompts import Retrieval
    from tuneloop.vectorstore import CollectionError

    cfg = _registry_config(config, set_)
    try:
        template = read_template_file(str(file))
        retrieval = read_retrieval_file(str(file))
        if collection is not None:
            retrieval = Retrieval(collection=collection, k=k or (retrieval.k if retrieval else 4))
        elif k is not None:
            raise ValueError("-k sets how many chunks a bound collection gives: name it with --collection")
        spec, created = register_prompt(cfg, name, template, message, author, alias, retrieval)
    except (OSError, ValueError, CollectionError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    what = "Registered" if created else "Unchanged: the newest version already holds this template,"
    bound = f"; retrieves {spec.retrieval.k} chunks of {spec.retrieval.collection}" if spec.retrieval else ""
    console.print(f"{what} {spec.ref} (sha256 {spec.sha256[:12]}…; variables: {spec.variables or 'none'}{bound})")


@prompt_app.command("list")
def prompt_list(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Every prompt with its newest version."""
    from tasks.prompts import list_prompts

    rows = [
        [p.name, p.version, ", ".join(p.aliases), p.author, p.message]
        for p in list_prompts(_registry_config(config, set_))
    ]
    console.print(Table(["prompt", "newest", "aliases", "author", "message"], rows, title="Prompts").rich())


@prompt_app.command("show")
def prompt_show(
    ref: Annotated[str, typer.Argument(help="name, name/VERSION or name@ALIAS")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """One version's template and the history of its prompt."""
    from tasks.prompts import PromptNotFound, parse_ref, prompt_versions, resolve_prompt, show_text

    cfg = _registry_config(config, set_)
    try:
        spec = resolve_prompt(cfg, ref)
    except PromptNotFound as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    console.print(f"[bold]{spec.ref}[/bold] sha256 {spec.sha256}; variables: {spec.variables or 'none'}")
    typer.echo(show_text(spec))
    rows = [[v.version, ", ".join(v.aliases), v.author, v.message] for v in prompt_versions(cfg, parse_ref(ref)[0])]
    console.print(Table(["version", "aliases", "author", "message"], rows, title="History").rich())


@prompt_app.command("diff")
def prompt_diff_cmd(
    a: Annotated[str, typer.Argument(help="name/VERSION or name@ALIAS")],
    b: Annotated[str, typer.Argument(help="name/VERSION or name@ALIAS")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """A unified diff of two prompt versions' templates."""
    from tasks.prompts import PromptNotFound, prompt_diff

    try:
        diff = prompt_diff(_registry_config(config, set_), a, b)
    except PromptNotFound as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    typer.echo(diff or f"{a} and {b} hold the same template")


@prompt_app.command("evaluate")
def prompt_evaluate(
    ref: Annotated[str, typer.Argument(help="name/VERSION or name@ALIAS")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Gate a prompt version against the serving prompt on the champion model's slices (before promote)."""
    cfg = _config(config, set_)
    result = _run_flow(cfg, verbose, f"evaluating prompt {ref}", "flows.prompts:prompt_evaluation_flow", ref)
    colour = "green" if result.decision == "passed" else "red"
    console.print(
        f"{result.prompt} vs {result.compared_with}: [{colour}]{result.decision}[/{colour}] ({result.reason})"
    )
    console.print(f"MLflow run {result.run_id} (eval report, every answer); tagged on the prompt version")


@prompt_app.command("promote")
def prompt_promote(
    ref: Annotated[str, typer.Argument(help="name/VERSION or name@ALIAS")],
    allow_new_variables: Annotated[
        bool, typer.Option(help="Serve it although its variables differ from the serving prompt's")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve a prompt version on the chat route through the canary and rules (no model reloads)."""
    cfg = _config(config, set_)
    target = "flows.promotion:prompt_promotion_flow"
    result = _run_flow(cfg, verbose, "prompt promotion flow", target, ref, allow_new_variables, bars=False)
    console.print(
        f"{result.serving} serves on the chat route (was {result.previous or 'no prompt'}; {result.strategy})"
    )
    for line in result.rules:
        console.print(f"  {line}")


docs_app = typer.Typer(help="Document collections: ingest files into the vector store, search them.")
app.add_typer(docs_app, name="docs")


@docs_app.command("ingest")
def docs_ingest(
    path: Annotated[Path, typer.Argument(help="A file (.txt .md .jsonl .pdf) or a folder of them")],
    collection: Annotated[str, typer.Option("--collection", help="Collection name (created if new)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Chunk, embed and store documents; unchanged chunks are not embedded again."""
    cfg = _config(config, set_)
    target = "flows.collections:ingest_collection_flow"
    report = _run_flow(cfg, verbose, f"ingesting {path}", target, str(path), collection)
    console.print(
        f"collection [bold]{report.collection}[/bold] version {report.version}: {report.chunks} chunks from "
        f"{report.documents} documents; {report.added} added, {report.updated} updated, {report.removed} removed, "
        f"{report.unchanged} unchanged"
        + (f"; skipped {len(report.skipped_files)} files of other kinds" if report.skipped_files else "")
    )


@docs_app.command("evaluate")
def docs_evaluate(
    collection: Annotated[str, typer.Argument(help="Collection name")],
    questions: Annotated[
        Path, typer.Option("--questions", "-q", help="JSONL: {question, relevant: [source or chunk id, ...]}")
    ],
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="Chunks retrieved per question")] = 5,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """recall@k and MRR of labelled questions; exit 1 when collections.rules fail."""
    cfg = _config(config, set_)
    target, title = "flows.collections:evaluate_collection_flow", f"evaluating retrieval from {collection}"
    result = _run_flow(cfg, verbose, title, target, collection, str(questions), k, bars=False)
    figures = ", ".join(f"{m} {v:.3f}" for m, v in result.metrics.items())
    verdict = "[green]passed[/green]" if result.passed else "[red]failed[/red]"
    console.print(f"{collection}@{result.version}, k={k}: {figures} {verdict}")
    for line in result.rules:
        console.print(f"  {line}")
    if not result.passed:
        raise typer.Exit(1)


@docs_app.command("list")
def docs_list(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Every collection with its version, size and embedder."""
    from tuneloop.state import collections_location
    from tuneloop.vectorstore import CollectionError, CollectionStore, list_collections

    root = collections_location(_config(config, set_))
    rows = []
    try:
        described = [CollectionStore.open(root, name).describe() for name in list_collections(root)]
    except CollectionError as err:  # a server that cannot be reached
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    for d in described:
        name = d["name"]
        rows.append([name, d["version"], d["chunks"], d.get("documents", "?"), d["embedder"]])
    console.print(Table(["collection", "version", "chunks", "documents", "embedder"], rows, title="Collections").rich())


@docs_app.command("search")
def docs_search(
    collection: Annotated[str, typer.Argument(help="Collection name")],
    query: Annotated[str, typer.Argument(help="What to look for")],
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="Chunks to return")] = 4,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """The chunks most similar to a query, with their scores and sources."""
    from tuneloop.embedder import load_embedder
    from tuneloop.state import collections_location
    from tuneloop.vectorstore import CollectionError, CollectionStore

    cfg = _config(config, set_)
    try:
        store = CollectionStore.open(collections_location(cfg), collection)
        vector = load_embedder(store.meta["embedder"], 512)([query])[0]
        hits = store.search(vector, k)
    except CollectionError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    rows = [[f"{h.score:.3f}", f"{h.source}:{h.position}", h.text[:200]] for h in hits]
    console.print(Table(["score", "source", "text"], rows, title=f"{collection}: {query}").rich())


privacy_app = typer.Typer(help="Erase a person's data; enforce privacy.retention_days.")
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("forget")
def privacy_forget(
    key: Annotated[str | None, typer.Option("--key", help="Erase every request of this API key id")] = None,
    request: Annotated[list[str] | None, typer.Option("--request", help="Erase this request (its id)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Erase requests from the inference log, their feedback and embeddings, retraining files and reports."""
    from tasks.privacy import forget

    cfg = _config(config, set_)
    if key is None and not request:
        console.print("[red]Say whose data to erase: --key ID or --request ID[/red]")
        raise typer.Exit(2)
    _erasure_table(forget(cfg, key, list(request or [])), "Erased")


@privacy_app.command("expire")
def privacy_expire(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Delete what is older than privacy.retention_days now (each monitoring run does it too)."""
    from tasks.privacy import expire

    cfg = _config(config, set_)
    _erasure_table(expire.fn(cfg), f"Older than {cfg.privacy.retention_days} days, deleted")


def _erasure_table(erasure: Any, title: str) -> None:
    table = Table(["where", "removed"], [list(line) for line in erasure.lines()], title=title, right=["removed"])
    console.print(table.rich())


@app.command(name="evaluate")
def evaluate_models(
    models: Annotated[
        str,
        typer.Option("--models", "-m", help="Comma-separated base models: builtin:<name>, local folders or hub ids"),
    ],
    data: Annotated[Path, typer.Option("--data", "-d", help="JSONL evaluation set (prompt / response)")],
    rank_by: Annotated[str, typer.Option(help="Metric that orders the leaderboard")] = "rougeL",
    prompts: Annotated[
        str | None,
        typer.Option(help="Comma-separated prompt versions (name/VERSION, name@alias): a model × prompt grid"),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Evaluate several base models (and prompt versions) on one set; print and log a leaderboard."""

    cfg = _config(config, set_, [f"data.path={data}"])
    _environment(cfg, use_server=False, verbose=verbose)
    from flows.selection import model_selection_flow
    from tuneloop.config import LOWER_IS_BETTER

    specs = [m.strip() for m in models.split(",") if m.strip()]
    with _flow_progress(f"evaluating {len(specs)} models on {data.name}"):
        try:
            result = model_selection_flow(
                cfg, specs, rank_by, [p.strip() for p in (prompts or "").split(",") if p.strip()]
            )
        except Exception as err:
            raise _fail(err) from err
    # The terminal shows the figures a choice turns on; MLflow and the Prefect artifact have all.
    shown = [c for c in result.columns if c == rank_by or c not in ("p50_latency_ms", "cost_per_1k_tokens")]
    figures = [c.replace("generation_tokens_per_second", "tokens/s") for c in shown]
    table = Table(
        ["rank", "model", *figures],
        [[str(row.rank), row.model, *(fmt(row.metrics.get(c)) for c in shown)] for row in result.rows],
        title=f"{len(specs)} base models on {data.name}, ranked by {rank_by} "
        f"({'lower' if rank_by in LOWER_IS_BETTER else 'higher'} is better)",
        right=["rank", *figures],
    )
    console.print(table.rich())
    console.print(
        f"MLflow: experiment {cfg.registry.selection_experiment!r}, run {result.parent_run_id} "
        "(leaderboard.json; one child run per model)"
    )


@app.command()
def monitor(
    window: Annotated[int | None, typer.Option(help="Newest requests to check (default monitor.window)")] = None,
    reference: Annotated[
        str | None, typer.Option(help="champion (its training prompts) or a prompts file (default monitor.reference)")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run one monitoring check now: print every signal's statistic, test and verdict."""
    extra = [
        *([f"monitor.window={window}"] if window else []),
        *([f"monitor.reference={reference}"] if reference else []),
    ]
    cfg = _config(config, set_, extra)
    result = _run_flow(cfg, verbose, "monitoring flow", "flows.monitoring:monitoring_flow", bars=False)
    from tasks.drift_report import signals_table

    version = f"v{result.champion_version}" if result.champion_version else "(none)"
    title = f"Monitoring check: {result.drift.window_size} answered requests vs champion {version}"
    console.print(signals_table(result.signals, title).rich())
    d = result.drift
    colour = {"drift": "red", "no_drift": "green"}.get(d.verdict, "dim")
    console.print(f"Prompt drift: [bold {colour}]{d.verdict}[/] — {d.reason}")
    console.print(f"Persistence: {result.decision}" + (f"; episode {result.episode}" if result.episode else ""))
    if result.retraining_flow_run_id:
        how = "Started" if result.retraining_started else "Already started for this episode:"
        console.print(f"{how} retraining flow run {result.retraining_flow_run_id} ({result.data_note})")
    elif result.data_note:
        console.print(f"[yellow]No retraining:[/] {result.data_note}")
    if result.skipped_rows:
        console.print(f"[yellow]{result.skipped_rows} malformed log rows skipped[/]")
    console.print(
        f"Report: {result.report}\nMLflow: experiment {cfg.registry.monitoring_experiment!r}, "
        f"run {result.mlflow_run_id}"
    )


@app.command()
def validate(
    data: Annotated[str, typer.Argument(help="JSONL/CSV/Parquet file, save_to_disk folder, or hub id")],
    eval_data: Annotated[str | None, typer.Option("--eval", help="Separate eval set (else a held-out share)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate a dataset as training would (suite + LLM data contracts); exit 1 on errors."""
    cfg = _config(config, set_, [f"data.path={data}", *([f"data.eval_path={eval_data}"] if eval_data else [])])
    _environment(cfg, use_server=False)
    from datetime import UTC, datetime

    from tasks.data import DataValidationError, load_split
    from tasks.validation import validate as run_validation
    from tuneloop.chat import TemplateError
    from tuneloop.models import BaseModelError, resolve_base
    from tuneloop.safety import PiiUnavailable
    from tuneloop.state import state_paths

    paths = state_paths(cfg).ensure()
    steps = ["read the dataset", "prepare the base model's tokenizer", "suite and contracts"]
    with _progress() as progress:
        bar = progress.add_task(steps[0], total=len(steps))
        try:
            split = load_split(cfg.data)
            progress.update(bar, advance=1, description=steps[1])
            base = resolve_base(cfg.model.base, paths.models)
            progress.update(bar, advance=1, description=steps[2])
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            report, _ = run_validation(
                split,
                cfg.validation,
                cfg.train.max_seq_len,
                base,
                paths.reports / "validation" / f"{split.digest}-{stamp}",
            )
            progress.update(bar, advance=1)
        except (DataValidationError, BaseModelError, TemplateError, PiiUnavailable) as err:
            raise _fail(err) from err
    _print_dataset_report(report)
    if not report.success:
        raise typer.Exit(1)


def _print_dataset_report(report: Any) -> None:
    from rich.text import Text

    colours = {"pass": "green", "warn": "yellow", "fail": "red", "redacted": "blue", "off": "dim", "skipped": "dim"}
    rows = [[c.name, c.level, c.status, c.figure, ", ".join(c.rows)] for c in report.contracts]
    failed = [c for c in report.checks if not c.success]
    for c in failed:
        status = "fail" if c.severity == "critical" else "warn"
        rows.append([f"GX {c.name}", c.severity, status, f"{c.column or ''}: {c.detail}", ", ".join(c.rows)])
    if not failed:
        rows.append(["GX suite", "critical", "pass", f"{len(report.checks)} expectations met", ""])
    table = Table(
        ["check", "level", "verdict", "figure", "first rows"],
        rows,
        title=f"{report.source}: {report.train_rows} train + {report.eval_rows} eval rows "
        f"({report.shape}), digest {report.digest}",
        styles=[colours.get(row[2], "") for row in rows],
    )
    console.print(table.rich())
    if report.example:
        styles = {"masked": "dim", "trained": "bold green", "cut": "red strike"}
        text = Text()
        for piece, state in report.example:
            text.append(piece, style=styles[state])
        console.print(
            f"Row {report.example_row} as the trainer sees it ([bold green]trained[/], [dim]masked[/], "
            f"[red strike]cut[/]):"
        )
        console.print(text)
    console.print(f"Report: {report.html}" + (f"\nData Docs: {report.data_docs}" if report.data_docs else ""))
    verdict = "[green]passed[/]" if report.success else f"[red]FAILED[/] ({len(report.errors())} error(s))"
    console.print(f"Validation {verdict}, {len(report.warnings())} warning(s)")


if __name__ == "__main__":
    app()
