"""Deploy stage: apply a Serve config for registered versions, check every replica took it,
smoke-test a version, read what serves and how each arm of a canary is doing.

Serve is driven declaratively, as `serve deploy` drives it: the deploy task builds a Serve
config (tuneloop.servespec) and hands it to Serve's controller. Serve then
- calls `reconfigure` on the running replicas when only a deployment's `user_config`
  changed: adapters are hot-loaded or unloaded and routing changes, no replica restarts;
- replaces the replicas one by one (new ones first) when the application's args changed:
  a new base model.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from prefect import task

from tuneloop.config import ServeConfig, TuneloopConfig
from tuneloop.seams import CanaryVerdict, ReplicaInfo, Routing, ServedVersions, ServeSpec
from tuneloop.services import port_open

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """A version that could not be deployed or failed its smoke test."""


@dataclass
class SmokeResult:
    version: str
    answer: str
    latency_ms: float


@dataclass
class ServeState:
    """What the Serve application runs now, read back from Serve's controller."""

    config: dict[str, Any]  # the applied Serve config (schema of `serve deploy`)
    base_version: str  # the version whose base model (or full weights) the replicas run
    adapters: dict[str, str]
    routing: Routing

    @property
    def champion(self) -> str | None:
        return self.routing.champion or (next(iter(self.adapters), None) if self.adapters else None)


@dataclass
class ArmFigures:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    feedback: list[float] = field(default_factory=list)
    answered: int = 0  # status 200
    blocked: int = 0  # answers the output guardrails refused
    completion_tokens: int = 0
    cost: float | None = None  # from monitor.cost_per_1k_tokens; None: unpriced

    def metrics(self) -> dict[str, float]:
        out = {
            "requests": float(self.requests),
            "error_rate": self.errors / self.requests if self.requests else float("nan"),
        }
        if self.answered:
            out["blocked_rate"] = self.blocked / self.answered
            out["completion_tokens_mean"] = self.completion_tokens / self.answered
            if self.cost is not None:
                out["cost_per_1k_requests"] = self.cost / self.answered * 1000
        if self.latencies:
            lat = sorted(self.latencies)
            out["p50_latency_ms"] = statistics.median(lat)
            out["p95_latency_ms"] = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        if self.feedback:
            out["feedback_score"] = sum(self.feedback) / len(self.feedback)
        return out


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
    # A head that has just started (or a loaded machine) may not have registered its node yet:
    # ray.init then fails at once ("No node info found"); it is there a few seconds later.
    deadline = time.monotonic() + 90
    while True:
        try:
            ray.init(address=address, namespace="tuneloop", log_to_driver=False, logging_level="WARNING")
            break
        except ConnectionError as err:
            if time.monotonic() > deadline:
                raise DeployError(f"No Ray cluster answers at {address} ({err}); start one with `tuneloop up`") from err
            log.warning("Ray at %s is not ready (%s); retrying", address, err)
            time.sleep(2)
    _forget_serve_client()
    try:
        yield
    finally:
        ray.shutdown()
        _forget_serve_client()


def _forget_serve_client() -> None:
    """Serve caches its controller handle per process: after another cluster (a test's, or a
    restarted head) it would point at a dead actor ("Can't find actor … from a different cluster")."""
    try:
        from ray.serve.context import _set_global_client

        _set_global_client(None)
    except ImportError:  # a Ray without it: nothing cached to forget
        pass


def _controller() -> Any:
    # Serve's controller client: the object `serve deploy` (through the dashboard) and
    # `serve.run` use; Serve has no public Python call for a declarative config.
    from ray.serve.context import _get_global_client

    return _get_global_client()


@task(name="read-serving-version", retries=1, retry_delay_seconds=1)
def serving_version(cfg: ServeConfig) -> str | None:
    """Return the model version routed requests get now, or None when nothing serves."""
    try:
        r = httpx.get(f"{endpoint(cfg)}/readyz", timeout=5)  # no key needed, unlike /v1/models
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    ready = r.json()
    return (ready.get("routing") or {}).get("champion") or next(iter(ready.get("versions") or []), None)


def read_state(cfg: TuneloopConfig) -> ServeState | None:
    """The applied config of tuneloop's Serve application, or None when none runs."""
    from ray import serve

    app = serve.status().applications.get(cfg.serve.app_name)
    if app is None or app.status not in ("RUNNING", "DEPLOYING"):
        return None
    details = _controller().get_serve_details()
    applied = (details.get("applications") or {}).get(cfg.serve.app_name, {}).get("deployed_app_config")
    if not applied:
        return None
    deployments = {d["name"]: d for d in applied.get("deployments", [])}
    model_cfg = (deployments.get("ModelServer") or {}).get("user_config") or {}
    routing = (deployments.get("Gateway") or {}).get("user_config") or {}
    spec = ServeSpec.model_validate((applied.get("args") or {}).get("spec") or {})
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [applied],
    }
    return ServeState(
        config, spec.base_version, ServedVersions.model_validate(model_cfg).adapters, Routing.model_validate(routing)
    )


@task(name="apply-serve-config")
def apply_config(
    config: dict[str, Any], cfg: TuneloopConfig, expect_versions: list[str], timeout_s: float = 300
) -> None:
    """Hand `config` to Serve and return once every model replica serves `expect_versions`
    (or raise DeployError with what went wrong: a replica that failed to start, an adapter
    that failed to load)."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    try:
        _controller().deploy_apps(ServeDeploySchema.model_validate(config))
    except Exception as err:  # the controller's build task raises with the import's traceback
        raise DeployError(f"Serve refused the config: {err}"[:2000]) from err
    _wait_for_replicas(cfg, expect_versions, timeout_s)
    gateway = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Gateway")
    _wait_for_routing(cfg, Routing.model_validate(gateway["user_config"]), timeout_s=60)


def _wait_for_routing(cfg: TuneloopConfig, routing: Routing, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seen: Any = None
    while time.monotonic() < deadline:
        try:
            # /readyz, not /v1/models: it needs no key when the gateway wants one
            r = httpx.get(f"{endpoint(cfg.serve)}/readyz", timeout=10)
            seen = r.json().get("routing") if r.status_code == 200 else r.text[:200]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as err:
            seen = str(err)
        if isinstance(seen, dict) and seen == routing.public():
            return
        time.sleep(0.5)
    raise DeployError(f"The gateway did not take routing {routing} in {timeout_s:.0f} s (it reports {seen})")


def _wait_for_replicas(cfg: TuneloopConfig, versions: list[str], timeout_s: float) -> None:
    from ray import serve

    name = cfg.serve.app_name
    deadline = time.monotonic() + timeout_s
    problem = "not started"
    time.sleep(0.5)  # the controller takes the new target state asynchronously
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "DEPLOY_FAILED":
            # The deployment's message holds the replica's own error (its last traceback line first).
            details = [f"{n}: {d.message}" for n, d in app.deployments.items() if d.message]
            raise DeployError(f"Serve could not run the new config: {app.message} {' '.join(details)}"[:2000])
        model = app.deployments.get("ModelServer") if app is not None else None
        if app is not None and app.status == "RUNNING" and model is not None and model.status == "HEALTHY":
            running = model.replica_states.get("RUNNING", 0)
            seen = _replica_infos(name, max(8, 6 * running))
            failed = {v: why for info in seen.values() for v, why in info.failed.items() if v in versions}
            if failed:
                raise DeployError("; ".join(f"version {v} failed to load: {why}" for v, why in failed.items())[:2000])
            ready = [r for r, info in seen.items() if set(versions) <= set(info.versions)]
            if len(seen) >= running and len(ready) == len(seen):
                return
            problem = f"{len(ready)} of {running} replicas serve versions {versions}"
        elif app is not None:
            problem = f"application {app.status}: {app.message or ''}"[:500]
        time.sleep(1)
    raise DeployError(f"Serve did not apply the config in {timeout_s:.0f} s: {problem}")


def _replica_infos(app_name: str, calls: int) -> dict[str, ReplicaInfo]:
    """`info()` of the model replicas that answer `calls` requests, by replica id."""
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name).options(method_name="info")
    seen: dict[str, ReplicaInfo] = {}
    try:
        for response in [handle.remote() for _ in range(calls)]:
            try:
                info = response.result(timeout_s=30)
            except Exception as err:  # noqa: BLE001 - a replica going away while we ask
                log.debug("replica info failed: %s", err)
                continue
            seen[info.replica] = info
    finally:
        handle.shutdown()  # its router would go on probing the replicas after the driver leaves
    return seen


def replica_infos(cfg: TuneloopConfig, calls: int = 24) -> dict[str, ReplicaInfo]:
    return _replica_infos(cfg.serve.app_name, calls)


@task(name="smoke-test-endpoint")
def smoke_test(
    cfg: ServeConfig, model: str, expected_version: str, timeout_s: float = 90, api_key: str | None = None
) -> SmokeResult:
    """Ask the live endpoint one question as `model` until the expected version answers; raise if it never does.

    After a replacement, old replicas drain for a few seconds and may still answer meanwhile.
    """
    body = {"model": model, "messages": [{"role": "user", "content": cfg.smoke_prompt}], "max_tokens": 8}
    api_key = api_key or os.environ.get(cfg.client_key_env)  # a keyed gateway: tuneloop's own key
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{endpoint(cfg)}/v1/chat/completions", json=body, timeout=120, headers=headers)
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


def arm_figures(
    db_url: str, since: Any, arms: tuple[str, str], prices: dict[str, float] | None = None
) -> dict[str, ArmFigures]:
    """Requests, 5xx errors, latencies, feedback, guardrail blocks, tokens and cost (priced by version
    from `prices`, per 1k tokens, `*` for any) per arm, from the inference log since `since`."""
    from tuneloop.inferencelog import InferenceLog

    store = InferenceLog(db_url)
    try:
        rows = store.window(since=since, arms=list(arms))
        scores = store.feedback_for([r["id"] for r in rows])
    finally:
        store.close()
    out = {arm: ArmFigures() for arm in arms}
    for r in rows:
        fig = out[r["arm"]]
        fig.requests += 1
        if r["status"] >= 500:
            fig.errors += 1
        elif r["status"] == 200 and r["latency_ms"] is not None:
            fig.latencies.append(float(r["latency_ms"]))
        if r["status"] == 200:
            fig.answered += 1
            fig.blocked += bool({"pii_blocked", "toxicity_blocked"} & set((r.get("guardrail") or "").split(",")))
            tokens = (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
            fig.completion_tokens += r["completion_tokens"] or 0
            price = (prices or {}).get(str(r["model_version"]), (prices or {}).get("*"))
            if price is not None:
                fig.cost = (fig.cost or 0.0) + tokens / 1000 * price
        if r["id"] in scores:
            fig.feedback.append(scores[r["id"]])
    return out


@task(name="watch-canary")
def watch_canary(cfg: TuneloopConfig, since: Any, mode: str) -> CanaryVerdict:
    """Watch live traffic since `since` until the rollout window closes (and the challenger has
    `min_requests` answers, or `max_wait_s` passed); judge the arms by the rollout's rules."""
    from prefect import get_run_logger

    from tuneloop.gate import Figures, evaluate_rule, parse_rule
    from tuneloop.state import inference_db_url

    r = cfg.serve.rollout
    arm = "challenger" if mode == "canary" else "shadow"
    logger = get_run_logger()
    start = time.monotonic()
    while True:
        time.sleep(min(2.0, r.window_s))
        figs = arm_figures(inference_db_url(cfg), since, ("champion", arm), cfg.monitor.cost_per_1k_tokens)
        waited = time.monotonic() - start
        if (waited >= r.window_s and figs[arm].requests >= r.min_requests) or waited >= r.max_wait_s:
            break
        logger.info(
            "%s: %d challenger answers of %d needed, %.0f s of %.0f s",
            mode,
            figs[arm].requests,
            r.min_requests,
            waited,
            r.window_s,
        )
    cand, champ = figs[arm].metrics(), figs["champion"].metrics()
    figures = {"challenger": cand, "champion": champ}
    if figs[arm].requests < r.min_requests:
        note = (
            f"only {figs[arm].requests} challenger answers in {r.max_wait_s:.0f} s "
            f"(need {r.min_requests}): {r.on_no_traffic} on the smoke test alone"
        )
        return CanaryVerdict("promote" if r.on_no_traffic == "promote" else "rollback", "no_traffic", [], figures, note)
    flat = Figures.flat(cand, champ)
    # a figure the window does not have (no feedback yet, say) skips its rule
    results = [res for text in r.rules for res in evaluate_rule(parse_rule(text), flat, missing="skip")]
    decision = "rollback" if any(res.outcome == "fail" for res in results) else "promote"
    return CanaryVerdict(decision, "rules", results, figures)


@task(name="can-hot-load", retries=2, retry_delay_seconds=2)
def can_hot_load(model_name: str, serving_base_version: str, version: str) -> bool:
    """Whether `version` is a LoRA adapter of the base the replicas run, or a version derived from one
    (merged, GGUF: its own llama.cpp engine in the replica); then it is hot-loaded next to the
    champion. Otherwise it replaces the replicas."""
    import tempfile
    from pathlib import Path

    from tasks.registry import fetch_adapter
    from tuneloop.models import read_base_ref

    with tempfile.TemporaryDirectory() as tmp:
        new = fetch_adapter(f"models:/{model_name}/{version}", Path(tmp) / "new")
        old = fetch_adapter(f"models:/{model_name}/{serving_base_version}", Path(tmp) / "old")
        if not (old / "adapter").is_dir():
            return False
        if not (new / "adapter").is_dir() and not (new / "gguf").is_dir():  # derived: llama.cpp beside the base
            return False
        return read_base_ref(new).sha256 == read_base_ref(old).sha256


@task(name="publish-promotion")
def publish_promotion(
    heading: str, summary: str, figures: dict[str, dict[str, float]], lines: list[str], footer: str
) -> None:
    """The promotion's Prefect artifact: what happened, each arm's figures, the rules, where to look."""
    from prefect.artifacts import create_markdown_artifact

    from tuneloop.reports import Table, fmt

    table = ""
    if figures:
        keys = sorted({k for m in figures.values() for k in m})
        table = Table(["", *figures], [[k, *(fmt(figures[a].get(k)) for a in figures)] for k in keys]).markdown()
    rules = "".join(f"- `{line}`\n" for line in lines)
    create_markdown_artifact(
        key="promotion-result", markdown=f"## {heading}\n\n{summary}\n\n{table}\n{rules}\n{footer}"
    )
