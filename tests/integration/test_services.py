"""`tuneloop up` starts real Prefect, MLflow and Ray servers on 127.0.0.1 and registers the
flows as deployments; `tuneloop down` leaves no process behind."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tuneloop.services import port_open

pytestmark = pytest.mark.slow

PORTS = {
    "prefect.port": 24300,
    "mlflow.ui_port": 25300,
    "serve.ray_port": 26490,
    "serve.dashboard_port": 28365,
    "serve.port": 28100,
}
TUNELOOP = str(Path(sys.executable).parent / "tuneloop")


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    sets = [a for key, value in PORTS.items() for a in ("--set", f"{key}={value}")]
    env = {**os.environ, "TUNELOOP_HOME": str(home), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [TUNELOOP, *args, *sets, "--set", "model.base=builtin:tiny-llama"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_up_serves_the_uis_and_deployments_and_down_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    try:
        up = run("up", home=home)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{PORTS['prefect.port']}" in up.stdout
        assert "nothing serves yet" in up.stdout  # no champion in a fresh state dir
        api = f"http://127.0.0.1:{PORTS['prefect.port']}/api"
        assert httpx.get(f"{api}/health", timeout=10).status_code == 200
        for name in (
            "training-flow/tuneloop-training",
            "promotion-flow/tuneloop-promotion",
            "monitoring-flow/tuneloop-monitoring",
        ):
            assert httpx.get(f"{api}/deployments/name/{name}", timeout=10).status_code == 200, name
        assert httpx.get(f"http://127.0.0.1:{PORTS['mlflow.ui_port']}/health", timeout=10).status_code == 200
        assert port_open("127.0.0.1", PORTS["serve.ray_port"])
        assert (home / "prefect" / "prefect.db").exists()  # state stays in the state dir
    finally:
        down = run("down", home=home)
    assert down.returncode == 0, down.stdout + down.stderr
    for key in ("prefect.port", "mlflow.ui_port", "serve.ray_port"):
        assert not port_open("127.0.0.1", PORTS[key]), key
    assert not list((home / "services").glob("*.pid"))


def test_up_with_work_pools_registers_prefect_yaml_and_starts_a_worker(tmp_path: Path) -> None:
    """`prefect.deployments: work_pools`: the pools of infra/prefect/, prefect.yaml's deployments
    on them with the config as parameters, a process worker on this machine; `down` stops it."""
    home = tmp_path / "home"
    api = f"http://127.0.0.1:{PORTS['prefect.port']}/api"
    try:
        up = run("up", "--set", "prefect.deployments=work_pools", home=home)
        assert up.returncode == 0, up.stdout + up.stderr
        for name, pool in (
            ("training-flow/tuneloop-training", "tuneloop-process"),
            ("training-flow/tuneloop-training-gpu", "tuneloop-gpu"),
            ("promotion-flow/tuneloop-promotion", "tuneloop-process"),
            ("monitoring-flow/tuneloop-monitoring", "tuneloop-process"),
        ):
            deployment = httpx.get(f"{api}/deployments/name/{name}", timeout=10).json()
            assert deployment["work_pool_name"] == pool, name
            assert deployment["parameters"]["config"]["model"]["base"] == "builtin:tiny-llama", name
        workers = httpx.post(f"{api}/work_pools/tuneloop-process/workers/filter", json={}, timeout=10).json()
        assert workers, "no worker of the process pool"
        assert (home / "services" / "worker.pid").exists()
    finally:
        down = run("down", home=home)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "worker" in down.stdout
    assert not list((home / "services").glob("*.pid"))
    for key in ("prefect.port", "mlflow.ui_port", "serve.ray_port"):
        assert not port_open("127.0.0.1", PORTS[key]), key


def test_a_prefect_server_with_an_auth_string_refuses_anonymous_calls(tmp_path: Path, models_dir: Path) -> None:
    """A team's Prefect API is protected (PREFECT_SERVER_API_AUTH_STRING on the server,
    PREFECT_API_AUTH_STRING on every client): tuneloop starts and reads it with the credentials."""
    import secrets

    from tests.conftest import make_config
    from tuneloop import services
    from tuneloop.state import prefect_api_url

    cfg = make_config(tmp_path / "home", models_dir, "prefect.port=24390")
    credentials = f"team:{secrets.token_hex(12)}"
    saved = {k: os.environ.get(k) for k in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING")}
    os.environ["PREFECT_SERVER_API_AUTH_STRING"] = os.environ["PREFECT_API_AUTH_STRING"] = credentials
    try:
        services.start_prefect_server(cfg)
        api = prefect_api_url(cfg)
        assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code == 401
        assert httpx.post(f"{api}/flows/filter", json={}, timeout=10, auth=("team", "wrong")).status_code == 401
        assert httpx.post(f"{api}/flows/filter", json={}, timeout=10, auth=services.prefect_auth()).status_code == 200
        env = {**os.environ, "PREFECT_API_URL": api}
        code = "from prefect import get_client\nwith get_client(sync_client=True) as c: print(len(c.read_flows()))"
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        env["PREFECT_API_AUTH_STRING"] = "team:wrong"
        refused = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert refused.returncode != 0 and "401" in refused.stderr
    finally:
        services.stop_service(cfg, "prefect")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
