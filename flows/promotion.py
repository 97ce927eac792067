"""Promotion flow: serve a registered version on Ray Serve, smoke-test it, then move the
`champion` alias to it — or roll back, leaving the old version serving and champion.

    tuneloop promote                 # the challenger (with none: re-serve the champion)
    tuneloop promote --version 3     # a given version

This flow is the only place that moves `champion`. A version the gate rejected (or whose
verdict it withheld) is refused before anything is deployed.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from serving.app import ServeSpec
from tasks.deploy import DeployError, deploy_version, endpoint, serving_version, smoke_test
from tasks.registry import ModelVersionRef, find_alias, promote_champion, tag_version, version_tags
from tuneloop.config import TuneloopConfig, load_config
from tuneloop.state import inference_db_url, ray_address, tracking_uri


@dataclass
class PromotionResult:
    serving: str  # the version that serves (and is champion) when the flow ends
    previous: str | None  # the version that served before
    endpoint: str
    smoke_answer: str
    previous_champion: str | None = None


def serve_spec(cfg: TuneloopConfig, version: str) -> ServeSpec:
    s = cfg.serve
    return ServeSpec(
        model_name=cfg.registry.model_name, model_uri=f"models:/{cfg.registry.model_name}/{version}",
        version=version, tracking_uri=tracking_uri(cfg), inference_db_url=inference_db_url(cfg),
        num_replicas=s.num_replicas, replica_cpus=s.replica_cpus, torch_threads=s.torch_threads,
        max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s,
        default_max_tokens=s.default_max_tokens, max_tokens_limit=s.max_tokens_limit,
    )


@flow(name="promotion-flow")
def promotion_flow(config: TuneloopConfig | None = None, version: str | None = None) -> PromotionResult:
    """Deploy `version` (default: the challenger, else the champion) to Ray Serve and make it champion;
    keep the old one serving if it fails."""
    cfg = config or load_config()
    logger = get_run_logger()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    name, reg = cfg.registry.model_name, cfg.registry
    target = (ModelVersionRef(name, version) if version
              else find_alias(name, reg.challenger_alias) or find_alias(name, reg.champion_alias))
    if target is None:
        raise DeployError(f"No version of {name} holds the {reg.challenger_alias!r} or {reg.champion_alias!r} "
                          "alias: train one that passes the gate, or give a version")
    gate = version_tags(target)
    if gate is None:
        raise DeployError(f"{name} has no version {target.version}")
    if gate.get("tuneloop.gate") in ("rejected", "withheld"):
        raise DeployError(f"Version {target.version} cannot become {reg.champion_alias}: the gate "
                          f"{gate.get('tuneloop.gate_reason', gate['tuneloop.gate'])}")
    address = ray_address(cfg)
    previous = serving_version(cfg.serve)
    try:
        deploy_version(serve_spec(cfg, target.version), cfg.serve, address)
        smoke = smoke_test(cfg.serve, name, target.version)
    except DeployError as err:
        logger.error("Version %s failed: %s", target.version, err)
        if previous:
            logger.warning("Rolling back to version %s", previous)
            deploy_version(serve_spec(cfg, previous), cfg.serve, address)
            smoke_test(cfg.serve, name, previous)
        tag_version(target, {"tuneloop.promotion": f"failed, rolled back to {previous}: {err}"[:5000]})
        raise
    tag_version(target, {"tuneloop.promotion": "serving"})
    old_champion = promote_champion(target, reg, f"served at {endpoint(cfg.serve)}, smoke test passed")
    logger.info("Version %s serves at %s and is %s (was v%s)", target.version, endpoint(cfg.serve),
                reg.champion_alias, old_champion)
    create_markdown_artifact(
        key="promotion-result",
        markdown=(f"## {name} v{target.version} serving, now {reg.champion_alias}\n\n"
                  f"Previously serving: {previous or 'none'}; previous {reg.champion_alias}: "
                  f"{old_champion or 'none'}\n\nEndpoint: `{endpoint(cfg.serve)}/v1/chat/completions`\n\n"
                  f"Smoke test ({smoke.latency_ms:.0f} ms): {cfg.serve.smoke_prompt!r} → {smoke.answer!r}"),
    )
    return PromotionResult(target.version, previous, endpoint(cfg.serve), smoke.answer, old_champion)


if __name__ == "__main__":
    promotion_flow()
