"""Registry stage: MLflow runs, model versions with lineage, and aliases.

Aliases: a version that passes the gate becomes `challenger` (set_challenger); only the
promotion flow, after a deploy and a smoke test, moves `champion` (promote_champion).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from prefect import task

from tasks.data import MESSAGES, PROMPT, RESPONSE, SplitDataset, frame_digest
from tasks.validation import DatasetReport
from tuneloop.config import REPO_ROOT, RegistryConfig
from tuneloop.models import BaseRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str
    run_id: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def code_version() -> str:
    """Return the git commit of the running code, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


TRAINING_KEY_TAG = "tuneloop.training_key"  # what names one training across restarts (tasks.finetune)
FLOW_RUN_TAG = "tuneloop.flow_run_id"


def find_training_run(key: str, experiment: str, tracking_uri: str | None = None) -> Run | None:
    """Return the newest MLflow run of the training named `key` in `experiment` (a name), or None."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{TRAINING_KEY_TAG}` = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if found else []
    return runs[0] if runs else None


@task(name="start-mlflow-run", retries=2, retry_delay_seconds=2)
def start_training_run(
    cfg: RegistryConfig, run_name: str, params: dict[str, object], key: str,
    tags: dict[str, str] | None = None,
) -> str:
    """Return the MLflow run of the training named `key`: its unfinished run, or a new one.

    The run stays RUNNING until its version is registered (FINISHED) or the flow fails
    (FAILED, KILLED). A flow run restarted after a crash or failure (same `key`) resumes that
    run, so its metrics continue where the checkpoint left off and lineage names one run. A
    FINISHED run is a closed record: a new run starts.
    """
    from prefect.runtime import flow_run

    client = MlflowClient()
    experiment = mlflow.set_experiment(cfg.experiment).experiment_id
    all_tags = {"tuneloop.code_version": code_version(), TRAINING_KEY_TAG: key,
                **({FLOW_RUN_TAG: flow_run.id} if flow_run.id else {}), **(tags or {})}
    previous = find_training_run(key, cfg.experiment)
    if previous is not None and previous.info.status != "FINISHED":
        run_id = previous.info.run_id
        log.info("Resuming MLflow run %s (%s) of training %s", run_id, previous.info.status, key)
        client.update_run(run_id, status="RUNNING")
        if "tuneloop.failure" in previous.data.tags:  # the reason the last attempt ended
            client.delete_tag(run_id, "tuneloop.failure")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
        params = {k: v for k, v in params.items() if k not in previous.data.params}  # params never change
    else:
        from mlflow.tracking.context.registry import resolve_tags

        # The client, not `mlflow.start_run`: the run outlives this task. The context tags
        # (user, source, git commit) are those `mlflow.start_run` would set.
        run_id = client.create_run(experiment, run_name=run_name, tags=resolve_tags(all_tags)).info.run_id
    entries = [Param(k, str(v)) for k, v in params.items()]
    for lo in range(0, len(entries), 100):  # MLflow's limit of params per batch call
        client.log_batch(run_id, params=entries[lo:lo + 100])
    return run_id


def end_unfinished_run(key: str, experiment: str, status: str, reason: str, tracking_uri: str | None = None) -> None:
    """End the RUNNING MLflow run of training `key` with `status` (FAILED, KILLED) and the reason."""
    run = find_training_run(key, experiment, tracking_uri)
    if run is None or run.info.status != "RUNNING":  # none, or already ended with its own reason
        return
    client = MlflowClient(tracking_uri)
    client.set_tag(run.info.run_id, "tuneloop.failure", reason[:5000])
    client.set_terminated(run.info.run_id, status=status)


@task(name="find-champion", retries=2, retry_delay_seconds=2)
def find_champion(cfg: RegistryConfig) -> ModelVersionRef | None:
    """Return the version that holds the champion alias, or None."""
    return find_alias.fn(cfg.model_name, cfg.champion_alias)


@task(name="find-alias", retries=2, retry_delay_seconds=2)
def find_alias(model_name: str, alias: str) -> ModelVersionRef | None:
    """Return the version that holds `alias`, or None."""
    try:
        mv = MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    return ModelVersionRef(mv.name, str(mv.version), mv.run_id)


@task(name="download-model-version", retries=2, retry_delay_seconds=2)
def download_version(ref: ModelVersionRef, dst: Path) -> Path:
    """Download a registered version and return its model artifact folder (adapter or full weights)."""
    return fetch_adapter(ref.uri, dst)


def fetch_adapter(model_uri: str, dst: Path) -> Path:
    from tuneloop.models import find_artifact_dir

    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    return find_artifact_dir(Path(local))


INPUT_EXAMPLE = pd.DataFrame({"prompt": ["What is the capital of France?"]})


@task(name="register-model-version")
def register_adapter(
    cfg: RegistryConfig, run_id: str, artifact_dir: Path, metrics: dict[str, float],
    lineage: dict[str, str], reference_prompts: list[str],
) -> ModelVersionRef:
    """Log the artifact as an MLflow pyfunc model in `run_id`, register it as a new version, end the run.

    The artifact is a LoRA adapter with its base reference, or all the weights of a full
    fine-tune; both go the same way (tuneloop.pyfunc loads either, as serving does). The
    version is created with all its tags in one call (lineage, code version, eval metrics):
    a concurrent reader never sees it half-described.
    """
    from mlflow.models import infer_signature

    import tuneloop.pyfunc
    from tuneloop.models import ARTIFACT_FORMATS, artifact_kind

    kind = artifact_kind(artifact_dir)
    signature = infer_signature(INPUT_EXAMPLE, ["Paris"], params={"max_new_tokens": 32})
    # Resume the run in its own experiment, whatever experiment this process used last.
    mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):  # ends FINISHED: the training's record is complete
        mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        # The gate's verdict also on the run, where the experiment's run table shows it.
        mlflow.set_tags({k: v[:5000] for k, v in lineage.items() if k.startswith("tuneloop.gate")})
        mlflow.log_text("\n".join(json.dumps(p) for p in reference_prompts), "reference/prompts.jsonl")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=tuneloop.pyfunc.__file__,
            artifacts={"adapter" if kind == "adapter" else "model": str(artifact_dir)},
            signature=signature, registered_model_name=None,
            # Stored with the version (the UI shows it; serving clients copy it). MLflow also
            # loads the logged model and answers it once (a warning if that fails): 2 tokens.
            input_example=(INPUT_EXAMPLE, {"max_new_tokens": 2}),
            pip_requirements=["tuneloop", "torch", "transformers", *(["peft"] if kind == "adapter" else [])],
            metadata={"tuneloop_format": ARTIFACT_FORMATS[kind], **lineage},
        )
    tags = {**lineage, "tuneloop.artifact": kind, "tuneloop.code_version": code_version(),
            **{f"eval.{k}": f"{v:.6g}" for k, v in metrics.items()}}
    mv = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
    log.info("Registered %s version %s (%s)", cfg.model_name, mv.version, kind)
    return ModelVersionRef(cfg.model_name, str(mv.version), run_id)


@contextmanager
def registry_lock(tracking_uri: str, model_name: str, timeout_s: float = 120) -> Iterator[None]:
    """Hold the lock of `model_name`'s aliases: read them, decide, and write them under it.

    MLflow writes an alias unconditionally (last writer wins) and offers no compare-and-set,
    so "keep the newer challenger" or "drop the challenger that just became champion" would
    race with another flow doing the same between the read and the write; on SQLite even two
    plain alias writes at once can fail on a UNIQUE constraint (tests/test_registry.py).
    Version numbers and tags need no lock (the store numbers versions in a transaction and
    retries; tags are written with the version). With the embedded SQLite store every flow
    runs on this machine: a
    file lock beside the database. With a tracking server, flows run on many machines that
    share one Prefect API: a Prefect global concurrency limit of 1 slot per model name.
    """
    slug = re.sub(r"[^A-Za-z0-9-]", "-", model_name)
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("sqlite", "file", ""):
        from filelock import FileLock

        local = Path(tracking_uri.removeprefix("sqlite:///") if parsed.scheme == "sqlite" else parsed.path)
        lock_dir = (local.parent if parsed.scheme == "sqlite" else local) / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(lock_dir / f"registry-{slug}.lock", timeout=timeout_s):
            yield
        return
    with prefect_mutex(f"tuneloop-registry-{slug}", timeout_s):
        yield


@contextmanager
def prefect_mutex(name: str, timeout_s: float) -> Iterator[None]:
    """Hold the one slot of the Prefect global concurrency limit `name`, created on first use."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another flow created it first
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@task(name="set-challenger-alias", retries=2, retry_delay_seconds=2)
def set_challenger(ref: ModelVersionRef, cfg: RegistryConfig, reason: str) -> bool:
    """Give a version that passed the gate the challenger alias, unless a newer version holds it.

    Return whether this version now holds it; either way the version's tag says why.
    """
    client = MlflowClient()
    with registry_lock(mlflow.get_tracking_uri(), ref.name):
        current = _alias_version(client, ref.name, cfg.challenger_alias)
        if current is not None and int(current) > int(ref.version):
            note = f"passed the gate, but v{current}, a newer version that also passed, is {cfg.challenger_alias}"
            client.set_model_version_tag(ref.name, ref.version, "tuneloop.alias_reason", note)
            log.warning("Version %s: %s", ref.version, note)
            return False
        client.set_registered_model_alias(ref.name, cfg.challenger_alias, ref.version)
        client.set_model_version_tag(ref.name, ref.version, "tuneloop.alias_reason",
                                     f"{cfg.challenger_alias}: {reason}")
    return True


@task(name="move-champion-alias", retries=2, retry_delay_seconds=2)
def promote_champion(ref: ModelVersionRef, cfg: RegistryConfig, reason: str) -> str | None:
    """Point the champion alias at a version that now serves; return the version that held it.

    The challenger alias is dropped when it pointed at this version (it no longer
    challenges; it serves), and kept when another version took it meanwhile.
    """
    client = MlflowClient()
    with registry_lock(mlflow.get_tracking_uri(), ref.name):
        previous = _alias_version(client, ref.name, cfg.champion_alias)
        client.set_registered_model_alias(ref.name, cfg.champion_alias, ref.version)
        if _alias_version(client, ref.name, cfg.challenger_alias) == ref.version:
            client.delete_registered_model_alias(ref.name, cfg.challenger_alias)
        client.set_model_version_tag(ref.name, ref.version, f"tuneloop.{cfg.champion_alias}_reason", reason)
    return previous


@task(name="read-version-tags", retries=2, retry_delay_seconds=2)
def version_tags(ref: ModelVersionRef) -> dict[str, str] | None:
    """Return the tags of a registered version, or None if there is no such version."""
    try:
        return dict(MlflowClient().get_model_version(ref.name, ref.version).tags)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


@task(name="tag-model-version", retries=2, retry_delay_seconds=2)
def tag_version(ref: ModelVersionRef, tags: dict[str, str]) -> None:
    """Set tags on a model version."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(ref.name, ref.version, key, value)


@task(name="read-reference-prompts", retries=2, retry_delay_seconds=2)
def reference_prompts(ref: ModelVersionRef, dst: Path) -> list[str]:
    """Return the training prompts recorded with a version's training run."""
    path = mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path="reference/prompts.jsonl",
                                               dst_path=str(dst))
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@task(name="log-run-artifact", retries=2, retry_delay_seconds=2)
def log_run_artifact(run_id: str, path: Path) -> None:
    """Attach a file (a report) to an MLflow run."""
    MlflowClient().log_artifact(run_id, str(path))


@task(name="log-dataset-inputs", retries=2, retry_delay_seconds=2)
def log_dataset_inputs(run_id: str, data: SplitDataset) -> None:
    """Log both splits as the run's inputs (`mlflow.data`: source, digest, schema).

    The digest is tuneloop's content hash of each split, so the same data shows the same
    digest in the MLflow UI in every run, whatever its size (MLflow's own hashes 10k rows).
    """
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for context, frame, source in (("training", data.train, data.source),
                                   ("evaluation", data.eval, data.eval_source or data.source)):
        table = frame[[PROMPT, RESPONSE]].copy()
        table[MESSAGES] = [json.dumps(m) for m in frame[MESSAGES]]
        with warnings.catch_warnings():  # MLflow registers its local-file source class twice and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(table, source=source, name=Path(source).name,
                                              digest=frame_digest(frame))
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    # The client, not `mlflow.start_run`: leaving that block would end the run as FINISHED.
    MlflowClient().log_inputs(run_id, datasets=inputs)


@task(name="log-validation-report", retries=2, retry_delay_seconds=2)
def log_validation_report(run_id: str, report: DatasetReport) -> None:
    """Attach the dataset report (and its Data Docs) to the run, with its figures as metrics."""
    client = MlflowClient()
    client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0)
                                      for k, v in report.metrics().items()],
                     tags=[RunTag("tuneloop.validation", "passed" if report.success else "failed"),
                           RunTag("tuneloop.dataset_digest", report.digest)])
    if report.html:
        client.log_artifact(run_id, report.html, "validation")
    if report.data_docs:
        client.log_artifacts(run_id, str(Path(report.data_docs).parent), "validation/data-docs")


@task(name="fail-mlflow-run", retries=2, retry_delay_seconds=2)
def fail_run(run_id: str, reason: str) -> None:
    """End a run as FAILED with the reason as a tag: it trained nothing."""
    client = MlflowClient()
    client.set_tag(run_id, "tuneloop.failure", reason[:5000])
    client.set_terminated(run_id, status="FAILED")
@task(name="log-eval-examples", retries=2, retry_delay_seconds=2)
def log_eval_examples(run_id: str, examples: list[dict], name: str) -> None:
    """Attach per-example answers (and judge verdicts) to a run as an MLflow table `eval/<name>.json`."""
    frame = pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in e.items()} for e in examples])
    MlflowClient().log_table(run_id, frame, f"eval/{name}.json")


@task(name="start-selection-run", retries=2, retry_delay_seconds=2)
def start_selection_run(cfg: RegistryConfig, eval_set: pd.DataFrame, source: str, params: dict[str, object]) -> str:
    """Create the parent MLflow run of one model comparison, with the evaluation set as its input."""
    mlflow.set_experiment(cfg.selection_experiment)
    with mlflow.start_run(run_name=f"select-{Path(source).stem}",
                          tags={"tuneloop.code_version": code_version()}) as run:
        mlflow.log_params(params)
        mlflow.log_input(mlflow.data.from_pandas(eval_set, source=source, name=Path(source).name),
                         context="evaluation")
    return run.info.run_id


@task(name="log-model-evaluation", retries=2, retry_delay_seconds=2)
def log_model_evaluation(parent_run_id: str, model: str, base: BaseRef, metrics: dict[str, float],
                         examples: list[dict], params: dict[str, str]) -> str:
    """Record one model's evaluation as a child run of the comparison; return its run id."""
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(experiment, tags={
        MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: Path(model).name or model,
        "tuneloop.model": model, "tuneloop.base_sha256": base.sha256, "tuneloop.code_version": code_version(),
    })
    now = int(time.time() * 1000)
    values = {"model": model, "base_location": base.location, "base_revision": base.revision or "", **params}
    client.log_batch(run.info.run_id, metrics=[Metric(f"eval/{k}", v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in values.items()])
    log_eval_examples.fn(run.info.run_id, examples, "examples")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@task(name="log-leaderboard", retries=2, retry_delay_seconds=2)
def log_leaderboard(run_id: str, table: list[dict]) -> None:
    """Attach the leaderboard to the comparison's run as an MLflow table `leaderboard.json`."""
    MlflowClient().log_table(run_id, pd.DataFrame(table), "leaderboard.json")
