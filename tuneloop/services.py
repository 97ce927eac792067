"""The local servers of the embedded default: Prefect, MLflow, Ray (+ Serve), the flow runner.

Each runs as its own process group on 127.0.0.1, with its pid file and log under
`<state dir>/services/`, so `tuneloop down` (or a test's teardown) leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tuneloop.config import REPO_ROOT, TuneloopConfig
from tuneloop.state import prefect_api_url, ray_address, service_env, state_paths, tracking_uri

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent


class ServiceError(RuntimeError):
    """A local server that did not start or stop."""


@dataclass(frozen=True)
class Service:
    name: str
    url: str


def _env(cfg: TuneloopConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **service_env(cfg), **(extra or {})}
    env.pop("MLFLOW_REGISTRY_URI", None)  # the registry is the tracking store's (tuneloop.state)
    return env


def prefect_auth() -> tuple[str, str] | None:
    """Basic-auth credentials for a Prefect server started with PREFECT_SERVER_API_AUTH_STRING:
    Prefect's clients send PREFECT_API_AUTH_STRING (`user:password`); so do tuneloop's own checks."""
    value = os.environ.get("PREFECT_API_AUTH_STRING")
    if not value:
        return None
    user, _, password = value.partition(":")
    return user, password


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None, name: str, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text()[-2000:] if logfile.exists() else ""
            raise ServiceError(f"{name} exited with code {proc.returncode} at start; log {logfile}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServiceError(f"{name} did not answer at {url} within {timeout:.0f} s; see {logfile}")


def _spawn(
    cfg: TuneloopConfig, name: str, argv: list[str], extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    services = state_paths(cfg).ensure().services
    logfile = services / f"{name}.log"
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_env(cfg, extra_env),
            start_new_session=True,
            cwd=str(cfg.home),
        )
    (services / f"{name}.pid").write_text(str(proc.pid))
    return proc


def stop_service(cfg: TuneloopConfig, name: str, timeout: float = 20) -> bool:
    """Stop a service started by `_spawn` (its whole process group); return whether one ran."""
    pidfile = state_paths(cfg).services / f"{name}.pid"
    if not pidfile.exists():
        return False
    pid = int(pidfile.read_text())
    pidfile.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def start_prefect_server(cfg: TuneloopConfig, timeout: float = 120) -> Service:
    """Start `prefect server` on 127.0.0.1 with its database in the state dir."""
    url = prefect_api_url(cfg)
    if port_open("127.0.0.1", cfg.prefect.port):
        _wait_http(f"{url}/health", timeout, None, "Prefect server", Path("-"))
        return Service("prefect", url.removesuffix("/api"))
    proc = _spawn(
        cfg,
        "prefect",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(cfg.prefect.port)],
    )
    _wait_http(f"{url}/health", timeout, proc, "Prefect server", state_paths(cfg).services / "prefect.log")
    return Service("prefect", url.removesuffix("/api"))


def start_mlflow_server(cfg: TuneloopConfig, timeout: float = 90) -> Service:
    """Start the MLflow UI/tracking server on 127.0.0.1 over the state dir's SQLite DB."""
    url = f"http://127.0.0.1:{cfg.mlflow.ui_port}"
    if not port_open("127.0.0.1", cfg.mlflow.ui_port):
        paths = state_paths(cfg)
        # Defaults are 15 processes and 3.2 GB; one worker and no job runner: ~500 MB.
        proc = _spawn(
            cfg,
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(cfg.mlflow.ui_port),
                "--workers",
                "1",
                "--backend-store-uri",
                tracking_uri(cfg),
                "--default-artifact-root",
                str(paths.mlflow_artifacts),
            ],
            {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        _wait_http(f"{url}/health", timeout, proc, "MLflow server", paths.services / "mlflow.log")
    return Service("mlflow", url)


def start_ray(cfg: TuneloopConfig, *, dashboard: bool = False, num_cpus: int | None = None) -> Service:
    """Start a Ray head node bound to 127.0.0.1 (dashboard on 127.0.0.1 when asked)."""
    address = ray_address(cfg)
    if not port_open("127.0.0.1", cfg.serve.ray_port):
        paths = state_paths(cfg)
        argv = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={cfg.serve.ray_port}",
            f"--temp-dir={paths.ray_tmp}",
            "--disable-usage-stats",
            f"--num-cpus={num_cpus or max(4, os.cpu_count() or 2)}",
            f"--include-dashboard={'true' if dashboard else 'false'}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={cfg.serve.dashboard_port}",
            f"--ray-client-server-port={cfg.serve.ray_port + 1}",
        ]
        logfile = paths.ensure().services / "ray.log"
        with logfile.open("ab") as out:
            # Token auth (RAY_AUTH_MODE=token, tuneloop.state): a token in ~/.ray the first time.
            subprocess.run(
                [str(BIN / "ray"), "get-auth-token", "--generate"],
                stdout=subprocess.DEVNULL,
                stderr=out,
                env=_env(cfg),
                timeout=60,
                check=True,
            )
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(cfg), timeout=180, check=False)
        if done.returncode:
            raise ServiceError(f"`ray start` failed with code {done.returncode}; see {logfile}")
    return Service("ray", address)


def stop_ray(cfg: TuneloopConfig) -> None:
    """Stop the Ray processes of this machine's user (Serve included)."""
    logfile = state_paths(cfg).ensure().services / "ray.log"
    with logfile.open("ab") as out:
        subprocess.run(
            [str(BIN / "ray"), "stop", "--force"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(cfg),
            timeout=120,
            check=False,
        )


def start_flow_runner(
    cfg: TuneloopConfig,
    config_path: Path,
    *,
    schedules: bool,
    overrides: list[str] = (),
    api_url: str | None = None,
    timeout: float = 120,
) -> Service:
    """Serve the training, promotion and monitoring deployments from a background runner.

    The runner loads the same config file and overrides as the caller, so a run started from
    the Prefect UI uses the caller's settings.
    """
    api = api_url or prefect_api_url(cfg)
    argv = [sys.executable, "-m", "flows.deployments", "--config", str(config_path)]
    if not schedules:
        argv.append("--no-schedules")
    argv += ["--", f"home={cfg.home}", *overrides]
    # Poll for scheduled runs every 2 s (default 10 s): `run_deployment` waits on it.
    proc = _spawn(cfg, "runner", argv, {"PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "2"})
    logfile = state_paths(cfg).services / "runner.log"
    deadline = time.monotonic() + timeout
    # Every deployment flows/deployments.py serves, not only the first registered: `up` returns
    # once all of them can be run.
    waiting = list(cfg.prefect.deployment_names)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"Flow runner exited with code {proc.returncode}; see {logfile}:\n" + logfile.read_text()[-2000:]
            )
        try:
            auth = prefect_auth()
            waiting = [
                n for n in waiting if httpx.get(f"{api}/deployments/name/{n}", timeout=5, auth=auth).status_code != 200
            ]
            if not waiting:
                return Service("runner", f"{api.removesuffix('/api')}/deployments")
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise ServiceError(f"Deployments {waiting} did not appear within {timeout:.0f} s; see {logfile}")


def apply_work_pool_deployments(
    cfg: TuneloopConfig,
    config_path: Path,
    *,
    overrides: list[str] = (),
    api_url: str | None = None,
    timeout: float = 600,
) -> Service:
    """Create the work pools and register prefect.yaml's deployments with the caller's config.

    Runs `python -m flows.deployments` (with `prefect.deployments: work_pools` it registers and
    exits), so this process imports no flow.
    """
    api = api_url or prefect_api_url(cfg)
    logfile = state_paths(cfg).ensure().services / "deploy.log"
    argv = [
        sys.executable,
        "-m",
        "flows.deployments",
        "--config",
        str(config_path),
        "--",
        f"home={cfg.home}",
        "prefect.deployments=work_pools",
        *overrides,
    ]
    with logfile.open("ab") as out:
        done = subprocess.run(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_env(cfg, {"PREFECT_API_URL": api}),
            cwd=str(REPO_ROOT),
            timeout=timeout,
            check=False,
        )
    if done.returncode:
        raise ServiceError(
            f"Registering prefect.yaml's deployments failed with code {done.returncode}; see "
            f"{logfile}:\n" + logfile.read_text()[-2000:]
        )
    return Service("deployments", f"{api.removesuffix('/api')}/deployments")


def start_worker(
    cfg: TuneloopConfig, pool: str = "tuneloop-process", *, api_url: str | None = None, timeout: float = 120
) -> Service:
    """Start a Prefect worker of the process pool on this machine; it runs flows from this checkout."""
    api = api_url or prefect_api_url(cfg)
    # Poll every 2 s (default 10 s): `run_deployment` waits on it. TUNELOOP_REPO_DIR: prefect.yaml's pull step.
    proc = _spawn(
        cfg,
        "worker",
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
        {"PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "2", "TUNELOOP_REPO_DIR": str(REPO_ROOT)},
    )
    logfile = state_paths(cfg).services / "worker.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"Prefect worker exited with code {proc.returncode}; see {logfile}:\n" + logfile.read_text()[-2000:]
            )
        try:
            r = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=5)
            if r.status_code == 200 and r.json():
                return Service("worker", f"{api.removesuffix('/api')}/work-pools/work-pool/{pool}")
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise ServiceError(f"No worker of pool {pool} reported within {timeout:.0f} s; see {logfile}")
