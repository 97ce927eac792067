"""Evaluation slices: every training's held-out set, named and versioned, kept in MLflow.

    sl = register_slice("trivia", split.eval, "data/trivia.jsonl", cfg.registry)   # trivia@1 (or the
                                                                                    # version of the same rows)
    load_slices(["trivia@1", "medication"], cfg.registry)                          # by version, or the newest

A slice version is one MLflow run in the `registry.slices_experiment` experiment: its rows as the
artifact `slice.jsonl` (tasks.data's internal form: each conversation, answer included), the
slice as the run's input dataset (`mlflow.data`, named `<name>@<version>`, with the rows'
digest: the MLflow UI shows it on the run, and on every evaluation run that used it), and tags
naming it. The same rows registered again are the same version; other rows under the same name
are the next version. Each version is also an MLflow GenAI evaluation dataset `<name>@<version>`
(inputs: the conversation, expectations: the answer), shown in the experiment's Datasets tab;
MLflow keeps those without versions and lets their records change, so the run's artifact is
what evaluation reads, checked against the digest it was registered with. A registered version
lists its slices in the tag `tuneloop.slices` (`trivia@1,medication@1`): the slices every later
version of its lineage is evaluated on.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from mlflow import MlflowClient
from prefect import task

from tasks.data import MESSAGES, SplitDataset, frame_digest
from tasks.evaluate import EvalSlice
from tuneloop.config import RegistryConfig, TuneloopConfig

if TYPE_CHECKING:
    from tasks.registry import ModelVersionRef

log = logging.getLogger(__name__)

T_SLICE, T_VERSION, T_DIGEST, T_SOURCE, T_ROWS = (
    "tuneloop.slice",
    "tuneloop.slice_version",
    "tuneloop.slice_digest",
    "tuneloop.slice_source",
    "tuneloop.slice_rows",
)
VERSION_TAG = "tuneloop.slices"  # on a model version: the slices of its lineage, name@version, comma-separated
ROWS_FILE = "slice.jsonl"
_REF = re.compile(r"^([a-z][a-z0-9_]*)(?:@(\d+))?$")


class SliceError(ValueError):
    """A slice that is not registered, or a name that is not a slice's."""


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`trivia@2` → ("trivia", 2); `trivia` → ("trivia", None): the newest."""
    match = _REF.match(ref.strip())
    if not match:
        raise SliceError(f"{ref!r} is not a slice: write name or name@version, e.g. trivia@1")
    return match.group(1), int(match.group(2)) if match.group(2) else None


def lineage_refs(version_tags: dict[str, str] | None) -> list[str]:
    """The slices a registered version was evaluated on (its `tuneloop.slices` tag)."""
    value = (version_tags or {}).get(VERSION_TAG, "")
    return [part for part in value.split(",") if part.strip()]


def _experiment_id(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another run
        return client.get_experiment_by_name(name).experiment_id


def _versions(client: MlflowClient, experiment_id: str, name: str) -> list:
    runs = client.search_runs(
        [experiment_id], f"tags.`{T_SLICE}` = '{name}' and attributes.status = 'FINISHED'", max_results=1000
    )
    return sorted(runs, key=lambda r: int(r.data.tags.get(T_VERSION, "0")))


def _read_rows(client: MlflowClient, run) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, ROWS_FILE, tmp)
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    frame = pd.DataFrame(
        {MESSAGES: [r["messages"] for r in records]}, index=pd.Index([r["row"] for r in records], name="row")
    )
    return frame


def _as_slice(client: MlflowClient, run) -> EvalSlice:
    t = run.data.tags
    rows = _read_rows(client, run)
    ref = f"{t[T_SLICE]}@{t[T_VERSION]}"
    if frame_digest(rows) != t[T_DIGEST]:
        raise SliceError(
            f"Evaluation slice {ref}: its rows (run {run.info.run_id}, {ROWS_FILE}) no longer have the "
            f"digest it was registered with ({t[T_DIGEST]}): it was changed; register the rows anew"
        )
    return EvalSlice(t[T_SLICE], int(t[T_VERSION]), t[T_DIGEST], rows, t.get(T_SOURCE, ""))


def _mirror_as_genai_dataset(experiment_id: str, ref: str, rows: pd.DataFrame, digest: str) -> None:
    """Show the slice in the experiment's Datasets tab as an MLflow GenAI evaluation dataset."""
    from mlflow.genai.datasets import create_dataset

    from tasks.evaluate import conversation_rows

    asked = conversation_rows(rows)
    records = [
        {"inputs": {"messages": m}, "expectations": {"expected_response": r}, "tags": {"row": str(i)}}
        for i, m, r in zip(asked.index, asked["messages"], asked["reference"])
    ]
    dataset = create_dataset(
        name=ref,
        experiment_id=experiment_id,
        tags={
            T_SLICE: ref.split("@")[0],
            T_DIGEST: digest,
            "tuneloop.note": f"a copy for the UI; evaluation reads the artifact {ROWS_FILE} of run {ref}",
        },
    )
    dataset.merge_records(records)


@task(name="register-slice", retries=2, retry_delay_seconds=2)
def register_slice(name: str, rows: pd.DataFrame, source: str, cfg: RegistryConfig) -> EvalSlice:
    """Return the slice `name` holding exactly `rows`: the registered version with the same digest,
    or a new version (the next number)."""
    import mlflow

    from tasks.registry import registry_lock

    client = MlflowClient()
    digest = frame_digest(rows)
    experiment = _experiment_id(client, cfg.slices_experiment)
    with registry_lock(mlflow.get_tracking_uri(), f"slice-{name}"):  # two trainings never take one number
        versions = _versions(client, experiment, name)
        same = next((r for r in versions if r.data.tags.get(T_DIGEST) == digest), None)
        if same is not None:
            return EvalSlice(name, int(same.data.tags[T_VERSION]), digest, rows, same.data.tags.get(T_SOURCE, ""))
        number = int(versions[-1].data.tags[T_VERSION]) + 1 if versions else 1
        ref = f"{name}@{number}"
        run = client.create_run(
            experiment,
            run_name=ref,
            tags={
                T_SLICE: name,
                T_VERSION: str(number),
                T_DIGEST: digest,
                T_SOURCE: source[:5000],
                T_ROWS: str(len(rows)),
            },
        )
        run_id = run.info.run_id
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / ROWS_FILE
                path.write_text(
                    "".join(
                        json.dumps({"row": int(i), "messages": m}, ensure_ascii=False) + "\n"
                        for i, m in zip(rows.index, rows[MESSAGES])
                    )
                )
                client.log_artifact(run_id, str(path))
            _log_input(client, run_id, rows, source, ref, digest)
            _mirror_as_genai_dataset(experiment, ref, rows, digest)
        except Exception:
            client.set_terminated(run_id, status="FAILED")  # never found: not FINISHED
            raise
        client.set_terminated(run_id)
    log.info("Registered evaluation slice %s (%d rows, digest %s)", ref, len(rows), digest)
    return EvalSlice(name, number, digest, rows, source)


def _log_input(client: MlflowClient, run_id: str, rows: pd.DataFrame, source: str, ref: str, digest: str) -> None:
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # MLflow registers its local-file source class twice and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_pandas(
            pd.DataFrame({MESSAGES: [json.dumps(m) for m in rows[MESSAGES]]}), source=source, name=ref, digest=digest
        )
    client.log_inputs(
        run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")])]
    )


@task(name="load-slices", retries=2, retry_delay_seconds=2)
def load_slices(refs: list[str], cfg: RegistryConfig) -> list[EvalSlice]:
    """Return the registered slices `refs` (name@version, or name: the newest); raise SliceError naming
    any that is not registered."""
    client = MlflowClient()
    experiment = _experiment_id(client, cfg.slices_experiment)
    out = []
    for ref in refs:
        name, number = parse_ref(ref)
        versions = _versions(client, experiment, name)
        if number is not None:
            versions = [r for r in versions if r.data.tags.get(T_VERSION) == str(number)]
        if not versions:
            known = sorted({r.data.tags.get(T_SLICE) for r in client.search_runs([experiment], max_results=1000)})
            raise SliceError(
                f"Evaluation slice {ref} is not registered (registered: {', '.join(known) or 'none'}); "
                "it is registered by the training whose held-out set it is"
            )
        out.append(_as_slice(client, versions[-1]))
    return out


def link_slices(run_id: str, slices: list[EvalSlice]) -> None:
    """Record on an evaluation run which slices (name@version and digest) it was evaluated on."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = MlflowClient()
    inputs = []
    for sl in slices:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            import mlflow

            dataset = mlflow.data.from_pandas(
                pd.DataFrame({MESSAGES: [json.dumps(m) for m in sl.rows[MESSAGES]]}),
                source=sl.source or sl.ref,
                name=sl.ref,
                digest=sl.digest,
            )
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")]))
    client.log_inputs(run_id, datasets=inputs)


@dataclass
class Slices:
    """What a training evaluates on: its own held-out slice and every slice of its lineage."""

    new: EvalSlice
    all: list[EvalSlice]  # the new one first

    def refs(self) -> list[str]:
        return [s.ref for s in self.all]


@task(name="collect-slices", retries=2, retry_delay_seconds=2)
def collect_slices(cfg: TuneloopConfig, split: SplitDataset, champion: ModelVersionRef | None) -> Slices:
    """Register the data's held-out rows as its slice and gather the slices to evaluate on: that one, the
    champion's lineage (its `tuneloop.slices`) and `eval.slices`. A name holds once: the data's own
    rows win over an older version of the same slice."""
    from tasks.registry import version_tags

    name = cfg.data.slice_name() or "data"
    own = register_slice.fn(name, split.eval, split.eval_source or split.source, cfg.registry)
    wanted = [*lineage_refs(version_tags.fn(champion) if champion else None), *cfg.eval.slices]
    refs = list(dict.fromkeys(ref for ref in wanted if parse_ref(ref)[0] != name))
    others = load_slices.fn(refs, cfg.registry) if refs else []
    by_name = {s.name: s for s in others}  # the newest mention of a name wins (eval.slices: the newest version)
    return Slices(own, [own, *by_name.values()])
