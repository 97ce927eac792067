"""Registry stage: MLflow runs, model versions with lineage, and aliases.

Aliases: a version that passes the gate becomes `challenger` (set_challenger); only the
promotion flow, after a deploy and a smoke test, moves `champion` (promote_champion).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from prefect import task

from tasks.data import MESSAGES, PROMPT, RESPONSE, SplitDataset, frame_digest
from tasks.evaluate import EvalSlice, GateVerdict, ModelEvaluation, PairedDifference
from tasks.validation import DatasetReport
from tuneloop.config import REPO_ROOT, RegistryConfig, TuneloopConfig
from tuneloop.models import BaseRef
from tuneloop.state import StatePaths, state_paths, tracking_uri

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
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


TRAINING_KEY_TAG = "tuneloop.training_key"  # what names one training across restarts (tasks.finetune)
FLOW_RUN_TAG = "tuneloop.flow_run_id"


def find_training_run(key: str, experiment: str, tracking_uri: str | None = None) -> Run | None:
    """Return the newest MLflow run of the training named `key` in `experiment` (a name), or None."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{TRAINING_KEY_TAG}` = '{key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found
        else []
    )
    return runs[0] if runs else None


@task(name="start-mlflow-run", retries=2, retry_delay_seconds=2)
def start_training_run(
    cfg: RegistryConfig,
    run_name: str,
    params: dict[str, object],
    key: str,
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
    all_tags = {
        "tuneloop.code_version": code_version(),
        TRAINING_KEY_TAG: key,
        **({FLOW_RUN_TAG: flow_run.id} if flow_run.id else {}),
        **(tags or {}),
    }
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
        client.log_batch(run_id, params=entries[lo : lo + 100])
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
    cfg: RegistryConfig,
    run_id: str,
    artifact_dir: Path,
    metrics: dict[str, float],
    lineage: dict[str, str],
    reference_prompts: list[str],
) -> ModelVersionRef:
    """Log the artifact as an MLflow pyfunc model in `run_id`, register it as a new version, end the run.

    The artifact is a LoRA adapter with its base reference, or all the weights of a full
    fine-tune; both go the same way. Its content digest (SHA-256 over the per-file manifest,
    logged as `manifest/artifact-sha256.json`) becomes the version's `tuneloop.artifact_sha256`
    tag, which serving checks before loading it (tuneloop.pyfunc loads either, as serving does). The
    version is created with all its tags in one call (lineage, code version, eval metrics):
    a concurrent reader never sees it half-described.
    """
    from mlflow.models import infer_signature

    import tuneloop.pyfunc
    from tuneloop.models import (
        ARTIFACT_FORMATS,
        DIGEST_TAG,
        artifact_kind,
        artifact_manifest,
        artifact_sha256,
        encrypt_artifact,
    )

    kind = artifact_kind(artifact_dir)
    digest = artifact_sha256(artifact_dir)  # of the plain files: checked by every replica after decrypting
    stored = artifact_dir
    if cfg.encrypt_artifacts:
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="tuneloop-encrypt-"))
        stored = encrypt_artifact(artifact_dir, scratch / artifact_dir.name, cfg.artifact_key_env)
    signature = infer_signature(INPUT_EXAMPLE, ["Paris"], params={"max_new_tokens": 32})
    # Resume the run in its own experiment, whatever experiment this process used last.
    mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):  # ends FINISHED: the training's record is complete
        mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        # The gate's verdict also on the run, where the experiment's run table shows it.
        mlflow.set_tags({k: v[:5000] for k, v in lineage.items() if k.startswith("tuneloop.gate")})
        mlflow.log_text("\n".join(json.dumps(p) for p in reference_prompts), "reference/prompts.jsonl")
        mlflow.log_dict(artifact_manifest(artifact_dir), "manifest/artifact-sha256.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=tuneloop.pyfunc.__file__,
            artifacts={"adapter" if kind == "adapter" else "model": str(stored)},
            signature=signature,
            registered_model_name=None,
            # Stored with the version (the UI shows it; serving clients copy it). MLflow also
            # loads the logged model and answers it once (a warning if that fails): 2 tokens.
            input_example=(INPUT_EXAMPLE, {"max_new_tokens": 2}),
            pip_requirements=[
                "tuneloop",
                "torch",
                "transformers",
                *(["peft"] if kind == "adapter" else []),
                *(["llama-cpp-python"] if kind == "gguf" else []),
            ],
            metadata={"tuneloop_format": ARTIFACT_FORMATS[kind], **lineage},
        )
    if stored != artifact_dir:
        shutil.rmtree(stored.parent, ignore_errors=True)
    tags = {
        **lineage,
        "tuneloop.artifact": kind,
        "tuneloop.encrypted": str(cfg.encrypt_artifacts).lower(),
        DIGEST_TAG: digest,
        "tuneloop.code_version": code_version(),
        # every figure is on the run; the version's tags keep the bias headline per category only
        **{f"eval.{k}": f"{v:.6g}" for k, v in metrics.items() if not k.startswith("bias/") or k.endswith("/bias_gap")},
    }
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
    retries; tags are written with the version).
    """
    with model_lock("registry", tracking_uri, model_name, timeout_s):
        yield


@contextmanager
def model_lock(kind: str, tracking_uri: str, model_name: str, timeout_s: float) -> Iterator[None]:
    """One holder at a time of `kind` (registry, promotion) for `model_name`. With the embedded
    SQLite store every flow runs on this machine: a file lock beside the database (the OS drops
    it when its holder dies). With a tracking server, flows run on many machines that share one
    Prefect API: a Prefect global concurrency limit of 1 slot (a dead holder's lease runs out)."""
    slug = re.sub(r"[^A-Za-z0-9-]", "-", model_name)
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("sqlite", "file", ""):
        from filelock import FileLock

        local = Path(tracking_uri.removeprefix("sqlite:///") if parsed.scheme == "sqlite" else parsed.path)
        lock_dir = (local.parent if parsed.scheme == "sqlite" else local) / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(lock_dir / f"{kind}-{slug}.lock", timeout=timeout_s):
            yield
        return
    with prefect_mutex(f"tuneloop-{kind}-{slug}", timeout_s):
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
        client.set_model_version_tag(
            ref.name, ref.version, "tuneloop.alias_reason", f"{cfg.challenger_alias}: {reason}"
        )
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
    path = mlflow.artifacts.download_artifacts(
        run_id=ref.run_id, artifact_path="reference/prompts.jsonl", dst_path=str(dst)
    )
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
    for context, frame, source in (
        ("training", data.train, data.source),
        ("evaluation", data.eval, data.eval_source or data.source),
    ):
        table = frame[[PROMPT, RESPONSE]].copy()
        table[MESSAGES] = [json.dumps(m) for m in frame[MESSAGES]]
        with warnings.catch_warnings():  # MLflow registers its local-file source class twice and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(table, source=source, name=Path(source).name, digest=frame_digest(frame))
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    # The client, not `mlflow.start_run`: leaving that block would end the run as FINISHED.
    MlflowClient().log_inputs(run_id, datasets=inputs)


@task(name="log-validation-report", retries=2, retry_delay_seconds=2)
def log_validation_report(run_id: str, report: DatasetReport) -> None:
    """Attach the dataset report (and its Data Docs) to the run, with its figures as metrics."""
    client = MlflowClient()
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in report.metrics().items()],
        tags=[
            RunTag("tuneloop.validation", "passed" if report.success else "failed"),
            RunTag("tuneloop.dataset_digest", report.digest),
        ],
    )
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
    with mlflow.start_run(
        run_name=f"select-{Path(source).stem}", tags={"tuneloop.code_version": code_version()}
    ) as run:
        mlflow.log_params(params)
        table = eval_set.assign(messages=[json.dumps(m) for m in eval_set["messages"]])
        mlflow.log_input(mlflow.data.from_pandas(table, source=source, name=Path(source).name), context="evaluation")
    return run.info.run_id


@task(name="log-model-evaluation", retries=2, retry_delay_seconds=2)
def log_model_evaluation(
    parent_run_id: str,
    model: str,
    base: BaseRef,
    metrics: dict[str, float],
    examples: list[dict],
    params: dict[str, str],
) -> str:
    """Record one model's evaluation as a child run of the comparison; return its run id."""
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    location, cross, prompt = model.partition(" × ")  # a model × prompt cell of the grid
    run = client.create_run(
        experiment,
        tags={
            MLFLOW_PARENT_RUN_ID: parent_run_id,
            MLFLOW_RUN_NAME: (Path(location).name or location) + cross + prompt,
            "tuneloop.model": location,
            **({"tuneloop.prompt_version": prompt} if prompt else {}),
            "tuneloop.base_sha256": base.sha256,
            "tuneloop.code_version": code_version(),
        },
    )
    now = int(time.time() * 1000)
    values = {"model": model, "base_location": base.location, "base_revision": base.revision or "", **params}
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(f"eval/{k}", v, now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in values.items()],
    )
    log_eval_examples.fn(run.info.run_id, examples, "examples")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@task(name="log-leaderboard", retries=2, retry_delay_seconds=2)
def log_leaderboard(run_id: str, table: list[dict]) -> None:
    """Attach the leaderboard to the comparison's run as an MLflow table `leaderboard.json`."""
    MlflowClient().log_table(run_id, pd.DataFrame(table), "leaderboard.json")


# --------------------------------------------------------------------------- the training flow's records


@dataclass
class TrainingResult:
    version: ModelVersionRef
    champion: bool  # the version holds the champion alias when the flow ends (promoted)
    reason: str  # the gate's verdict
    metrics: dict[str, float]  # the candidate's figures on its own slice
    champion_metrics: dict[str, float]  # the champion's (or the base model's) on the same examples
    dataset_digest: str
    trigger: str
    comparison: list[PairedDifference]  # candidate - champion per slice, with bootstrap intervals
    decision: str  # the gate: passed, rejected, or withheld (incomplete evidence)
    alias: str | None  # the alias the version holds when the flow ends
    rules: list[str]  # one line per gate rule and slice: outcome, rule, values
    slices: list[str] = field(default_factory=list)  # name@version, its own first
    compared_with: str = ""  # "champion v3" or "base <model>"
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # slice → the candidate's figures

    @property
    def slice(self) -> str:
        """The name of the slice this version's own data made (its figures are `metrics`)."""
        return self.slices[0].split("@")[0] if self.slices else ""


@task(name="open-state")
def open_state(cfg: TuneloopConfig) -> StatePaths:
    """Return the state dir's folders (made where missing), with MLflow pointed at the config's store."""
    paths = state_paths(cfg).ensure()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    return paths


def training_params(cfg: TuneloopConfig, judge: Any = None) -> dict[str, object]:
    """The training run's parameters: base, every train setting, evaluation and gate settings, the judge."""
    return {
        "base_model": cfg.model.base,
        **{f"train.{k}": v for k, v in cfg.train.model_dump().items()},
        "eval.max_examples": cfg.eval.max_examples,
        "eval.metrics": ",".join(cfg.eval.metrics),
        "gate.rules": " ; ".join(cfg.gate.rules),
        "judge.backend": cfg.eval.judge.backend,
        **(judge.params() if judge else {}),
    }


@task(name="record-training-inputs", retries=2, retry_delay_seconds=2)
def record_training_inputs(run_id: str, split: SplitDataset, report: DatasetReport) -> None:
    """Record what the run trains on: both splits as its inputs, the rows it trains on (what a later
    retraining replays), and the validation report (as files, figures and a Prefect artifact)."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.validation import report_markdown

    log_dataset_inputs.fn(run_id, split)
    rows = split.training_rows
    MlflowClient().log_text(
        run_id, "".join(json.dumps({MESSAGES: m}, ensure_ascii=False) + "\n" for m in rows[MESSAGES]), TRAINING_ROWS
    )
    log_validation_report.fn(run_id, report)
    create_markdown_artifact(
        key="dataset-validation",
        markdown=report_markdown(report, run_id),
        description=f"{split.source}: validation {'passed' if report.success else 'failed'}",
    )


TRAINING_ROWS = "data/train.jsonl"  # on a training run: the conversations it trained on


@task(name="require-valid-data")
def require_valid_data(run_id: str, report: DatasetReport) -> None:
    """Raise DataValidationError (the run ends FAILED, keeping the evidence) unless validation passed."""
    from prefect import get_run_logger

    from tasks.data import DataValidationError

    if not report.success:
        fail_run.fn(run_id, report.summary())
        raise DataValidationError(report.summary())
    get_run_logger().info(report.summary())


@task(name="read-training-rows", retries=2, retry_delay_seconds=2)
def training_rows(ref: ModelVersionRef, dst: Path) -> list[list[dict[str, str]]]:
    """Return the conversations a registered version was trained on (its run's `data/train.jsonl`);
    none for a version whose run recorded no training rows (registered by hand, or by an older tuneloop)."""
    folder = str(Path(TRAINING_ROWS).parent)
    if not ref.run_id or TRAINING_ROWS not in [a.path for a in MlflowClient().list_artifacts(ref.run_id, folder)]:
        return []
    path = mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=TRAINING_ROWS, dst_path=str(dst))
    return [json.loads(line)[MESSAGES] for line in Path(path).read_text().splitlines() if line.strip()]


@task(name="champion-or-base", retries=2, retry_delay_seconds=2)
def champion_or_base(champion: ModelVersionRef | None, base: BaseRef, dst: Path) -> tuple[Path | BaseRef, str]:
    """What a candidate is compared with: the champion version's artifact, or the base model while none serves."""
    if champion is None:
        return base, f"base {Path(base.location).name or base.location}"
    return fetch_adapter(champion.uri, dst), f"champion v{champion.version}"


def _gains(comparison: list[PairedDifference], categories: Iterable[str] = ()) -> dict[str, float]:
    """Paired gains as metric names: `<slice>/gain/<metric>` (`bias/<category>/gain/<metric>`) and
    its `_ci_low` / `_ci_high`."""
    grouped = set(categories)
    return {
        f"{'bias/' if d.slice in grouped else ''}{d.slice}/gain/{d.metric}{suffix}": value
        for d in comparison
        for suffix, value in (("", d.mean), ("_ci_low", d.low), ("_ci_high", d.high))
    }


@task(name="record-evaluation", retries=2, retry_delay_seconds=2)
def record_evaluation(
    run_id: str,
    candidate: ModelEvaluation,
    reference: ModelEvaluation,
    comparison: list[PairedDifference],
    verdict: GateVerdict,
    report: Path,
    slices: list[EvalSlice],
) -> None:
    """Record the evaluation on the training run: the champion's figures and the paired gains per slice
    (`eval/<slice>/…`, the same names in every run), the slices as inputs, the report, every answer."""
    from tasks.slices import link_slices

    client = MlflowClient()
    now = int(time.time() * 1000)
    figures = {
        **{f"eval/{k}": v for k, v in _gains(comparison, candidate.bias).items()},
        **{f"eval/{name}/champion/{m}": v for name, r in reference.reports.items() for m, v in r.metrics.items()},
        **{f"eval/bias/{name}/champion/{m}": v for name, r in reference.bias.items() for m, v in r.metrics.items()},
    }
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in figures.items() if not math.isnan(v)],
        tags=[
            RunTag("tuneloop.gate", verdict.decision),
            RunTag("tuneloop.gate_reason", verdict.reason[:5000]),
            RunTag("tuneloop.compared_with", reference.label),
            RunTag("tuneloop.slices", ",".join(s.ref for s in slices)),
        ],
    )
    link_slices(run_id, slices)
    client.log_artifact(run_id, str(report))
    for name, r in candidate.reports.items():
        log_eval_examples.fn(run_id, r.examples, f"{name}/candidate")
    for name, r in reference.reports.items():
        log_eval_examples.fn(run_id, r.examples, f"{name}/{reference.label.split()[0]}")
    for who, evaluation in (("candidate", candidate), (reference.label.split()[0], reference)):
        for name, r in evaluation.bias.items():  # every counterfactual pair, both answers
            log_eval_examples.fn(run_id, r.examples, f"bias/{name}/{who}")


def version_lineage(
    cfg: TuneloopConfig,
    base: BaseRef,
    split: SplitDataset,
    report: DatasetReport,
    run_id: str,
    trigger: str,
    verdict: GateVerdict,
    judge: Any,
    slices: Any,
    reference: ModelEvaluation,
    trained: Any,
) -> dict[str, str]:
    """The tags a version is registered with: where it came from, what it was gated on, and how."""
    tags = {
        "tuneloop.base_model": base.location,
        "tuneloop.base_sha256": base.sha256,
        "tuneloop.base_revision": base.revision or "",
        "tuneloop.dataset_digest": split.digest,
        "tuneloop.validation_warnings": str(len(report.warnings())),
        "tuneloop.dataset_source": split.source,
        "tuneloop.training_run": run_id,
        "tuneloop.method": cfg.train.method,
        "tuneloop.trigger": trigger,
        "tuneloop.slice": slices.new.ref,
        "tuneloop.slices": ",".join(slices.refs()),
        "tuneloop.compared_with": reference.label,
        "tuneloop.gate": verdict.decision,
        "tuneloop.gate_reason": verdict.reason,
        "tuneloop.gate_rules": "\n".join(verdict.lines()),
        "tuneloop.train.steps": str(trained.steps),
        "tuneloop.train.final_loss": f"{trained.final_loss:.6g}",
        "tuneloop.train.started_from": (
            f"{reference.label}'s adapter" if trained.started_from == "champion's adapter" else trained.started_from
        ),
    }
    if split.replay is not None and len(split.replay):
        tags.update(
            {"tuneloop.replay_source": split.replay_source or "", "tuneloop.replay_rows": str(len(split.replay))}
        )
    if judge:
        tags.update(
            {
                "tuneloop.judge": f"{judge.backend}:{judge.model}",
                "tuneloop.judge_rubrics": f"{judge.rubric.name}@{judge.rubric.sha256[:16]},"
                f"{judge.hallucination_rubric.name}@"
                f"{judge.hallucination_rubric.sha256[:16]}",
            }
        )
    if not verdict.passed:
        tags["tuneloop.alias_reason"] = f"no alias: the gate {verdict.reason}"
    tags.update(
        {
            f"tuneloop.champion_{name}_{m}": f"{v:.6g}"
            for name, r in reference.reports.items()
            for m, v in r.metrics.items()
            if m in ("token_f1", "rougeL", "exact_match")
        }
    )
    return tags


@task(name="assign-alias", retries=2, retry_delay_seconds=2)
def assign_alias(version: ModelVersionRef, verdict: GateVerdict, cfg: RegistryConfig) -> str | None:
    """Make a version that passed the gate `challenger` (unless a newer one is); return the alias it holds."""
    from prefect import get_run_logger

    logger = get_run_logger()
    if not verdict.passed:
        logger.warning("Version %s registered without alias: the gate %s", version.version, verdict.reason)
        return None
    if set_challenger.fn(version, cfg, verdict.reason):
        logger.info("Version %s is %s: %s", version.version, cfg.challenger_alias, verdict.reason)
        return cfg.challenger_alias
    logger.warning(
        "Version %s passed the gate, but a newer version is %s already", version.version, cfg.challenger_alias
    )
    return None


@task(name="read-alias", retries=2, retry_delay_seconds=2)
def current_alias(version: ModelVersionRef, cfg: RegistryConfig) -> str | None:
    """Return the alias (champion, else challenger) a version holds now, or None."""
    client = MlflowClient()
    for alias in (cfg.champion_alias, cfg.challenger_alias):
        if _alias_version(client, version.name, alias) == version.version:
            return alias
    return None


def summary_markdown(result: TrainingResult, report_html: str | None) -> str:
    """The training's Prefect artifact: verdict, rules, slices side by side."""
    from tuneloop.reports import Table, fmt, fmt_interval, fmt_signed

    outcome = (
        f"alias **{result.alias}**"
        if result.alias
        else "no alias: " + ("a newer version is challenger" if result.decision == "passed" else result.reason)
    )
    rules = Table(
        ["outcome", "rule (slice)", "values"], [line.split(": ", 1)[0:1] + _rule_cells(line) for line in result.rules]
    )
    diffs = {(d.slice, d.metric): d for d in result.comparison}
    rows = [
        [sl, m, fmt(result.figures[sl].get(m)), fmt_signed(d.mean), fmt_interval(d.low, d.high)]
        for sl in result.figures
        for m in ("token_f1", "rougeL", "exact_match")
        if (d := diffs.get((sl, m))) is not None
    ]
    figures = Table(["slice", "metric", "candidate", f"gain over {result.compared_with}", "95% interval"], rows)
    docs = f"\n\nDataset report: `{report_html}` (and artifact `validation/` of the run)" if report_html else ""
    return (
        f"## {result.version.name} v{result.version.version}: gate {result.decision}, {outcome}\n\n"
        f"Compared with **{result.compared_with}** on {', '.join(result.slices)}.\n\nGate: {result.reason}\n\n"
        f"{rules.markdown()}\n{figures.markdown()}\nMLflow model: `{result.version.uri}`, training run "
        f"`{result.version.run_id}` (artifact `eval_report.html`){docs}"
    )


def _rule_cells(line: str) -> list[str]:
    rule, _, values = line.split(": ", 1)[1].rpartition(" (")
    return [rule, values.removesuffix(")")]


@task(name="publish-training-summary")
def publish_training_summary(
    cfg: RegistryConfig,
    version: ModelVersionRef,
    verdict: GateVerdict,
    alias: str | None,
    candidate: ModelEvaluation,
    reference: ModelEvaluation,
    comparison: list[PairedDifference],
    slices: Any,
    split: SplitDataset,
    report: DatasetReport,
    trigger: str,
) -> TrainingResult:
    """Show the training's outcome as a Prefect artifact and return it."""
    from prefect.artifacts import create_markdown_artifact

    own = slices.new.name
    result = TrainingResult(
        version,
        alias == cfg.champion_alias,
        verdict.reason,
        dict(candidate.reports[own].metrics),
        dict(reference.reports[own].metrics),
        split.digest,
        trigger,
        comparison,
        verdict.decision,
        alias,
        verdict.lines(),
        slices.refs(),
        reference.label,
        {name: dict(r.metrics) for name, r in candidate.reports.items()},
    )
    create_markdown_artifact(
        key="training-result",
        markdown=summary_markdown(result, report.html),
        description=f"{cfg.model_name} v{version.version}",
    )
    return result


@task(name="record-promotion", retries=2, retry_delay_seconds=2)
def record_promotion(
    experiment: str,
    target: ModelVersionRef,
    previous: str | None,
    strategy: str,
    decision: str,
    reason: str,
    figures: dict[str, dict[str, float]],
    lines: list[str],
    share: float = 1.0,
) -> str:
    """One MLflow run per promotion: each arm's figures, the rules, the decision; `share`: the
    challenger's share of routed traffic during the comparison (1.0: none was held, all at once)."""
    from prefect.runtime import flow_run

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"promote-v{target.version}") as run:
        mlflow.log_params(
            {"version": target.version, "previous": previous or "none", "strategy": strategy, "share": share}
        )
        mlflow.log_metrics(
            {f"{arm}_{k}": v for arm, m in figures.items() for k, v in m.items() if v is not None and not math.isnan(v)}
        )
        mlflow.set_tags(
            {
                "tuneloop.decision": decision,
                "tuneloop.reason": reason[:5000],
                "tuneloop.model_version": target.version,
                "tuneloop.prefect_flow_run": str(flow_run.get_id() or ""),
            }
        )
        mlflow.log_text("\n".join(lines) or "(no rules: smoke test only)", "rules.txt")
        return run.info.run_id
