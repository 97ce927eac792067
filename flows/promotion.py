"""Promotion flow: serve a registered version on Ray Serve, smoke-test it, or roll back.

    tuneloop promote                 # the current champion
    tuneloop promote --version 3     # a given version
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from serving.app import ServeSpec
from tasks.deploy import DeployError, deploy_version, endpoint, serving_version, smoke_test
from tasks.registry import ModelVersionRef, find_champion, tag_version
from tuneloop.config import TuneloopConfig, load_config
from tuneloop.state import inference_db_url, ray_address, tracking_uri


@dataclass
class PromotionResult:
    serving: str  # the version that serves when the flow ends
    previous: str | None
    endpoint: str
    smoke_answer: str


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
    """Deploy `version` (default: the champion) to Ray Serve; keep the old one if it fails."""
    cfg = config or load_config()
    logger = get_run_logger()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    name = cfg.registry.model_name
    target = ModelVersionRef(name, version) if version else find_champion(cfg.registry)
    if target is None:
        raise DeployError(f"No version of {name} holds the {cfg.registry.champion_alias!r} alias: train one first")
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
    logger.info("Version %s serves at %s (was %s)", target.version, endpoint(cfg.serve), previous)
    create_markdown_artifact(
        key="promotion-result",
        markdown=(f"## {name} v{target.version} serving\n\nPrevious: {previous or 'none'}\n\n"
                  f"Endpoint: `{endpoint(cfg.serve)}/v1/chat/completions`\n\n"
                  f"Smoke test ({smoke.latency_ms:.0f} ms): {cfg.serve.smoke_prompt!r} → {smoke.answer!r}"),
    )
    return PromotionResult(target.version, previous, endpoint(cfg.serve), smoke.answer)


if __name__ == "__main__":
    promotion_flow()
