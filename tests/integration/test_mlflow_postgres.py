"""MLflow on a real PostgreSQL server: tracking and the registry straight on the database, and
the team server (mlflow/entrypoint.sh: the credential check, then basic auth) over it.

A throwaway server (initdb + pg_ctl) listens on 127.0.0.1 in a temp dir and is removed after.
`.ci/run` installs Debian's `postgresql` package; without its binaries these tests skip.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.postgres import Postgres, debian_bindir, free_port, running_postgres
from tuneloop.config import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres(
        debian_bindir(), "mlflow", "PostgreSQL binaries not found (initdb): apt-get install postgresql (.ci/run does)"
    ) as server:
        yield server


def test_tracking_and_registry_on_postgres(postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import mlflow.pyfunc

    # A database store puts logged models under ./mlruns of the working directory: keep it in tmp.
    monkeypatch.chdir(tmp_path)
    postgres.create_database("tracking")
    uri = postgres.uri("tracking")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("tuneloop-training", artifact_location=(tmp_path / "art").as_uri())

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [f"echo: {p}" for p in model_input["prompt"]]

    # set_tracking_uri also exports MLFLOW_TRACKING_URI (and the registry's) to the environment:
    # through monkeypatch the variables come back as they were, or later tests in this process
    # would talk to this Postgres after it stopped.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_params({"train.method": "lora", "train.lora_rank": 8})
            for step, loss in enumerate([2.5, 1.9, 1.4]):
                mlflow.log_metric("train/loss", loss, step=step)
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
        version = mlflow.register_model(info.model_uri, "tuneloop-chat")
        client.set_registered_model_alias("tuneloop-chat", "champion", version.version)
        client.set_model_version_tag("tuneloop-chat", version.version, "tuneloop.gate", "passed")

        champion = client.get_model_version_by_alias("tuneloop-chat", "champion")
        assert champion.version == version.version and champion.tags["tuneloop.gate"] == "passed"
        assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2.5, 1.9, 1.4]
        assert client.get_run(run.info.run_id).data.params["train.lora_rank"] == "8"
        import pandas as pd

        model = mlflow.pyfunc.load_model("models:/tuneloop-chat@champion")
        assert list(model.predict(pd.DataFrame({"prompt": ["hi"]}))) == ["echo: hi"]
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    # It is Postgres that holds them, not a SQLite file somewhere.
    assert postgres.query("tracking", "SELECT count(*) FROM metrics WHERE key = 'train/loss'") == [(3,)]
    assert postgres.query("tracking", "SELECT alias, version FROM registered_model_aliases") == [
        ("champion", int(version.version))
    ]


def test_team_server_with_basic_auth_on_postgres(postgres: Postgres, tmp_path: Path) -> None:
    """mlflow/entrypoint.sh as the image runs it: the check, then `mlflow server --app-name basic-auth`."""
    import mlflow

    postgres.create_database("team")
    postgres.create_database("team_auth")
    port = free_port()
    password = "a-long-admin-password-" + secrets.token_hex(4)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's python and mlflow
        "PYTHONPATH": str(REPO_ROOT),
        "MLFLOW_AUTH_TEMPLATE": str(REPO_ROOT / "mlflow" / "basic_auth.ini"),
        "MLFLOW_AUTH_CONFIG_OUT": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_SERVER_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_BACKEND_STORE_URI": postgres.uri("team"),
        "MLFLOW_AUTH_DATABASE_URI": postgres.uri("team_auth"),
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_SERVER_ALLOWED_HOSTS": "127.0.0.1:*",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "password1234",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }
    entrypoint = str(REPO_ROOT / "mlflow" / "entrypoint.sh")
    # MLflow's old default password: the server never starts.
    refused = subprocess.run([entrypoint], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1 and "password1234" in refused.stderr
    assert postgres.query("team_auth", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]

    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([entrypoint], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "MLflow server did not start: " + (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
        assert httpx.get(search, timeout=10).status_code == 401  # no credentials, no data
        assert httpx.get(search, auth=("admin", "wrong-password-123"), timeout=10).status_code == 401
        assert httpx.get(search, auth=("admin", password), timeout=10).status_code == 200

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", password
        try:
            client = mlflow.MlflowClient(url)
            experiment = client.create_experiment("team-experiment")
            run = client.create_run(experiment)
            client.log_metric(run.info.run_id, "eval/rougeL", 0.42)
            client.log_text(run.info.run_id, "proxied through the server", "notes.txt")
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        # Beyond the admin: users get the template's default (READ) and what an admin grants.
        alice, bob = ("alice", "alice-" + secrets.token_hex(8)), ("bob", "bob-" + secrets.token_hex(8))
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", password
        try:
            from mlflow.server import get_app_client

            admin = get_app_client("basic-auth", tracking_uri=url)
            admin.create_user(*alice)
            admin.create_user(*bob)
            admin.grant_user_permission("alice", "experiment", experiment, "EDIT")
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        log_metric = f"{url}/api/2.0/mlflow/runs/log-metric"
        metric = {"run_id": run.info.run_id, "key": "eval/by_user", "value": 1.0, "timestamp": 0, "step": 0}
        assert httpx.get(search, auth=bob, timeout=10).status_code == 200  # READ: may look
        assert httpx.post(log_metric, json=metric, auth=bob, timeout=10).status_code == 403  # not write
        assert httpx.post(log_metric, json=metric, auth=alice, timeout=10).status_code == 200  # granted EDIT
        not_admin = httpx.post(
            f"{url}/api/2.0/mlflow/users/create", json={"username": "eve", "password": "x" * 16}, auth=alice, timeout=10
        )
        assert not_admin.status_code == 403  # only the admin manages users
        assert [p.read_text() for p in (tmp_path / "artifacts").rglob("notes.txt")] == ["proxied through the server"]
        assert postgres.query("team", "SELECT value FROM metrics WHERE key = 'eval/rougeL'") == [(0.42,)]
        assert sorted(postgres.query("team_auth", "SELECT username FROM users")) == [("admin",), ("alice",), ("bob",)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def test_prompt_registry_round_trip_on_postgres(
    postgres: Postgres, tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The team server's store holds prompt versions as the embedded SQLite does (tests/test_prompts.py)."""
    import mlflow

    from tasks.prompts import prompt_diff, prompt_versions, register_prompt, resolve_prompt
    from tests.conftest import make_config

    monkeypatch.chdir(tmp_path)
    postgres.create_database("prompts")
    uri = postgres.uri("prompts")
    cfg = make_config(tmp_path / "home", models_dir, f"mlflow.tracking_uri={uri}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # _client exports them: restored after the test
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    try:
        system = [{"role": "system", "content": "Answer for {{product}}."}, {"role": "user", "content": "{{input}}"}]
        v1, created = register_prompt(cfg, "support", system, "first", "ana", alias="champion")
        assert created and v1.version == "1"
        assert register_prompt(cfg, "support", system, "again", "bo") == (v1, False)
        v2, _ = register_prompt(cfg, "support", "Answer: {{input}}", "text", "bo")
        assert resolve_prompt(cfg, "support@champion") == v1 and resolve_prompt(cfg, "support") == v2
        assert [(i.version, i.author, i.aliases) for i in prompt_versions(cfg, "support")] == [
            ("1", "ana", ["champion"]),
            ("2", "bo", []),
        ]
        assert "+++ support/2" in prompt_diff(cfg, "support/1", "support/2")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    # Postgres holds them: MLflow keeps prompts as registered models tagged as prompts.
    assert postgres.query("prompts", "SELECT count(*) FROM model_versions WHERE name = 'support'") == [(2,)]
