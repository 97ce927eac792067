"""Prompt versions in MLflow's Prompt Registry: register, resolve, list, compare.

    spec = register_prompt(cfg, "support", [{"role": "system", "content": "..."}], "shorter answers", "ana")
    resolve_prompt(cfg, "support@champion")   # or "support/3", "prompts:/support/3", "support" (newest)
    prompt_diff(cfg, "support/2", "support/3")

A version is immutable (the registry's own rule) and carries its author and message (MLflow's
commit message) and the SHA-256 of its template, checked again on every resolve: a version
whose template no longer matches its hash is refused. Registering a template equal to the newest
version's gives that version back, not a copy.
"""

from __future__ import annotations

import difflib
import getpass
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneloop.config import TuneloopConfig
from tuneloop.prompts import PromptSpec, Retrieval, prompt_sha256, template_messages
from tuneloop.retrieval import Retriever, render_prompt

SHA_TAG = "tuneloop.sha256"
AUTHOR_TAG = "tuneloop.author"
RETRIEVAL_TAG = "tuneloop.retrieval"  # {"collection": …, "k": …}: covered by the version's hash


class PromptNotFound(LookupError):
    """No prompt version answers to a reference."""


@dataclass(frozen=True)
class PromptVersionInfo:
    name: str
    version: str
    aliases: list[str]
    author: str
    message: str
    sha256: str
    created_ms: int


def _client(cfg: TuneloopConfig) -> Any:
    """A client of the config's registry; nothing global is set (mlflow.set_*_uri would export
    environment variables that every later subprocess inherits)."""
    import mlflow

    from tuneloop.state import tracking_uri

    uri = tracking_uri(cfg)
    return mlflow.MlflowClient(uri, uri)


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of `name`, `name/3`, `name@alias` or `prompts:/name/3|@alias`."""
    body = ref.removeprefix("prompts:/").strip()
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, None, alias
    if "/" in body:
        name, version = body.rsplit("/", 1)
        return name, version, None
    return body, None, None


def _versions(client: Any, name: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return sorted(client.search_prompt_versions(name), key=lambda v: int(v.version))
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # no prompt of that name
            return []
        raise


def _load(client: Any, name: str, version: str | None, alias: str | None) -> Any:
    try:
        if alias is not None:
            return client.get_prompt_version_by_alias(name, alias)
        if version is None:
            versions = _versions(client, name)
            if not versions:
                raise PromptNotFound(f"No prompt named {name!r} in the registry (`tuneloop prompt list`)")
            version = versions[-1].version
        return client.get_prompt_version(name, version)
    except PromptNotFound:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow's not-found is a generic MlflowException
        what = f"{name}@{alias}" if alias else f"{name}/{version}"
        raise PromptNotFound(f"No prompt version {what} in the registry: {err}") from None


def _spec(pv: Any) -> PromptSpec:
    bound = (pv.tags or {}).get(RETRIEVAL_TAG)
    try:
        spec = PromptSpec.from_template(pv.name, str(pv.version), pv.template, json.loads(bound) if bound else None)
    except ValueError as err:
        raise PromptNotFound(f"Prompt {pv.name}/{pv.version} cannot be used: {err}") from None
    recorded = (pv.tags or {}).get(SHA_TAG)
    if recorded is not None and recorded != spec.sha256:
        raise PromptNotFound(
            f"Prompt {pv.name}/{pv.version}: its template does not match the hash it was registered with "
            f"({recorded[:12]}… vs {spec.sha256[:12]}…); refusing it"
        )
    return spec


def resolve_prompt(cfg: TuneloopConfig, ref: str) -> PromptSpec:
    """The prompt version `ref` names, verified against its registered hash."""
    name, version, alias = parse_ref(ref)
    return _spec(_load(_client(cfg), name, version, alias))


def register_prompt(
    cfg: TuneloopConfig,
    name: str,
    template: str | Sequence[Mapping[str, str]],
    message: str,
    author: str | None = None,
    alias: str | None = None,
    retrieval: Retrieval | None = None,
) -> tuple[PromptSpec, bool]:
    """Register `template` as the next version of `name` (or return the newest, when equal); return
    (the version, whether it is new). `alias` is moved to it. With `retrieval`, the version binds
    that collection (which must exist) and `k`."""

    # validates roles, shape and the {{context}} slot before anything is written
    messages = list(PromptSpec.from_template(name, "0", template, retrieval).messages)
    if retrieval is not None:
        from tuneloop.state import collections_location
        from tuneloop.vectorstore import CollectionStore

        CollectionStore.open(collections_location(cfg), retrieval.collection)  # CollectionError names it
    digest = prompt_sha256(messages, retrieval)
    client = _client(cfg)
    versions = _versions(client, name)
    newest = versions[-1] if versions else None
    if newest is not None and (newest.tags or {}).get(SHA_TAG) == digest:
        spec, created = _spec(client.get_prompt_version(name, newest.version)), False
    else:
        stored: Any = template if isinstance(template, str) else [m.model_dump() for m in messages]
        pv = client.register_prompt(
            name=name,
            template=stored,
            commit_message=message,
            tags={
                SHA_TAG: digest,
                AUTHOR_TAG: author or getpass.getuser(),
                **({RETRIEVAL_TAG: retrieval.model_dump_json()} if retrieval else {}),
            },
        )
        spec, created = _spec(pv), True
    if alias:
        client.set_prompt_alias(name, alias, int(spec.version))
    return spec, created


def read_retrieval_file(path: str) -> Retrieval | None:
    """The `retrieval: {collection, k}` of a YAML/JSON prompt file holding {messages, retrieval}, if any."""
    from pathlib import Path

    p = Path(path)
    if p.suffix.lower() not in (".yaml", ".yml", ".json"):
        return None
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict) or data.get("retrieval") is None:
        return None
    try:
        return Retrieval.model_validate(data["retrieval"])
    except ValueError as err:
        raise ValueError(f"{path}: retrieval must be {{collection: <name>, k: 1-20}}: {err}") from None


def read_template_file(path: str) -> str | list[dict[str, str]]:
    """A template from a file: YAML/JSON (a list of messages, or {messages: [...], retrieval: {...}})
    or plain text."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML/JSON: {err}") from None
        if isinstance(data, dict) and "messages" in data:
            data = data["messages"]
        if isinstance(data, str):
            return data
        if not isinstance(data, list):
            raise ValueError(f"{path}: a prompt file holds a list of messages (role, content) or a text")
        try:
            template_messages(data)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{path}: not a list of messages with role system/user/assistant and content: {err}"
            ) from None
        return data
    return text


def prompt_versions(cfg: TuneloopConfig, name: str) -> list[PromptVersionInfo]:
    client = _client(cfg)
    out = []
    for v in _versions(client, name):
        full = client.get_prompt_version(name, v.version)  # search results carry no aliases
        tags = full.tags or {}
        out.append(
            PromptVersionInfo(
                name,
                str(full.version),
                list(full.aliases or []),
                tags.get(AUTHOR_TAG, ""),
                full.commit_message or "",
                tags.get(SHA_TAG, ""),
                int(full.creation_timestamp or 0),
            )
        )
    return out


def list_prompts(cfg: TuneloopConfig) -> list[PromptVersionInfo]:
    """The newest version of every registered prompt."""
    out = []
    for prompt in _client(cfg).search_prompts():
        versions = prompt_versions(cfg, prompt.name)
        if versions:
            out.append(versions[-1])
    return sorted(out, key=lambda v: v.name)


def show_text(spec: PromptSpec) -> str:
    return yaml.safe_dump([m.model_dump() for m in spec.messages], sort_keys=False, allow_unicode=True, width=100)


def prompt_diff(cfg: TuneloopConfig, a: str, b: str) -> str:
    """A unified diff of two versions' templates (as YAML), empty when they are equal."""
    left, right = resolve_prompt(cfg, a), resolve_prompt(cfg, b)
    return "".join(
        difflib.unified_diff(
            show_text(left).splitlines(keepends=True),
            show_text(right).splitlines(keepends=True),
            fromfile=left.ref,
            tofile=right.ref,
        )
    )


def record_prompt_promotion(
    cfg: TuneloopConfig,
    candidate: PromptSpec,
    previous: PromptSpec | None,
    strategy: str,
    decision: str,
    reason: str,
    figures: dict[str, dict[str, float]],
    lines: list[str],
) -> str:
    """One MLflow run per prompt promotion (linked to the prompt version: its page lists the run),
    the decision tagged on the version, and on `promoted` the champion alias moved to it."""
    import math

    import mlflow
    from prefect.runtime import flow_run

    client = _client(cfg)
    mlflow.set_experiment(cfg.registry.promotion_experiment)
    with mlflow.start_run(run_name=f"promote-prompt-{candidate.name}-v{candidate.version}") as run:
        mlflow.log_params(
            {"prompt": candidate.ref, "previous_prompt": previous.ref if previous else "none", "strategy": strategy}
        )
        mlflow.log_metrics(
            {f"{arm}_{k}": v for arm, m in figures.items() for k, v in m.items() if v is not None and not math.isnan(v)}
        )
        mlflow.set_tags(
            {
                "tuneloop.decision": decision,
                "tuneloop.reason": reason[:5000],
                "tuneloop.prompt_version": candidate.ref,
                "tuneloop.prefect_flow_run": str(flow_run.get_id() or ""),
            }
        )
        mlflow.log_text("\n".join(lines) or "(no rules)", "rules.txt")
        run_id = run.info.run_id
    client.link_prompt_version_to_run(run_id, client.get_prompt_version(candidate.name, candidate.version))
    verdict = "serving" if decision == "promoted" else f"{decision}: {reason}"[:5000]
    client.set_prompt_version_tag(candidate.name, candidate.version, "tuneloop.promotion", verdict)
    client.set_prompt_version_tag(candidate.name, candidate.version, "tuneloop.promotion_run", run_id)
    if decision == "promoted":
        client.set_prompt_alias(candidate.name, cfg.registry.champion_alias, int(candidate.version))
    return run_id


def render_conversation(
    prompt: PromptSpec,
    turns: Sequence[Mapping[str, str]],
    values: Mapping[str, str] | None = None,
    retriever: Retriever | None = None,
) -> list[dict[str, str]]:
    """A whole training conversation as the chat route would have rendered it: the turns before its
    last answer go through the prompt (and its retrieval: the example learns with the context
    serving would give it), the answer follows."""
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
    return [*render_prompt(prompt, turns[:last], values, retriever), *(dict(t) for t in turns[last:])]


def render_rows(
    frame: Any,
    prompt: PromptSpec | None,
    values: Mapping[str, str] | None = None,
    retriever: Retriever | None = None,
) -> Any:
    """Training rows (tasks.data's internal form) rendered with `prompt`; the frame itself when None."""
    from tasks.data import MESSAGES

    if prompt is None:
        return frame
    rendered = [render_conversation(prompt, list(t), values, retriever) for t in frame[MESSAGES]]
    return frame.assign(**{MESSAGES: rendered})


@task(name="resolve-prompt", cache_policy=NO_CACHE)
def serving_prompt(cfg: TuneloopConfig) -> PromptSpec | None:
    """The prompt version a new model version will serve with (`serve.prompt`), checked against
    the variables clients send (`serve.prompt_variables`) before anything trains on it."""
    if not cfg.serve.prompt:
        return None
    spec = resolve_prompt(cfg, cfg.serve.prompt)
    spec.check_variables(cfg.serve.prompt_variables)
    return spec


def prompt_tags(cfg: TuneloopConfig, spec: PromptSpec) -> dict[str, str]:
    return dict(_client(cfg).get_prompt_version(spec.name, spec.version).tags or {})


def tag_prompt_gate(cfg: TuneloopConfig, spec: PromptSpec, decision: str, reason: str, run_id: str) -> None:
    """The gate's verdict on a prompt version (what the prompt promotion flow checks), linked to its run."""
    client = _client(cfg)
    for key, value in (
        ("tuneloop.gate", decision),
        ("tuneloop.gate_reason", reason[:5000]),
        ("tuneloop.eval_run", run_id),
    ):
        client.set_prompt_version_tag(spec.name, spec.version, key, value)
    client.link_prompt_version_to_run(run_id, client.get_prompt_version(spec.name, spec.version))
