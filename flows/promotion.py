"""Promotion flow: serve a registered version next to the champion, smoke-test it, give it a
canary share of live traffic (or a shadow copy), compare the two arms, then promote it —
move the `champion` alias, route all traffic to it — or roll back automatically.

    tuneloop promote                 # the challenger (with none: re-serve the champion)
    tuneloop promote --version 3     # a given version

A version that shares the serving base model is hot-loaded into the running replicas (Serve
`reconfigure`, no restart) and rolled out by `serve.rollout` (canary | shadow | direct).
A version on another base model (or fully fine-tuned) replaces the replicas one by one,
smoke-tested, with the old replicas serving until the new ones run.

This flow is the only place that moves `champion`. A version the gate did not pass (rejected,
withheld, or no verdict at all) is refused before anything is deployed. Every promotion is an MLflow run
in `registry.promotion_experiment` (each arm's figures, the rules, the decision) and a
Prefect artifact; a rolled-back version is tagged with the reason and the flow run fails.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

import mlflow
from prefect import flow, get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from tasks.deploy import (
    DeployError,
    ServeState,
    apply_config,
    can_hot_load,
    endpoint,
    publish_promotion,
    ray_client,
    read_state,
    smoke_test,
    watch_canary,
)
from tasks.modelcard import record_promoter
from tasks.prompts import parse_ref, prompt_tags, record_prompt_promotion, resolve_prompt
from tasks.registry import (
    ModelVersionRef,
    find_alias,
    model_lock,
    promote_champion,
    record_promotion,
    tag_version,
    version_tags,
)
from tuneloop.config import TuneloopConfig, load_config
from tuneloop.prompts import PromptSpec
from tuneloop.seams import Routing, RoutingMode, ServedVersions
from tuneloop.servespec import keys_required, serve_config, serve_spec
from tuneloop.state import ray_address, tracking_uri


class Approval(RunInput):
    """The form a reviewer fills in the Prefect UI (the paused promotion's flow run page)."""

    approve: bool = Field(description="Serve this version (canary first) and make it champion if it holds")
    reviewer: str = Field(min_length=1, max_length=200, description="Your name or id: recorded as who approved")
    reason: str = Field("", max_length=2000, description="Why: recorded with the version")


def await_approval(cfg: TuneloopConfig, target: ModelVersionRef) -> str | None:
    """A person approves or rejects before anything is deployed (registry.approval); return who
    approved, None when no approval is asked. A rejection or no answer in time raises DeployError."""
    reg = cfg.registry
    wanted = reg.approval == "always" or (reg.approval == "auto" and reg.on_gate_pass == "register_only")
    champion = find_alias(reg.model_name, reg.champion_alias)
    if not wanted or (champion is not None and champion.version == target.version):
        return None
    logger = get_run_logger()
    logger.warning(
        "v%s waits for approval: open this flow run in the Prefect UI and fill its form (within %d s)",
        target.version,
        reg.approval_timeout_s,
    )
    try:
        answer = pause_flow_run(wait_for_input=Approval, timeout=reg.approval_timeout_s, poll_interval=2)
    except FlowPauseTimeout:
        raise DeployError(f"v{target.version}: nobody approved it within {reg.approval_timeout_s} s") from None
    verdict = "approved" if answer.approve else "rejected"
    tag_version(target, {"tuneloop.approval": f"{verdict} by {answer.reviewer}: {answer.reason}"[:5000]})
    if not answer.approve:
        raise DeployError(f"v{target.version} was rejected by {answer.reviewer}: {answer.reason or 'no reason given'}")
    logger.info("v%s approved by %s: %s", target.version, answer.reviewer, answer.reason)
    return answer.reviewer


class PromotionRolledBack(DeployError):
    """The challenger lost its canary (or shadow) comparison; the champion serves all traffic."""


@dataclass
class PromotionResult:
    serving: str  # the version that serves (and is champion) when the flow ends
    previous: str | None  # the version that served before
    endpoint: str
    smoke_answer: str
    previous_champion: str | None = None
    strategy: str = "direct"  # hot-load + canary / shadow / direct, or replace (new base)
    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)


def _uri(cfg: TuneloopConfig, version: str) -> str:
    return f"models:/{cfg.registry.model_name}/{version}"


def _routing(
    champion: str,
    challenger: str | None = None,
    mode: RoutingMode = "off",
    share: float = 0.0,
    prompt: PromptSpec | None = None,
    challenger_prompt: PromptSpec | None = None,
) -> Routing:
    return Routing(
        champion=champion,
        challenger=challenger,
        mode=mode,
        share=share,
        prompt=prompt,
        challenger_prompt=challenger_prompt,
    )


def check_prompt_match(
    cfg: TuneloopConfig, version: str, tags: dict[str, str], prompt: PromptSpec | None
) -> str | None:
    """Whether `version` would serve with the prompt it was trained and gated with. A mismatch is a
    warning (returned, recorded with the promotion) or, with registry.prompt_mismatch=error, a refusal."""
    trained = tags.get("tuneloop.prompt_sha256")
    if trained == (prompt.sha256 if prompt else None):
        return None
    message = (
        f"v{version} was trained and gated with {tags.get('tuneloop.prompt_version') or 'no prompt'} and would "
        f"serve with {prompt.ref if prompt else 'no prompt'}"
    )
    if cfg.registry.prompt_mismatch == "error":
        raise DeployError(f"{message} (registry.prompt_mismatch=error)")
    get_run_logger().warning("%s: its gate figures do not cover this pairing", message)
    return f"warning: {message}"


def bound_prompt(cfg: TuneloopConfig, state: ServeState | None) -> PromptSpec | None:
    """The chat route's prompt version for a model promotion: the one serving (a model promotion
    never changes it: `tuneloop prompt promote` does), else `serve.prompt` on a first deployment."""
    serving = state.routing.prompt if state is not None else None
    if serving is not None:
        if cfg.serve.prompt and parse_ref(cfg.serve.prompt)[0] != serving.name:
            get_run_logger().warning(
                "serve.prompt names %s but %s serves: prompt changes go through `tuneloop prompt promote`",
                cfg.serve.prompt,
                serving.ref,
            )
        return serving
    return resolve_prompt(cfg, cfg.serve.prompt) if cfg.serve.prompt else None


def _config(cfg: TuneloopConfig, base_version: str, adapters: list[str], routing: Routing) -> dict:
    spec = serve_spec(cfg, base_version)
    return serve_config(
        cfg,
        {"spec": spec.model_dump(mode="json")},
        ServedVersions(adapters={v: _uri(cfg, v) for v in adapters}, default=routing.champion),
        routing,
    )


@flow(name="promotion-flow")
def promotion_flow(config: TuneloopConfig | None = None, version: str | None = None) -> PromotionResult:
    """Deploy `version` (default: the challenger, else the champion), compare it live with the
    champion, and promote it or roll back; the champion keeps serving whenever it fails."""
    cfg = config or load_config()
    logger = get_run_logger()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    name, reg = cfg.registry.model_name, cfg.registry
    target = (
        ModelVersionRef(name, version)
        if version
        else find_alias(name, reg.challenger_alias) or find_alias(name, reg.champion_alias)
    )
    if target is None:
        raise DeployError(
            f"No version of {name} holds the {reg.challenger_alias!r} or {reg.champion_alias!r} "
            "alias: train one that passes the gate, or give a version"
        )
    if keys_required(cfg) and not os.environ.get(cfg.serve.client_key_env):
        raise DeployError(
            f"The gateway wants an API key and {cfg.serve.client_key_env} is not set: the smoke test could "
            f"not authenticate. Set it to a key with the infer scope (`tuneloop api-key new`)"
        )
    gate = version_tags(target)
    if gate is None:
        raise DeployError(f"{name} has no version {target.version}")
    if gate.get("tuneloop.gate") != "passed":  # fail closed: no verdict is no pass
        verdict = gate.get("tuneloop.gate")
        why = gate.get("tuneloop.gate_reason", verdict) if verdict else "has no verdict for it (tag tuneloop.gate)"
        raise DeployError(f"Version {target.version} cannot become {reg.champion_alias}: the gate {why}")
    if parent := gate.get("tuneloop.derived_from"):  # a derived version stands on its parent's gate too
        parent_tags = version_tags(ModelVersionRef(name, parent.rsplit("/", 1)[-1])) or {}
        if parent_tags.get("tuneloop.gate") != "passed":
            why = parent_tags.get("tuneloop.gate_reason", "has no verdict (tag tuneloop.gate)")
            raise DeployError(
                f"Version {target.version} cannot become {reg.champion_alias}: it is derived from {parent}, "
                f"whose gate {why}"
            )
    approved_by = await_approval(cfg, target)  # before the lock: a waiting review holds nothing
    # One promotion at a time per model; a promotion that died mid-canary left its split behind:
    # the next one (or `tuneloop up`, which re-serves the champion through here) settles it first.
    with model_lock("promotion", tracking_uri(cfg), name, reg.promotion_lock_timeout_s), ray_client(ray_address(cfg)):
        state = settle_interrupted(cfg, read_state(cfg))
        prompt = bound_prompt(cfg, state)
        mismatch = check_prompt_match(cfg, target.version, gate, prompt)
        share = 1.0  # the new version's share of routed traffic while it was compared
        if state is not None and state.champion == target.version:
            strategy = "already serving"
            smoke = smoke_test(cfg.serve, name, target.version)
            figures, lines = {}, []
        elif state is not None and can_hot_load(cfg.registry.model_name, state.base_version, target.version):
            strategy, smoke, figures, lines = _hot_rollout(cfg, state, target, prompt)
            share = _canary_share(cfg)
        else:
            strategy, smoke, figures, lines = "replace", _replace(cfg, state, target, prompt), {}, []
    previous = state.champion if state else None
    lines = [*lines, *([mismatch] if mismatch else [])]
    reason = f"{strategy}: served at {endpoint(cfg.serve)}, smoke test passed" + (
        f"; {'; '.join(lines)}" if lines else ""
    )
    run_id = record_promotion(
        cfg.registry.promotion_experiment, target, previous, strategy, "promoted", reason, figures, lines, share
    )
    tag_version(target, {"tuneloop.promotion": "serving", "tuneloop.promotion_run": run_id})
    old_champion = promote_champion(target, reg, reason[:4000])
    record_promoter(name, target.version, strategy, reason, approved_by)  # who or what: the card and a tag
    logger.info(
        "Version %s serves at %s and is %s (was v%s)",
        target.version,
        endpoint(cfg.serve),
        reg.champion_alias,
        old_champion,
    )
    publish_promotion(
        f"{name} v{target.version} serving, now {reg.champion_alias}",
        f"Strategy: **{strategy}**. Previously serving: {previous or 'none'}; previous "
        f"{reg.champion_alias}: {old_champion or 'none'}",
        figures,
        lines,
        f"Endpoint: `{endpoint(cfg.serve)}/v1/chat/completions`; MLflow run `{run_id}`\n\n"
        f"Smoke test ({smoke.latency_ms:.0f} ms): {cfg.serve.smoke_prompt!r} → {smoke.answer!r}",
    )
    return PromotionResult(
        target.version, previous, endpoint(cfg.serve), smoke.answer, old_champion, strategy, figures, lines
    )


def settle_interrupted(cfg: TuneloopConfig, state: ServeState | None) -> ServeState | None:
    """Roll back what a promotion killed mid-canary (or mid-shadow) left: a challenger still
    loaded and routed. The champion of the routing table gets all traffic again, the stale
    challenger is recorded as rolled back. Return the state as it now is."""
    if state is None or (state.routing.challenger is None and state.routing.mode == "off"):
        return state
    logger = get_run_logger()
    champion, stale = state.routing.champion, state.routing.challenger
    logger.warning(
        "A promotion of v%s was interrupted mid-%s: rolling back to v%s", stale, state.routing.mode, champion
    )
    prompt = state.routing.prompt  # the champion's prompt; a challenger prompt is dropped with its arm
    apply_config(_config(cfg, state.base_version, [champion], _routing(champion, prompt=prompt)), cfg, [champion])
    if stale is not None:
        reason = f"the promotion was interrupted during its {state.routing.mode}; rolled back by the next promotion"
        _rolled_back(cfg, ModelVersionRef(cfg.registry.model_name, stale), champion, "interrupted", reason, {}, [])
    return read_state(cfg)


def _replace(cfg: TuneloopConfig, state: ServeState | None, target: ModelVersionRef, prompt: PromptSpec | None):
    """New replicas for the target alone (first deployment, or another base model)."""
    logger = get_run_logger()
    try:
        routing = _routing(target.version, prompt=prompt)
        apply_config(_config(cfg, target.version, [target.version], routing), cfg, [target.version])
        return smoke_test(cfg.serve, cfg.registry.model_name, target.version)
    except DeployError as err:
        logger.error("Version %s failed: %s", target.version, err)
        if state is not None:
            logger.warning("Rolling back to version %s", state.champion)
            apply_config(state.config, cfg, list(state.adapters) or [state.base_version])
            smoke_test(cfg.serve, cfg.registry.model_name, state.champion)
        _rolled_back(cfg, target, state.champion if state else None, "replace", str(err), {}, [])
        raise


def _hot_rollout(cfg: TuneloopConfig, state: ServeState, target: ModelVersionRef, prompt: PromptSpec | None):
    """Hot-load the target next to the champion, smoke-test it pinned, canary/shadow, decide."""
    logger = get_run_logger()
    r = cfg.serve.rollout
    champion, new = state.champion, target.version
    both = [new, champion]
    strategy = f"hot-load + {r.mode}"
    lines: list[str] = []
    figures: dict = {}
    try:
        apply_config(_config(cfg, state.base_version, both, _routing(champion, new, prompt=prompt)), cfg, both)
        smoke = smoke_test(cfg.serve, f"{cfg.registry.model_name}:{new}", new)
        if r.mode != "direct":
            since = dt.datetime.now(dt.UTC)
            routing = _routing(champion, new, r.mode, r.share, prompt=prompt)
            apply_config(_config(cfg, state.base_version, both, routing), cfg, both)
            logger.info(
                "%s: v%s gets %s of routed traffic for ≥ %.0f s",
                r.mode,
                new,
                f"{r.share:.0%}" if r.mode == "canary" else "a shadow copy",
                r.window_s,
            )
            verdict = watch_canary(cfg, since, r.mode)
            figures = verdict.figures
            lines = [rule.line() for rule in verdict.rules] or [verdict.note]
            if verdict.decision == "rollback":
                raise PromotionRolledBack(f"v{new} lost the {r.mode} comparison: {verdict.reason()}")
        # Promote: everything to the new version; the old champion stays loaded for a fast rollback.
        apply_config(_config(cfg, state.base_version, both, _routing(new, prompt=prompt)), cfg, both)
        smoke = smoke_test(cfg.serve, cfg.registry.model_name, new)
        return strategy, smoke, figures, lines
    except DeployError as err:
        logger.error("Version %s rolled back: %s", new, err)
        apply_config(_config(cfg, state.base_version, [champion], _routing(champion, prompt=prompt)), cfg, [champion])
        _rolled_back(cfg, target, champion, strategy, str(err), figures, lines, _canary_share(cfg))
        raise


def _canary_share(cfg: TuneloopConfig) -> float:
    r = cfg.serve.rollout
    return r.share if r.mode == "canary" else 1.0


def _rolled_back(
    cfg: TuneloopConfig,
    target: ModelVersionRef,
    champion: str | None,
    strategy: str,
    reason: str,
    figures: dict,
    lines: list[str],
    share: float = 1.0,
) -> None:
    run_id = record_promotion(
        cfg.registry.promotion_experiment, target, champion, strategy, "rolled back", reason, figures, lines, share
    )
    tag_version(
        target, {"tuneloop.promotion": f"rolled back to {champion}: {reason}"[:5000], "tuneloop.promotion_run": run_id}
    )
    publish_promotion(
        f"{cfg.registry.model_name} v{target.version} rolled back",
        f"v{champion or 'none'} keeps serving all traffic. Reason: {reason}",
        figures,
        lines,
        f"MLflow run `{run_id}`",
    )


@dataclass
class PromptPromotionResult:
    serving: str  # the prompt version (name/version) the chat route renders when the flow ends
    previous: str | None
    strategy: str
    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)


@flow(name="prompt-promotion-flow")
def prompt_promotion_flow(
    config: TuneloopConfig | None = None, prompt: str = "", allow_new_variables: bool = False
) -> PromptPromotionResult:
    """Serve a prompt version on the chat route exactly as a model version is promoted: a canary
    share (or a shadow copy) of routed traffic is rendered with it, the arms are compared by
    `serve.rollout.rules`, and it is promoted (the prompt's champion alias moved, all traffic) or
    rolled back. The model version does not change and no replica reloads: the gateway renders.
    A prompt whose variables differ from the serving one's is refused (clients would get 400s)
    unless `allow_new_variables`."""
    cfg = config or load_config()
    logger = get_run_logger()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    if not prompt:
        raise DeployError("Name the prompt version to promote: name/VERSION or name@alias")
    candidate = resolve_prompt(cfg, prompt)
    gate = prompt_tags(cfg, candidate)
    if gate.get("tuneloop.gate") != "passed":  # fail closed, as for model versions
        why = gate.get("tuneloop.gate_reason") or "has no verdict for it (run `tuneloop prompt evaluate`)"
        raise DeployError(f"Prompt {candidate.ref} cannot serve: the gate {why}")
    r = cfg.serve.rollout
    lock = model_lock("promotion", tracking_uri(cfg), cfg.registry.model_name, cfg.registry.promotion_lock_timeout_s)
    with lock, ray_client(ray_address(cfg)):
        state = settle_interrupted(cfg, read_state(cfg))
        if state is None or state.champion is None:
            raise DeployError("Nothing serves: promote a model version first (`tuneloop promote`)")
        current, champion = state.routing.prompt, state.champion
        if current is not None and current.sha256 == candidate.sha256:
            return PromptPromotionResult(candidate.ref, current.ref, "already serving")
        wanted = current.variables if current is not None else []
        if candidate.variables != wanted and not allow_new_variables:
            raise DeployError(
                f"{candidate.ref} takes the variables {candidate.variables or 'none'}, the serving prompt "
                f"{wanted or 'none'}: clients would get 400s. Keep the variables, or change clients first"
            )
        mismatch = check_prompt_match(
            cfg, champion, version_tags(ModelVersionRef(cfg.registry.model_name, champion)) or {}, candidate
        )
        adapters = list(state.adapters) or [champion]
        strategy, figures, lines = f"prompt {r.mode}", {}, []
        try:
            if r.mode != "direct":
                since = dt.datetime.now(dt.UTC)
                routing = _routing(champion, None, r.mode, r.share, current, candidate)
                apply_config(_config(cfg, state.base_version, adapters, routing), cfg, adapters)
                logger.info("%s: prompt %s against %s", r.mode, candidate.ref, current.ref if current else "none")
                verdict = watch_canary(cfg, since, r.mode)
                figures = verdict.figures
                lines = [rule.line() for rule in verdict.rules] or [verdict.note]
                if verdict.decision == "rollback":
                    raise PromotionRolledBack(f"{candidate.ref} lost the {r.mode} comparison: {verdict.reason()}")
            apply_config(
                _config(cfg, state.base_version, adapters, _routing(champion, prompt=candidate)), cfg, adapters
            )
            if not candidate.variables:  # a prompt with variables needs a client that sends them
                smoke_test(cfg.serve, cfg.registry.model_name, champion)
        except DeployError as err:
            logger.error("Prompt %s rolled back: %s", candidate.ref, err)
            routing = _routing(champion, prompt=current)
            apply_config(_config(cfg, state.base_version, adapters, routing), cfg, adapters)
            record_prompt_promotion(cfg, candidate, current, strategy, "rolled back", str(err), figures, lines)
            raise
    lines = [*lines, *([mismatch] if mismatch else [])]
    reason = f"{strategy}: the chat route renders {candidate.ref}" + (f"; {'; '.join(lines)}" if lines else "")
    run_id = record_prompt_promotion(cfg, candidate, current, strategy, "promoted", reason, figures, lines)
    publish_promotion(
        f"prompt {candidate.ref} serving, now {cfg.registry.champion_alias}",
        f"Strategy: **{strategy}**. Previously: {current.ref if current else 'no prompt'}; model v{champion}",
        figures,
        lines,
        f"MLflow run `{run_id}`",
    )
    return PromptPromotionResult(candidate.ref, current.ref if current else None, strategy, figures, lines)


if __name__ == "__main__":
    promotion_flow()
