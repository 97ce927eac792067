"""What a Ray Serve deployment of tuneloop is built with, from the config and the registry.

    spec = serve_spec(cfg, base_version="3")       # the ServeSpec both deployments get
    config = serve_config(cfg, {"spec": spec.model_dump(mode="json")},
                          ServedVersions(adapters={"3": ..., "4": ...}, default="3"),
                          Routing(champion="3", challenger="4", mode="canary", share=0.1))
    # -> a Serve config (what `serve deploy` reads; infra/serve/serve-config.yaml is one)

Shared by the deploy task (which applies the config through Serve's controller) and
`serving.app.app_builder` (a Serve config file naming a tuneloop config). API keys from the
environment are hashed here, before anything reaches Ray.
"""

from __future__ import annotations

import os
from typing import Any

from tuneloop.apikeys import keys_from_env
from tuneloop.config import ApiKeyConfig, TuneloopConfig
from tuneloop.seams import EngineSpec, GatewaySpec, Routing, ServedVersions, ServeSpec

IMPORT_PATH = "serving.app:app_builder"
MODEL_DEPLOYMENT = "ModelServer"
GATEWAY_DEPLOYMENT = "Gateway"


def champion_version(cfg: TuneloopConfig) -> str:
    from mlflow import MlflowClient

    from tuneloop.state import tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    return str(client.get_model_version_by_alias(cfg.registry.model_name, cfg.registry.champion_alias).version)


def keys_required(cfg: TuneloopConfig) -> bool:
    """Whether the gateway will want a key: keys configured (config or environment), or required."""
    s = cfg.serve
    return s.require_api_key or bool(s.api_keys) or s.api_keys_file is not None or bool(os.environ.get(s.api_keys_env))


def serve_spec(cfg: TuneloopConfig, base_version: str | None = None) -> ServeSpec:
    """The deployments' static settings; `base_version` (default: the champion) picks the base model."""
    from tuneloop.state import collections_location, inference_db_url, tracking_uri

    s, name = cfg.serve, cfg.registry.model_name
    version = base_version or champion_version(cfg)
    keys = [*s.api_keys, *(ApiKeyConfig.model_validate(k) for k in keys_from_env(os.environ.get(s.api_keys_env)))]
    return ServeSpec(
        model_name=name,
        base_uri=f"models:/{name}/{version}",
        champion_alias=cfg.registry.champion_alias,
        tracking_uri=tracking_uri(cfg),
        inference_db_url=inference_db_url(cfg),
        engine=EngineSpec(
            torch_threads=s.torch_threads,
            max_batch_size=s.max_batch_size,
            batch_wait_timeout_s=s.batch_wait_timeout_s,
            merge_default=s.merge_default,
            prefix_cache=s.prefix_cache,
            max_prompt_tokens=s.max_prompt_tokens,
            max_new_tokens=s.max_tokens_limit,
            dtype=s.dtype,
            attn_implementation=s.attn_implementation,
        ),
        gateway=GatewaySpec(
            default_max_tokens=s.default_max_tokens,
            max_tokens_limit=s.max_tokens_limit,
            max_n=s.max_n,
            max_request_bytes=s.max_request_bytes,
            require_api_key=s.require_api_key,
            api_keys=keys,
            api_keys_file=str(s.api_keys_file.resolve()) if s.api_keys_file else None,
            rate_per_minute=s.rate_per_minute,
            burst=s.burst,
            log_pii=s.log_pii,
            pii_entities=list(s.pii_entities),
            guardrails=s.guardrails,
            collections_root=str(collections_location(cfg)),
        ),
    )


def model_deployment(cfg: TuneloopConfig) -> dict[str, Any]:
    """Replicas, resources and autoscaling of the model deployment, from `serve.*`."""
    s = cfg.serve
    actor: dict[str, Any] = {"num_cpus": s.replica_cpus, **({"num_gpus": s.replica_gpus} if s.replica_gpus else {})}
    out: dict[str, Any] = {"name": MODEL_DEPLOYMENT, "ray_actor_options": actor}
    if s.autoscaling is not None:
        out["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        out["num_replicas"] = s.num_replicas
    return out


def serve_config(
    cfg: TuneloopConfig,
    app_args: dict[str, Any],
    versions: ServedVersions | None = None,
    routing: Routing | None = None,
) -> dict[str, Any]:
    """A Serve config (the schema of `serve deploy`) for the tuneloop application."""
    s = cfg.serve
    versions = versions or ServedVersions()
    model = model_deployment(cfg)
    model["user_config"] = versions.model_dump(mode="json")
    routing = routing or Routing.only(versions.default)
    gateway = {
        "name": GATEWAY_DEPLOYMENT,
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": s.gateway_cpus},
        "user_config": routing.model_dump(mode="json"),
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": s.host, "port": s.port},
        "applications": [
            {
                "name": s.app_name,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": app_args,
                "deployments": [model, gateway],
            }
        ],
    }
