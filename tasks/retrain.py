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
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.drift import DriftResult, LoggedRequest, Verdict, Window
from tuneloop.config import MonitorConfig, Persistence, TeacherConfig, TuneloopConfig, slice_from_path
from tuneloop.seams import RetrainingData, RetrainRequest

if TYPE_CHECKING:
    from tasks.registry import ModelVersionRef

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


def decide(
    history: Sequence[CheckRecord], verdict: Verdict, window_id: str | None, persistence: Persistence, scope: str
) -> Decision:
    """Return whether drift holds after this window, and the episode it belongs to.

    `history`: earlier checks of the same model and champion, oldest first. Checks without
    data are not windows: they neither count nor break a streak. The episode continues the
    previous check's when that one held; else it is named after the first drifted window
    among the last n (`scope` makes names unique across models and champion versions).
    """
    evidence = [r for r in history if r.verdict != "no_data"]
    if verdict == "no_data":
        return Decision(False, None, 0, 0, None)
    recent = [*((r.verdict, r.window_id) for r in evidence), (verdict, window_id)][-persistence.n :]
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
    found = client.search_runs(
        [experiment_id], f"tags.`{T_TIMELINE}` = '{model}'", max_results=1, order_by=["attributes.start_time ASC"]
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"timeline-{model}", tags={T_TIMELINE: model, T_MODEL: model})
    client.set_terminated(run.info.run_id)  # metrics can still be added; the UI shows it as finished
    return run.info.run_id


def _record(run) -> CheckRecord:
    t = run.data.tags
    return CheckRecord(
        run.info.run_id,
        t.get(T_VERDICT, "no_data"),
        t.get(T_WINDOW) or None,
        t.get(T_HOLDS) == "true",
        t.get(T_EPISODE) or None,
        t.get(T_RETRAINING) or None,
        t.get(T_DATA) or None,
        t.get(T_DATA_NOTE) or None,
    )


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


def _chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def approved_rows(requests: Sequence[LoggedRequest], feedback: dict[str, float], min_score: float) -> list[dict]:
    """Drifted requests whose answer a person approved (mean feedback at least `min_score`).

    Unrated answers are never training data: that would teach the model its own output.
    """
    return [
        _chat(r.prompt, r.response)
        for r in requests
        if r.status < 400 and r.response and feedback.get(r.id, float("-inf")) >= min_score
    ]


def teacher_rows(prompts: Sequence[str], teacher: TeacherConfig, models_dir: Path) -> tuple[list[dict], int]:
    """The teacher's answers to `prompts` (each prompt once); return them and how many it failed on."""
    from tasks.llm import open_backend

    backend = open_backend(teacher, models_dir, "monitor.teacher", role="Teacher")
    unique = list(dict.fromkeys(p for p in prompts if p.strip()))
    answers = backend.complete(unique, system=teacher.system_prompt)
    rows = [_chat(p, a.strip()) for p, a in zip(unique, answers) if isinstance(a, str) and a.strip()]
    return rows, len(unique) - len(rows)


def labelled_rows(path: Path) -> list[dict]:
    """The conversations of a labelled dataset for the new domain (any form tasks.data reads)."""
    from tasks.data import MESSAGES, read_dataset
    from tuneloop.config import DataConfig

    frame = read_dataset(str(path), DataConfig(path=str(path))).frame
    return [{"messages": m} for m in frame[MESSAGES] if m]


def replay_rows(champion: ModelVersionRef | None, new_rows: int, share: float, seed: str, cache: Path) -> list[dict]:
    """A seeded sample of the champion's own training conversations, `share` of the retraining set."""
    import random

    from tasks.registry import training_rows

    if champion is None or share <= 0 or not new_rows:
        return []
    earlier = training_rows.fn(champion, cache)
    want = min(len(earlier), round(new_rows * share / (1 - share)))
    return [{"messages": m} for m in random.Random(seed).sample(earlier, want)]


def retraining_data(
    requests: Sequence[LoggedRequest],
    feedback: dict[str, float],
    m: MonitorConfig,
    champion: ModelVersionRef | None,
    out: Path,
    models_dir: Path,
) -> tuple[RetrainingData | None, str]:
    """Return the data to retrain on for a drifted window (or None), and what it is in words.

    Each source of `monitor.retrain_sources` adds what it has: approved answers to drifted
    requests, the teacher's answers to the drifted prompts that have none, the labelled set. With
    fewer than `monitor.retrain_min_rows` rows from all of them, nothing is retrained. The
    champion's own training rows are mixed in (`monitor.replay_share`, training only).
    """
    answered = [r for r in requests if r.status < 400]
    rows: dict[str, list[dict]] = {}
    notes: list[str] = []
    if "feedback" in m.retrain_sources:
        rows["feedback"] = approved_rows(answered, feedback, m.retrain_min_feedback)
        notes.append(f"{len(rows['feedback'])} drifted requests with feedback >= {m.retrain_min_feedback}")
    if "teacher" in m.retrain_sources and m.teacher is not None:
        covered = {row["messages"][0]["content"] for row in rows.get("feedback", [])}
        rows["teacher"], failed = teacher_rows(
            [r.prompt for r in answered if r.prompt not in covered], m.teacher, models_dir
        )
        notes.append(
            f"{len(rows['teacher'])} teacher answers ({m.teacher.model}"
            + (f", {failed} prompts failed)" if failed else ")")
        )
    if "labelled" in m.retrain_sources and m.retrain_data is not None:
        rows["labelled"] = labelled_rows(m.retrain_data)
        notes.append(f"{len(rows['labelled'])} labelled rows of {m.retrain_data}")
    new = [row for part in rows.values() for row in part]
    if len(new) < m.retrain_min_rows:
        missing = [s for s in m.retrain_sources if s not in rows]
        return None, (
            f"nothing to retrain on: {'; '.join(notes) or 'no source'} — {m.retrain_min_rows} rows needed"
            + (f" ({', '.join(missing)}: not configured)" if missing else "")
        )
    name = (
        slice_from_path(str(m.retrain_data))
        if set(rows) == {"labelled"} or (rows.get("labelled") and len(rows["labelled"]) == len(new))
        else f"drift_{_slug(out.stem)[-8:].lower()}"
    )
    replay = replay_rows(champion, len(new), m.replay_share, out.stem, out.parent / "replay-source")
    if not out.exists():  # a continuing episode keeps the files its run was given
        write_jsonl_atomic(new, out)
        if replay:
            write_jsonl_atomic(replay, out.with_suffix(".replay.jsonl"))
    if replay:
        notes.append(f"{len(replay)} replayed rows of champion v{champion.version}")
    elif champion is not None and m.replay_share > 0:
        notes.append(f"nothing replayed: champion v{champion.version} recorded no training rows")
    note = "; ".join(notes)
    return RetrainingData(
        path=str(out),
        slice=_slice_name(name),
        sources={k: len(v) for k, v in rows.items() if v},
        replay_path=str(out.with_suffix(".replay.jsonl")) if replay else None,
        replay_rows=len(replay),
        note=note,
    ), note


def _slice_name(name: str) -> str:
    clean = re.sub(r"[^a-z0-9_]", "_", name.lower()).strip("_")
    return clean if clean and clean[0].isalpha() else f"drift_{clean}"[:40]


def start_retraining(deployment: str, request: RetrainRequest, config: TuneloopConfig) -> str:
    """Create the training deployment's flow run once per episode (Prefect returns the existing one after)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    parameters = {"config": request.training_config(config).model_dump(mode="json"), "trigger": request.trigger()}
    try:
        run = run_deployment(
            deployment, parameters=parameters, timeout=0, idempotency_key=request.episode, tags=["tuneloop:retrain"]
        )
    except ObjectNotFound:
        raise RuntimeError(
            f"Deployment {deployment} is not registered with this Prefect API: start the flow runner with `tuneloop up`"
        ) from None
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

    def retraining(self) -> str:
        """What happened about retraining, in words."""
        if self.retraining_flow_run_id:
            return f"{'started' if self.started_now else 'already started'} flow run {self.retraining_flow_run_id}"
        return f"not started: {self.data_note}" if self.decision.holds else "not needed"


@dataclass(frozen=True)
class RetrainingTarget:
    """Where retraining goes: the training deployment, the config it trains with, the files' folders."""

    deployment: str
    config: TuneloopConfig
    data_dir: Path  # StatePaths.retraining_data: one file per drift episode
    models_dir: Path


@task(name="decide-and-start-retraining", cache_policy=NO_CACHE)
def decide_and_start_retraining(
    experiment: str,
    model: str,
    champion: ModelVersionRef | None,
    drift: DriftResult,
    window: Window,
    feedback: dict[str, float],
    m: MonitorConfig,
    target: RetrainingTarget,
    run_label: str,
) -> Trigger:
    """Record this check, decide whether drift holds, and start the episode's retraining once."""
    client = MlflowClient()
    version = champion.version if champion else None
    with monitor_lock(model, m.lock_timeout_s):
        experiment_id = _experiment_id(client, experiment)
        timeline = timeline_run(client, experiment_id, model)
        step = int(client.get_run(timeline).data.tags.get(T_CHECKS, "0")) + 1
        history = read_history(client, experiment_id, model, version, m.persistence.n) if version else []
        decision = decide(history, drift.verdict, window.window_id, m.persistence, f"{model}:v{version}")

        data: RetrainingData | None = None
        note = ""
        previous = decision.previous
        if decision.holds and previous is not None and previous.data:
            data = RetrainingData.model_validate_json(previous.data)  # the episode's run was given this
            note = data.note
        elif decision.holds:
            out = target.data_dir / f"{_slug(decision.episode)}.jsonl"
            data, note = retraining_data(window.requests, feedback, m, champion, out, target.models_dir)
        tags = {
            T_MODEL: model,
            T_VERSION: version or "",
            T_VERDICT: drift.verdict,
            T_WINDOW: window.window_id or "",
            T_HOLDS: str(decision.holds).lower(),
            T_EPISODE: decision.episode or "",
            "mlflow.parentRunId": timeline,
            "tuneloop.run": run_label,
        }
        if decision.holds:
            tags.update({T_DATA: data.model_dump_json() if data else "", T_DATA_NOTE: note[:5000]})
            if data:
                tags[T_RETRAINING] = previous.retraining if previous and previous.retraining else PENDING
        record = client.create_run(experiment_id, run_name=f"check-{drift.verdict}", tags=tags).info.run_id
        client.set_tag(timeline, T_CHECKS, str(step))  # steps number the checks: the timeline's x-axis

        run_id, started = None, False
        if decision.holds and data:
            if previous is not None and previous.retraining not in (None, PENDING):
                run_id = previous.retraining
            else:
                request = RetrainRequest(
                    episode=decision.episode, reason=drift.reason, monitoring_run=run_label, data=data
                )
                run_id = existing_run(decision.episode)  # a check that died after creating it
                started = run_id is None
                run_id = start_retraining(target.deployment, request, target.config)
            client.set_tag(record, T_RETRAINING, run_id)
    return Trigger(record, timeline, step, decision, run_id, started, data.path if data else None, note)


def existing_run(idempotency_key: str) -> str | None:
    """Return the id of the flow run created under `idempotency_key`, if there is one."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[idempotency_key])), limit=1
        )
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
                raise TimeoutError(
                    f"Retraining flow run {flow_run_id} still {state.name if state else 'pending'} after {timeout_s} s"
                )
            time.sleep(3)
