"""Deploy stage: run a registered version on Ray Serve, smoke-test it, read what serves."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from prefect import task

from serving.app import ServeSpec, build_app
from tuneloop.config import ServeConfig
from tuneloop.services import port_open

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """A version that could not be deployed or failed its smoke test."""


@dataclass
class SmokeResult:
    version: str
    answer: str
    latency_ms: float


def endpoint(cfg: ServeConfig) -> str:
    return f"http://{cfg.host}:{cfg.port}"


@contextmanager
def ray_client(address: str) -> Iterator[None]:
    """Attach this process to the Ray cluster for the block (Serve apps outlive the driver)."""
    import ray

    if ray.is_initialized():
        yield
        return
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and not port_open(host, int(port)):  # ray.init would retry for a minute
        raise DeployError(f"No Ray cluster answers at {address}; start one with `tuneloop up`")
    try:
        ray.init(address=address, namespace="tuneloop", log_to_driver=False, logging_level="WARNING")
    except ConnectionError as err:
        raise DeployError(f"No Ray cluster answers at {address} ({err}); start one with `tuneloop up`") from err
    try:
        yield
    finally:
        ray.shutdown()


@task(name="read-serving-version", retries=1, retry_delay_seconds=1)
def serving_version(cfg: ServeConfig) -> str | None:
    """Return the model version the live endpoint serves, or None when nothing serves."""
    try:
        r = httpx.get(f"{endpoint(cfg)}/v1/models", timeout=5)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return r.json()["data"][0].get("version")


@task(name="deploy-to-ray-serve")
def deploy_version(spec: ServeSpec, cfg: ServeConfig, ray_address: str, timeout_s: float = 300) -> None:
    """Run `spec` as the Serve application and return once Serve runs it (or raise).

    Serve starts the new replicas before it stops the old ones (max_surge_percent), so a
    version whose replicas cannot start never takes the old one's traffic.
    """
    from ray import serve

    with ray_client(ray_address):
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        def submit() -> None:
            try:
                serve.run(build_app(spec), name=cfg.app_name, route_prefix="/")
            except Exception as err:  # Serve raises RuntimeError subclasses with the replica's traceback
                raise DeployError(f"Version {spec.version} failed to start on Ray Serve: {err}"[:2000]) from err

        submit()
        # `serve.run` hands the new config to the controller and may return while the old
        # version still reads RUNNING; the driver must stay attached until the controller
        # has applied it (the config is an object this driver owns).
        _wait_until_serving(spec, cfg, timeout_s, submit)
    log.info("Serving %s v%s at %s", spec.model_name, spec.version, endpoint(cfg))


def _wait_until_serving(spec: ServeSpec, cfg: ServeConfig, timeout_s: float, resubmit: Callable[[], None]) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    resubmit_at = time.monotonic() + 30
    while time.monotonic() < deadline:
        app = serve.status().applications.get(cfg.app_name)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise DeployError(f"Version {spec.version} failed to start on Ray Serve: {app.message}"[:2000])
        current = serving_version.fn(cfg)
        if app is not None and app.status == "RUNNING" and current == spec.version:
            return
        if app is not None and app.status == "RUNNING" and time.monotonic() > resubmit_at:
            # Seen here: an update submitted right after another process's deploy was
            # acknowledged but never applied; submitting it again applies it.
            log.warning("Serve still runs v%s, not v%s: submitting the update again (%s)",
                        current, spec.version, app)
            resubmit()
            resubmit_at = time.monotonic() + 30
        time.sleep(1)
    raise DeployError(f"Version {spec.version} was not running on Ray Serve after {timeout_s:.0f} s")


@task(name="smoke-test-endpoint")
def smoke_test(cfg: ServeConfig, model_name: str, expected_version: str, timeout_s: float = 90) -> SmokeResult:
    """Ask the live endpoint one question until the expected version answers; raise if it never does.

    `serve.run` returns once the new replicas are up; old-version replicas drain for a few
    seconds after, and may still answer meanwhile.
    """
    body = {"model": model_name, "messages": [{"role": "user", "content": cfg.smoke_prompt}], "max_tokens": 8}
    deadline = time.monotonic() + timeout_s
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{endpoint(cfg)}/v1/chat/completions", json=body, timeout=120)
        except httpx.HTTPError as err:
            problem = f"{endpoint(cfg)} unreachable: {err}"
        else:
            if r.status_code == 200:
                data = r.json()
                version = data["system_fingerprint"].removeprefix("v")
                if version == str(expected_version):
                    latency = r.elapsed.total_seconds() * 1000
                    return SmokeResult(version, data["choices"][0]["message"]["content"], latency)
                problem = f"version {version} answered, expected {expected_version}"
            else:
                problem = f"HTTP {r.status_code}: {r.text[:500]}"
        time.sleep(1)
    raise DeployError(f"Smoke test: {problem} (after {timeout_s:.0f} s)")
