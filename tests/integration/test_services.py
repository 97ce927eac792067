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
