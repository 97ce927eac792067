"""Closing the loop: decide whether drift holds, and start one retraining run per drift episode.

Every check leaves a record (an MLflow run in the monitoring experiment, a child of the
model's timeline run) with its verdict, its window and, while drift holds, its episode.
Drift holds when at least k of the last n windows (checks with data) of the same champion
drifted. An episode is named after the first drifted window of its streak, so every check
of one episode, and two runs that overlap, compute the same name; it is the idempotency key
of the training flow run, so Prefect creates that run once. Runs that overlap also take
turns: the decision is made under a Prefect global concurrency limit of one slot per model.

Side effects in an order a crash cannot break: the record (retraining "pending") and the
dataset file are written before the training run is created, and the run's id after it. A
check that dies between the two leaves no training run; the next check of the episode finds
the pending record and creates the run, under the same key.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.drift import DriftResult, LoggedRequest, Verdict, Window
from tuneloop.config import Persistence

log = logging.getLogger(__name__)

T_MODEL = "tuneloop.monitor.model"
T_VERSION = "tuneloop.champion_version"
T_VERDICT = "tuneloop.verdict"
T_WINDOW = "tuneloop.window_id"
T_HOLDS = "tuneloop.drift_holds"
T_EPISODE = "tuneloop.episode"
T_RETRAINING = "tuneloop.retraining_run"  # flow run id, "pending", or absent
T_DATA = "tuneloop.retrain_data"
T_DATA_NOTE = "tuneloop.retrain_data_note"
T_TIMELINE = "tuneloop.monitor.timeline"
T_CHECKS = "tuneloop.monitor.checks"
PENDING = "pending"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", text)


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class CheckRecord:
    run_id: str
    verdict: Verdict
    window_id: str | None
    holds: bool
    episode: str | None
    retraining: str | None  # a flow run id, PENDING, or None
    data: str | None = None
    data_note: str | None = None


@dataclass(frozen=True)
class Decision:
    holds: bool  # drift in at least k of the last n windows
    episode: str | None  # while it holds: the idempotency key of the episode's retraining
    drifted: int  # drifted windows among the last n (this one included)
    windows: int  # windows looked at (at most n)
    previous: CheckRecord | None  # the last check of the same episode, if this one continues it

    def describe(self, persistence: Persistence) -> str:
        state = "holds" if self.holds else "does not hold"
        return f"drift {state}: {self.drifted} of the last {self.windows} windows drifted (k={persistence.k})"


def decide(history: Sequence[CheckRecord], verdict: Verdict, window_id: str | None, persistence: Persistence,
           scope: str) -> Decision:
    """Return whether drift holds after this window, and the episode it belongs to.

    `history`: earlier checks of the same model and champion, oldest first. Checks without
    data are not windows: they neither count nor break a streak. The episode continues the
    previous check's when that one held; else it is named after the first drifted window
    among the last n (`scope` makes names unique across models and champion versions).
    """
    evidence = [r for r in history if r.verdict != "no_data"]
    if verdict == "no_data":
        return Decision(False, None, 0, 0, None)
    recent = [*((r.verdict, r.window_id) for r in evidence), (verdict, window_id)][-persistence.n:]
    drifted = [w for v, w in recent if v == "drift"]
    holds = len(drifted) >= persistence.k
    if not holds:
        return Decision(False, None, len(drifted), len(recent), None)
    last = evidence[-1] if evidence else None
    if last is not None and last.holds and last.episode:
        return Decision(True, last.episode, len(drifted), len(recent), last)
    return Decision(True, f"drift:{scope}:{drifted[0]}", len(drifted), len(recent), None)


# --------------------------------------------------------------------------- records in MLflow


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:  # created by another run meanwhile
        return client.get_experiment_by_name(name).experiment_id


def timeline_run(client: MlflowClient, experiment_id: str, model: str) -> str:
    """Return the model's timeline run (created once): every check's figures over time, step by step."""
    found = client.search_runs([experiment_id], f"tags.`{T_TIMELINE}` = '{model}'", max_results=1,
                               order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"timeline-{model}", tags={T_TIMELINE: model, T_MODEL: model})
    client.set_terminated(run.info.run_id)  # metrics can still be added; the UI shows it as finished
    return run.info.run_id


def _record(run) -> CheckRecord:
    t = run.data.tags
    return CheckRecord(run.info.run_id, t.get(T_VERDICT, "no_data"), t.get(T_WINDOW) or None,
                       t.get(T_HOLDS) == "true", t.get(T_EPISODE) or None, t.get(T_RETRAINING) or None,
                       t.get(T_DATA) or None, t.get(T_DATA_NOTE) or None)


def read_history(client: MlflowClient, experiment_id: str, model: str, version: str, n: int) -> list[CheckRecord]:
    """Return the latest checks of `model` while `version` was champion that had data (at most n), oldest first."""
    query = f"tags.`{T_MODEL}` = '{model}' and tags.`{T_VERSION}` = '{version}' and tags.`{T_VERDICT}` != 'no_data'"
    runs = client.search_runs([experiment_id], query, max_results=n, order_by=["attributes.start_time DESC"])
    return [_record(r) for r in reversed(runs)]


# --------------------------------------------------------------------------- the lock


@contextmanager
def monitor_lock(model: str, timeout_s: float) -> Iterator[None]:
    """Hold the model's monitoring decision slot: a Prefect global concurrency limit of 1.

    Checks that overlap (a scheduled run and a CLI run, a slow run and the next cron tick)
    read the history, decide and start retraining one after the other. A holder that dies
    loses its slot when its lease (5 min) runs out.
    """
    from tasks.registry import prefect_mutex

    with prefect_mutex(f"tuneloop-monitor-{_slug(model)}", timeout_s):
        yield


# --------------------------------------------------------------------------- data and the training run


def write_jsonl_atomic(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)  # the training run never reads half a file


def retraining_data(requests: Sequence[LoggedRequest], feedback: dict[str, float], min_score: float, min_rows: int,
                    fallback: Path | None, out: Path) -> tuple[str | None, str]:
    """Return (dataset path, what it is) for retraining on a drifted window.

    The window's answered requests whose feedback reaches `min_score` become examples (the
    logged answer as the response); with fewer than `min_rows` of them, the configured fresh
    dataset; with neither, no path.
    """
    rows = [{"prompt": r.prompt, "response": r.response} for r in requests
            if r.status < 400 and r.response and feedback.get(r.id, float("-inf")) >= min_score]
    if len(rows) >= min_rows:
        if not out.exists():  # a continuing episode keeps the file its run was given
            write_jsonl_atomic(rows, out)
        return str(out), f"{len(rows)} drifted requests with feedback >= {min_score}"
    few = f"{len(rows)} drifted requests with feedback >= {min_score}, {min_rows} needed"
    if fallback is not None:
        return str(fallback), f"monitor.retrain_data ({few})"
    return None, f"nothing to retrain on: {few}, and monitor.retrain_data is not set"


def start_retraining(deployment: str, parameters: dict, idempotency_key: str) -> str:
    """Create the training deployment's flow run once per key (Prefect returns the existing one after)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(deployment, parameters=parameters, timeout=0, idempotency_key=idempotency_key,
                             tags=["tuneloop:retrain"])
    except ObjectNotFound:
        raise RuntimeError(f"Deployment {deployment} is not registered with this Prefect API: "
                           "start the flow runner with `tuneloop up`") from None
    return str(run.id)


@dataclass
class Trigger:
    record_run_id: str  # this check's MLflow run
    timeline_run_id: str
    step: int  # this check's place on the timeline
    decision: Decision
    retraining_flow_run_id: str | None
    started_now: bool  # False: the episode's run existed already (or none was started)
    data: str | None
    data_note: str


@task(name="decide-and-start-retraining", cache_policy=NO_CACHE)
def decide_and_start_retraining(
    experiment: str, model: str, champion_version: str | None, drift: DriftResult, window: Window,
    feedback: dict[str, float], persistence: Persistence, training: dict, run_label: str,
) -> Trigger:
    """Record this check, decide whether drift holds, and start the episode's retraining once.

    `training`: deployment (name), config (the training config as JSON, whose data.path is
    replaced), data_dir, min_score, min_rows, fallback (monitor.retrain_data) and timeout_s.
    """
    client = MlflowClient()
    with monitor_lock(model, training["timeout_s"]):
        experiment_id = _experiment_id(client, experiment)
        timeline = timeline_run(client, experiment_id, model)
        step = int(client.get_run(timeline).data.tags.get(T_CHECKS, "0")) + 1
        history = (read_history(client, experiment_id, model, champion_version, persistence.n)
                   if champion_version else [])
        scope = f"{model}:v{champion_version}"
        decision = decide(history, drift.verdict, window.window_id, persistence, scope)

        data, note = None, ""
        previous = decision.previous
        if decision.holds and previous is not None and previous.data:
            data, note = previous.data, previous.data_note or ""  # the episode's run was given this
        elif decision.holds:
            out = Path(training["data_dir"]) / "retrain" / f"{_slug(decision.episode)}.jsonl"
            fallback = Path(training["fallback"]) if training.get("fallback") else None
            data, note = retraining_data(window.requests, feedback, training["min_score"], training["min_rows"],
                                         fallback, out)
        tags = {T_MODEL: model, T_VERSION: champion_version or "", T_VERDICT: drift.verdict,
                T_WINDOW: window.window_id or "", T_HOLDS: str(decision.holds).lower(),
                T_EPISODE: decision.episode or "", "mlflow.parentRunId": timeline, "tuneloop.run": run_label}
        if decision.holds:
            tags.update({T_DATA: data or "", T_DATA_NOTE: note})
            if data:
                tags[T_RETRAINING] = previous.retraining if previous and previous.retraining else PENDING
        record = client.create_run(experiment_id, run_name=f"check-{drift.verdict}", tags=tags).info.run_id
        client.set_tag(timeline, T_CHECKS, str(step))  # steps number the checks: the timeline's x-axis

        run_id, started = None, False
        if decision.holds and data:
            if previous is not None and previous.retraining not in (None, PENDING):
                run_id = previous.retraining
            else:
                config = json.loads(json.dumps(training["config"]))
                config["data"]["path"] = data
                if "drifted requests with feedback" in note and not note.startswith("monitor."):
                    config["data"].update(prompt_field="prompt", response_field="response")
                trigger = (f"drift episode {decision.episode} ({drift.reason[:300]}; "
                           f"monitoring run {run_label}; data: {note})")
                run_id = existing_run(decision.episode)  # a check that died after creating it
                started = run_id is None
                run_id = start_retraining(training["deployment"], {"config": config, "trigger": trigger},
                                          idempotency_key=decision.episode)
            client.set_tag(record, T_RETRAINING, run_id)
    return Trigger(record, timeline, step, decision, run_id, started, data, note)


def existing_run(idempotency_key: str) -> str | None:
    """Return the id of the flow run created under `idempotency_key`, if there is one."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            idempotency_key=FlowRunFilterIdempotencyKey(any_=[idempotency_key])), limit=1)
    return str(runs[0].id) if runs else None


@task(name="wait-for-retraining")
def wait_for_retraining(flow_run_id: str, timeout_s: int) -> str:
    """Wait until the retraining flow run reaches a final state; return the state's name."""
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
