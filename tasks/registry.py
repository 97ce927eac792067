"""Registry stage: MLflow runs, model versions with lineage, and aliases."""

from __future__ import annotations

import json
import logging
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from prefect import task

from tasks.data import MESSAGES, PROMPT, RESPONSE, SplitDataset, frame_digest
from tasks.validation import DatasetReport
from tuneloop.config import REPO_ROOT, RegistryConfig

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


@task(name="start-mlflow-run", retries=2, retry_delay_seconds=2)
def start_training_run(
    cfg: RegistryConfig, run_name: str, params: dict[str, object], tags: dict[str, str] | None = None,
) -> str:
    """Create the MLflow run of one training with its params; return its id."""
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name=run_name, tags={"tuneloop.code_version": code_version(), **(tags or {})}) as run:
        mlflow.log_params(params)
    return run.info.run_id


@task(name="find-champion", retries=2, retry_delay_seconds=2)
def find_champion(cfg: RegistryConfig) -> ModelVersionRef | None:
    """Return the version that holds the champion alias, or None."""
    try:
        mv = MlflowClient().get_model_version_by_alias(cfg.model_name, cfg.champion_alias)
    except MlflowException:
        return None
    return ModelVersionRef(mv.name, str(mv.version), mv.run_id)


@task(name="download-model-version", retries=2, retry_delay_seconds=2)
def download_version(ref: ModelVersionRef, dst: Path) -> Path:
    """Download a registered version and return its adapter artifact folder."""
    return fetch_adapter(ref.uri, dst)


def fetch_adapter(model_uri: str, dst: Path) -> Path:
    from tuneloop.models import find_artifact_dir

    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    return find_artifact_dir(Path(local))


@task(name="register-model-version")
def register_adapter(
    cfg: RegistryConfig, run_id: str, artifact_dir: Path, metrics: dict[str, float],
    lineage: dict[str, str], reference_prompts: list[str],
) -> ModelVersionRef:
    """Log the adapter as an MLflow pyfunc model in `run_id` and register it as a new version."""
    from mlflow.models import infer_signature

    import tuneloop.pyfunc

    signature = infer_signature(pd.DataFrame({"prompt": ["What is the capital of France?"]}), ["Paris"],
                                params={"max_new_tokens": 32})
    # Resume the run in its own experiment, whatever experiment this process used last.
    mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        mlflow.log_text("\n".join(json.dumps(p) for p in reference_prompts), "reference/prompts.jsonl")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=tuneloop.pyfunc.__file__, artifacts={"adapter": str(artifact_dir)},
            signature=signature, registered_model_name=cfg.model_name,
            pip_requirements=["tuneloop", "torch", "transformers", "peft"],
            metadata={"tuneloop_format": "adapter+base-ref/1", **lineage},
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    tags = {**lineage, "tuneloop.code_version": code_version(), **{f"eval.{k}": f"{v:.6g}" for k, v in metrics.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    log.info("Registered %s version %s", cfg.model_name, version)
    return ModelVersionRef(cfg.model_name, version, run_id)


@task(name="set-model-alias", retries=2, retry_delay_seconds=2)
def set_alias(ref: ModelVersionRef, alias: str, reason: str) -> None:
    """Point `alias` at this version and record why on the version."""
    client = MlflowClient()
    client.set_registered_model_alias(ref.name, alias, ref.version)
    client.set_model_version_tag(ref.name, ref.version, f"tuneloop.{alias}_reason", reason)


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
    mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        for context, frame, source in (("training", data.train, data.source),
                                       ("evaluation", data.eval, data.eval_source or data.source)):
            table = frame[[PROMPT, RESPONSE]].copy()
            table[MESSAGES] = [json.dumps(m) for m in frame[MESSAGES]]
            with warnings.catch_warnings():  # MLflow registers its local-file source class twice and says so
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                dataset = mlflow.data.from_pandas(table, source=source, name=Path(source).name,
                                                  digest=frame_digest(frame))
            mlflow.log_input(dataset, context=context)


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
