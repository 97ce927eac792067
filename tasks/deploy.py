"""Deploy stage: run a registered version on Ray Serve, smoke-test it, read what serves."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from prefect import task

from serving.app import ServeSpec, build_app
from tuneloop.config import ServeConfig

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
    ray.init(address=address, namespace="tuneloop", log_to_driver=False, logging_level="WARNING")
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
def deploy_version(spec: ServeSpec, cfg: ServeConfig, ray_address: str) -> None:
    """Run `spec` as the Serve application (rolling update; new replicas before old stop)."""
    from ray import serve

    with ray_client(ray_address):
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        try:
            serve.run(build_app(spec), name=cfg.app_name, route_prefix="/")
        except Exception as err:  # Serve raises RuntimeError subclasses with the replica's traceback
            raise DeployError(f"Version {spec.version} failed to start on Ray Serve: {err}"[:2000]) from err
    log.info("Serving %s v%s at %s", spec.model_name, spec.version, endpoint(cfg))


@task(name="smoke-test-endpoint", retries=2, retry_delay_seconds=2)
def smoke_test(cfg: ServeConfig, model_name: str, expected_version: str) -> SmokeResult:
    """Ask the live endpoint one question; raise unless the expected version answers."""
    body = {"model": model_name, "messages": [{"role": "user", "content": cfg.smoke_prompt}], "max_tokens": 8}
    try:
        r = httpx.post(f"{endpoint(cfg)}/v1/chat/completions", json=body, timeout=120)
    except httpx.HTTPError as err:
        raise DeployError(f"Smoke test: {endpoint(cfg)} unreachable: {err}") from err
    if r.status_code != 200:
        raise DeployError(f"Smoke test: HTTP {r.status_code}: {r.text[:500]}")
    data = r.json()
    version = data["system_fingerprint"].removeprefix("v")
    if version != str(expected_version):
        raise DeployError(f"Smoke test: version {version} answered, expected {expected_version}")
    latency = r.elapsed.total_seconds() * 1000
    return SmokeResult(version, data["choices"][0]["message"]["content"], latency)


@task(name="shutdown-serve-app")
def shutdown_app(cfg: ServeConfig, ray_address: str) -> None:
    """Delete the Serve application."""
    from ray import serve

    with ray_client(ray_address):
        serve.delete(cfg.app_name)
