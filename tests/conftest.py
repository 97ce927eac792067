"""Shared fixtures: a tiny model built once, a config per test in a temp state dir, and one
session-wide Prefect test harness for the tests that run flows."""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.postgres import Postgres
from tuneloop.config import DEFAULT_CONFIG, DEFAULT_GATE_RULES, TuneloopConfig, load_config
from tuneloop.state import DEFAULT_ENV

ASSETS = Path(__file__).parent / "assets"
LOCAL_CONFIG = DEFAULT_CONFIG

# A 0.6M-parameter model and a few steps: the whole flow in seconds on 2 CPUs.
TINY = [
    "model.base=builtin:tiny-llama",
    "train.max_steps=4",
    "train.batch_size=4",
    "train.max_seq_len=48",
    "eval.max_examples=4",
    "eval.max_new_tokens=4",
    "eval.batch_size=4",
    "validation.data_docs=false",
    "serve.port=28000",
    "serve.ray_port=26390",
    "serve.dashboard_port=28265",
    "serve.num_replicas=2",
    "serve.replica_cpus=0.5",
    "serve.default_max_tokens=4",
    "monitor.window=12",
    "monitor.min_samples=8",
    "monitor.permutations=100",
    "monitor.alpha=0.02",
    "prefect.port=24200",
    # The tiny model learns nothing from 4 steps: these tests gate on safety alone. The gate's
    # defaults (better than the champion with confidence, no forgetting) are tested with LEARNING.
    "gate.rules=['toxicity_rate[all] <= 1']",
]

# What the tiny model learns in ~5 s: a one-word answer per topic (tests/assets/tiny_colours.jsonl
# answers "blue", tiny_counts.jsonl "seven"), with the gate's default rules.
LEARNING = [
    "train.max_steps=40",
    "train.batch_size=8",
    "train.learning_rate=0.003",
    "train.target_modules=auto",
    "eval.max_examples=16",
    "eval.batch_size=8",
    "eval.metrics=[token_f1, exact_match, toxicity_rate, pii_leak_rate]",
    f"gate.rules={DEFAULT_GATE_RULES!r}",
]

for key, value in DEFAULT_ENV.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def _seeds() -> None:
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of built base models for the whole session (the tiny model builds in ~1 s)."""
    return tmp_path_factory.mktemp("models")


def make_config(home: Path, models_dir: Path, *extra: str) -> TuneloopConfig:
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(models_dir, target_is_directory=True)
    return load_config(LOCAL_CONFIG, [*TINY, f"home={home}", *extra])


@pytest.fixture
def cfg(tmp_path: Path, models_dir: Path) -> TuneloopConfig:
    return make_config(tmp_path / "home", models_dir, f"data.path={ASSETS / 'tiny_qa.jsonl'}")


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real Prefect API (temporary server on 127.0.0.1) for every flow in the session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    os.environ.pop("PREFECT_API_URL", None)
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def pgvector_server() -> Iterator[Postgres]:
    """One PostgreSQL 16 with pgvector for the session (tests/postgres.py); a database per test."""
    from tests.postgres import pgvector_bindir, running_postgres

    why = "pgserver (a dev dependency: PostgreSQL with pgvector) is not installed"
    with running_postgres(pgvector_bindir(), "tuneloop", why) as server:
        yield server


@pytest.fixture(params=["lancedb", pytest.param("pgvector", marks=pytest.mark.slow)])
def collections_at(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path | str:
    """Where a test's collections live, once per store: an embedded LanceDB folder, and a database of
    its own on a real pgvector server (`collections.store`; its password from PGPASSWORD, as a team's)."""
    if request.param == "lancedb":
        return tmp_path / "collections"
    server: Postgres = request.getfixturevalue("pgvector_server")
    database = f"collections_{secrets.token_hex(4)}"
    server.create_database(database)
    monkeypatch.setenv("PGPASSWORD", server.password)
    return server.uri(database, driver="")
