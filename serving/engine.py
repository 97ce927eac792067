"""The model deployment: one base model per replica, several LoRA adapters on it, batched.

    ModelServer(spec)                       # loads the base of spec["base_uri"] once
    reconfigure({"adapters": {"3": "models:/tuneloop/3", "4": "models:/tuneloop/4"}})

Adapters are registered MLflow versions. Serve calls `reconfigure` on the running replicas
when only the `user_config` changes (a declarative update: `serve deploy` or the deploy
task), so a new adapter version is hot-loaded and an old one unloaded without restarting a
replica. A different base model changes the application's args, and Serve replaces the
replicas one by one (new ones start before old ones stop).

Requests for different adapters share one batch: PEFT applies each row's adapter
(`adapter_names`). Serve's dynamic batching groups requests; streaming requests are
batched too and get their tokens step by step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

log = logging.getLogger("ray.serve")

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class GenerationRequest:
    adapter: str | None  # a loaded version, or None: the default (the first configured)
    max_tokens: int
    messages: list[dict[str, str]] | None = None  # chat
    text: str | None = None  # raw completion prompt
    request_id: str = ""
    pinned: bool = False  # asked for this version by name: never answered by another


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    version: str
    replica: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class PromptTooLong(ValueError):
    pass


class UnknownAdapter(KeyError):
    pass


@serve.deployment(
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,  # let batches in flight finish when a replica is replaced
    max_constructor_retry_count=3,  # a version that cannot load fails fast; the old one keeps serving
    max_surge_percent=100,  # start the new replicas before the old ones stop
    max_ongoing_requests=64,
)
class ModelServer:
    def __init__(self, spec: dict[str, Any]) -> None:
        import mlflow
        import torch

        from tuneloop.models import find_artifact_dir, load_base, read_base_ref

        torch.set_num_threads(int(spec["torch_threads"]))
        self.spec = spec
        self.model_name = spec["model_name"]
        mlflow.set_tracking_uri(spec["tracking_uri"])
        art = find_artifact_dir(mlflow.artifacts.download_artifacts(artifact_uri=spec["base_uri"]))
        self.base_ref = read_base_ref(art)
        self.full_version: str | None = None
        if (art / "model").is_dir():  # a fully fine-tuned version is its own base, with no adapter
            from tuneloop.models import load_adapter_model

            self.model, self.tokenizer = load_adapter_model(art)
            self.full_version = spec["base_uri"].rstrip("/").rsplit("/", 1)[-1]
        else:
            self.model, self.tokenizer = load_base(self.base_ref)
            self.model.eval()
        if torch.cuda.is_available():  # a replica given num_gpus sees its GPU(s)
            self.model.to("cuda")
        self.peft = False
        self.adapters: dict[str, str] = {}  # version -> model URI
        self.default: str | None = self.full_version
        self._lock = threading.Lock()  # generation and adapter (un)loading never overlap
        in_serve = _in_serve()
        self.replica = serve.get_replica_context().replica_id.unique_id if in_serve else "local"
        self.actor_name = serve.get_replica_context().replica_id.to_full_id_str() if in_serve else ""
        self.loaded_at: dict[str, float] = {}
        self.failed: dict[str, str] = {}  # version -> why it could not be loaded
        self.started_at = time.time()
        self.generate.set_max_batch_size(int(spec["max_batch_size"]))
        self.generate.set_batch_wait_timeout_s(float(spec["batch_wait_timeout_s"]))
        self.generate_stream.set_max_batch_size(int(spec["max_batch_size"]))
        self.generate_stream.set_batch_wait_timeout_s(float(spec["batch_wait_timeout_s"]))

    # ------------------------------------------------------------------ adapters

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the configured adapter versions that are not loaded; unload the others."""
        wanted: dict[str, str] = {str(k): v for k, v in (user_config.get("adapters") or {}).items()}
        if self.full_version is not None:
            self.default = self.full_version
            return
        if not wanted:
            wanted = self._champion()
        for version, uri in wanted.items():
            if version not in self.adapters:
                try:
                    self._load(version, uri)
                except Exception as err:
                    # Raising here would fail the replica and take the loaded versions down
                    # with it; the deploy task reads `failed` from info() and rolls back.
                    log.exception("Adapter v%s could not be loaded", version)
                    self.failed[version] = f"{type(err).__name__}: {err}"[:2000]
        for version in [v for v in self.adapters if v not in wanted]:
            with self._lock:
                self.model.delete_adapter(_name(version))
            del self.adapters[version]
            self.loaded_at.pop(version, None)
            log.info("Unloaded adapter v%s", version)
        default = str(user_config.get("default") or next(iter(wanted)))
        self.default = default if default in self.adapters else next(iter(self.adapters), None)

    def _champion(self) -> dict[str, str]:
        from mlflow import MlflowClient

        name = self.model_name
        version = MlflowClient().get_model_version_by_alias(name, self.spec.get("champion_alias", "champion")).version
        return {str(version): f"models:/{name}/{version}"}

    def _load(self, version: str, uri: str) -> None:
        import mlflow
        from peft import PeftModel

        from tuneloop.models import BaseModelError, find_artifact_dir, read_base_ref

        art = find_artifact_dir(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        ref = read_base_ref(art)
        if ref.sha256 != self.base_ref.sha256 or not (art / "adapter").is_dir():
            raise BaseModelError(
                f"Version {version} ({uri}) cannot be hot-loaded here: it is not a LoRA adapter of the "
                f"serving base {self.base_ref.location} (sha256 {self.base_ref.sha256[:12]}…); "
                "deploy it as a new base")
        with self._lock:
            if not self.peft:
                self.model = PeftModel.from_pretrained(self.model, art / "adapter", adapter_name=_name(version))
                self.peft = True
            else:
                self.model.load_adapter(art / "adapter", adapter_name=_name(version))
            self.model.eval()
        self.adapters[version] = uri
        self.loaded_at[version] = time.time()
        self.failed.pop(version, None)
        log.info("Loaded adapter v%s from %s", version, uri)

    def info(self) -> dict[str, Any]:
        return {"adapters": sorted(self.adapters) or ([self.full_version] if self.full_version else []),
                "default": self.default, "base": self.base_ref.location, "base_sha256": self.base_ref.sha256,
                "replica": self.replica, "actor_name": self.actor_name, "pid": os.getpid(), "started_at": self.started_at,
                "loaded_at": dict(self.loaded_at), "failed": dict(self.failed)}

    # ------------------------------------------------------------------ generation

    def _resolve(self, req: GenerationRequest) -> str:
        version = req.adapter or self.default
        if version != self.full_version and version not in self.adapters and not req.pinned:
            # A routed request reaching a replica that is being replaced (a new base rolling
            # out): the replica's own default answers it, as it did before the rollout began.
            version = self.default
        if version is None:
            raise UnknownAdapter("no adapter is loaded")
        if version != self.full_version and version not in self.adapters:
            raise UnknownAdapter(f"version {version} is not loaded on this replica")
        return version

    def _encode(self, req: GenerationRequest) -> list[int]:
        from tuneloop.generation import chat_prompt, text_prompt

        ids = (chat_prompt(self.tokenizer, req.messages) if req.messages is not None
               else text_prompt(self.tokenizer, req.text or ""))
        limit = int(self.spec["max_prompt_tokens"])
        if len(ids) > limit:
            raise PromptTooLong(f"The prompt is {len(ids)} tokens; this server takes at most {limit}")
        return ids

    def _prepare(self, requests: list[GenerationRequest]) -> tuple[list[Any], list[list[int]], list[str]]:
        """Per request: an error (returned to that request only) or its ids and adapter."""
        errors: list[Any] = []
        prompts, versions = [], []
        for req in requests:
            try:
                version, ids = self._resolve(req), self._encode(req)
            except (UnknownAdapter, PromptTooLong) as err:
                errors.append(err)
                continue
            errors.append(None)
            prompts.append(ids)
            versions.append(version)
        return errors, prompts, versions

    def _run(self, prompts: list[list[int]], versions: list[str], max_new: int, streamer: Any = None) -> list[Any]:
        from tuneloop.generation import generate_ids

        with self._lock:
            if not self.peft:
                return generate_ids(self.model, self.tokenizer, prompts, max_new, None, streamer)
            if len(set(versions)) == 1:
                # One adapter for the whole batch (the usual case): the active adapter, not PEFT's
                # per-row routing, which costs ~1.2x at batch 16-32 on CPU for the same ids.
                self.model.set_adapter(_name(versions[0]))
                return generate_ids(self.model, self.tokenizer, prompts, max_new, None, streamer)
            return generate_ids(self.model, self.tokenizer, prompts, max_new, [_name(v) for v in versions],
                                streamer)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[GenerationRequest]) -> list[Answer | Exception]:
        errors, prompts, versions = self._prepare(requests)
        live = [r for r, e in zip(requests, errors) if e is None]
        outs = []
        if live:
            # Greedy decoding is per row, so one batch at the longest budget, cut per request,
            # answers each request as if alone.
            outs = await asyncio.to_thread(self._run, prompts, versions, max(r.max_tokens for r in live))
        results: list[Answer | Exception] = []
        it = iter(zip(live, outs, versions))
        for err in errors:
            if err is not None:
                results.append(err)
                continue
            req, out, version = next(it)
            text, tokens, finish = out.text, out.completion_tokens, out.finish_reason
            if out.completion_tokens > req.max_tokens:
                ids = self.tokenizer(out.text, add_special_tokens=False)["input_ids"][: req.max_tokens]
                text, tokens, finish = self.tokenizer.decode(ids, skip_special_tokens=True), req.max_tokens, "length"
            results.append(Answer(text, out.prompt_tokens, tokens, finish, version, self.replica))
        return results

    async def __call__(self, request: GenerationRequest) -> Answer:
        out = await self.generate(request)
        if isinstance(out, Exception):
            raise out
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_stream(self, requests: list[GenerationRequest]) -> AsyncGenerator[list[Any], None]:
        """Yield, per decoding step, one item per request: a text delta (str), a final Answer,
        an Exception, or StopIteration once that request is done."""
        from tuneloop.generation import StepStreamer

        errors, prompts, versions = self._prepare(requests)
        live = [i for i, e in enumerate(errors) if e is None]
        done = [e is not None for e in errors]
        first = [e if e is not None else "" for e in errors]
        yield first  # errors now, an empty delta for the rest
        for i, e in enumerate(errors):
            if e is not None:
                done[i] = True
        if not live:
            return
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[list[int] | None] = asyncio.Queue()
        streamer = StepStreamer(lambda ids: loop.call_soon_threadsafe(steps.put_nowait, ids))
        budget = max(requests[i].max_tokens for i in live)
        work = asyncio.ensure_future(asyncio.to_thread(self._run, prompts, versions, budget, streamer))
        tokens: list[list[int]] = [[] for _ in live]
        sent = ["" for _ in live]
        finish: list[str | None] = [None for _ in live]
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        while True:
            step = await steps.get()
            if step is None:
                break
            items: list[Any] = [StopIteration if d else "" for d in done]
            for row, i in enumerate(live):
                if finish[row] is not None:
                    continue
                tok = step[row]
                if tok == eos or (tok == pad and pad != eos):
                    finish[row] = "stop"
                else:
                    tokens[row].append(tok)
                    if len(tokens[row]) >= requests[i].max_tokens:
                        finish[row] = "length"
                text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
                if finish[row] is not None or not text.endswith("\ufffd"):  # hold back a split character
                    delta, sent[row] = text[len(sent[row]):], text
                    items[i] = delta
                if finish[row] is not None:
                    items[i] = [items[i], Answer(sent[row].strip(), len(prompts[row]), len(tokens[row]),
                                                 finish[row], versions[row], self.replica)]
            yield items
            for row, i in enumerate(live):
                if finish[row] is not None:
                    done[i] = True
        outs = await work
        tail: list[Any] = [StopIteration if d else None for d in done]
        for row, i in enumerate(live):
            if not done[i]:  # generation ended (budget) without this row's own stop
                out = outs[row]
                tail[i] = [out.text[len(sent[row].strip()):] if out.text.startswith(sent[row].strip()) else "",
                           Answer(out.text, out.prompt_tokens, min(out.completion_tokens, requests[i].max_tokens),
                                  out.finish_reason, versions[row], self.replica)]
        if any(t is not StopIteration for t in tail):
            yield tail

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Any, None]:
        async for item in self.generate_stream(request):
            yield item


def _name(version: str) -> str:
    return f"v{version}"


def _in_serve() -> bool:
    try:
        serve.get_replica_context()
    except RayServeException:  # not inside a replica
        return False
    return True
