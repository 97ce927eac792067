"""Where the embedded default keeps its state, and the environment every process gets.

Everything lives under one state dir (`$TUNELOOP_HOME`, default `.tuneloop/`); deleting it
resets the system. Every location is derived here, so nothing else builds paths by hand.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from tuneloop.config import TuneloopConfig

# Usage reporting and public-host probes off (users keep their data private, and build
# machines reach no such host), servers on loopback. A team may change any of these in its
# environment: values already set there win.
DEFAULT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # First start of Prefect's SQLite DB takes ~25 s; the default timeout is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "INFO",
    # Ray replaces a loopback --node-ip-address with the machine's routable address (and
    # binds its servers there) unless single-machine mode is set. A multi-node cluster sets 1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray token auth on, for `ray start` and for every driver that connects by address: Ray
    # only turns it on by itself where a token file already exists, and a driver that names
    # an address never does, so without this a machine with a token cannot connect.
    "RAY_AUTH_MODE": "token",
    # Never start a Ray of our own by accident: a Serve handle's router keeps polling its
    # controller after the driver disconnects, and its next call would start a fresh local
    # Ray (a second cluster, with its own servers and dashboard) in whatever process used it.
    "RAY_ENABLE_AUTO_CONNECT": "0",
    # Progress bars of artifact downloads and weight loading flood flow logs.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@dataclass(frozen=True)
class StatePaths:
    home: Path

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_db(self) -> Path:
        return self.mlflow_dir / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def inference_db(self) -> Path:
        return self.home / "inference" / "log.db"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def collections(self) -> Path:
        """Document collections: one embedded vector store folder each (tuneloop.vectorstore)."""
        return self.home / "collections"

    @property
    def runs(self) -> Path:
        """Scratch space of training runs (checkpoints, adapters before logging)."""
        return self.home / "runs"

    def training_run(self, key: str) -> Path:
        """One training's scratch dir: checkpoints, the champion's copy, the evaluation report."""
        return self.runs / key

    def validation_report(self, digest: str) -> Path:
        """Where a dataset's validation report goes (by the data's digest)."""
        return self.reports / "validation" / digest

    def drift_report(self, run_id: str) -> Path:
        return self.reports / f"drift-{run_id}.html"

    @property
    def retraining_data(self) -> Path:
        """Retraining sets written by monitoring, one JSONL file per drift episode."""
        return self.data / "retrain"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def eval_cache(self) -> Path:
        """A model's figures per slice, by the model's content hash, slice digest and settings."""
        return self.cache / "evaluations"

    @property
    def services(self) -> Path:
        """Pid files and logs of the local servers started by `tuneloop up`."""
        return self.home / "services"

    @property
    def ray_tmp(self) -> Path:
        # Ray puts unix sockets under its temp dir: keep the path short (<= 107 bytes).
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:10]
        return Path("/tmp") / f"tuneloop-ray-{digest}"

    def ensure(self) -> StatePaths:
        for path in (
            self.mlflow_artifacts,
            self.prefect_home,
            self.inference_db.parent,
            self.models,
            self.data,
            self.reports,
            self.runs,
            self.cache,
            self.services,
        ):
            path.mkdir(parents=True, exist_ok=True)
        return self


def state_paths(cfg: TuneloopConfig) -> StatePaths:
    return StatePaths(cfg.home)


def tracking_uri(cfg: TuneloopConfig) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{state_paths(cfg).mlflow_db}"


def collections_location(cfg: TuneloopConfig) -> Path | str:
    """Where collections live: the team's pgvector server (`collections.store`), else the state dir."""
    return cfg.collections.store or state_paths(cfg).collections


def inference_db_url(cfg: TuneloopConfig) -> str:
    return cfg.serve.inference_db_url or f"sqlite:///{state_paths(cfg).inference_db}"


def prefect_api_url(cfg: TuneloopConfig) -> str:
    return cfg.prefect.api_url or f"http://127.0.0.1:{cfg.prefect.port}/api"


def ray_address(cfg: TuneloopConfig) -> str:
    return cfg.serve.ray_address or f"127.0.0.1:{cfg.serve.ray_port}"


def service_env(cfg: TuneloopConfig) -> dict[str, str]:
    """Return the environment variables a tuneloop process of this config runs with."""
    paths = state_paths(cfg)
    env = dict(DEFAULT_ENV)
    env.update(
        TUNELOOP_HOME=str(cfg.home),
        PREFECT_HOME=str(paths.prefect_home),
        MLFLOW_TRACKING_URI=tracking_uri(cfg),
        GX_ANALYTICS_ENABLED="false",
    )
    return env


def apply_environment(cfg: TuneloopConfig, *, prefect_api: bool = True) -> None:
    """Export `service_env` into this process (the CLI calls this before importing Prefect).

    Privacy settings already in the environment win, so a team can turn them back on.
    """
    state_paths(cfg).ensure()
    for key, value in service_env(cfg).items():
        if key in DEFAULT_ENV:
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value
    if prefect_api:
        os.environ["PREFECT_API_URL"] = prefect_api_url(cfg)
    # The registry is always the tracking store's: a registry URI left in the environment (MLflow's
    # set_registry_uri exports one) would send every client without an explicit one elsewhere.
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
