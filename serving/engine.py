"""The model deployment: one base model per replica, several LoRA adapters on it, batched.

    ModelServer(spec)                       # loads the base of spec["base_uri"] once
    reconfigure({"adapters": {"3": "models:/tuneloop/3", "4": "models:/tuneloop/4"}})

Adapters are registered MLflow versions. Serve calls `reconfigure` on the running replicas
when only the `user_config` changes (a declarative update: `serve deploy` or the deploy
task), so a new adapter version is hot-loaded and an old one unloaded without restarting a
replica. A different base model changes the application's args, and Serve replaces the
replicas one by one (new ones start before old ones stop).

This class is the replica's shell: which versions it serves (download, base check, load,
unload, default), its `info()`, and the request's text (chat rendering, prompt limit,
detokenizing, the stream's events). Decoding is the engine's (serving/batching.py: the
`Engine` interface and `BatchingEngine`, continuous batching with shared-prefix KV caches
and a merged copy of the default version). A request whose client goes away is cancelled
there (Serve cancels the request).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from serving.batching import BatchingEngine, Engine, Ticket, VersionNotLoaded
from tuneloop.seams import (
    Answer,
    DecodingStats,
    GenerationRequest,
    Refusal,
    ReplicaInfo,
    ServedVersions,
    ServeSpec,
    StreamEvent,
    TokenLogprob,
)

log = logging.getLogger("ray.serve")


class PromptTooLong(ValueError):
    pass


class EmptyPrompt(ValueError):
    """A prompt with no tokens (an empty completion prompt on a tokenizer without BOS)."""


class BadResponseFormat(ValueError):
    """A JSON schema constrained decoding cannot compile."""


class JsonConstraint:
    """One row's constrained decoding with xgrammar: before each token, every token that cannot
    continue JSON valid under the schema is masked out; the chosen token advances the matcher.
    Chosen by measurement (BENCHMARKS.md): ~0.25 ms per token on SmolLM2's 49k vocabulary."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.mask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)

    def restrict(self, logits: Any) -> None:
        import xgrammar as xgr

        self.matcher.fill_next_token_bitmask(self.mask)
        xgr.apply_token_bitmask_inplace(logits.view(1, -1), self.mask)

    def accept(self, token: int) -> None:
        self.matcher.accept_token(token)


def _refusal(err: PromptTooLong | VersionNotLoaded | BadResponseFormat | EmptyPrompt) -> Refusal:
    """The request's own error, as the gateway receives it (and answers with a 4xx)."""
    if isinstance(err, PromptTooLong):
        return Refusal("prompt_too_long", str(err))
    if isinstance(err, BadResponseFormat):
        return Refusal("bad_response_format", str(err))
    if isinstance(err, EmptyPrompt):
        return Refusal("prompt_empty", str(err))
    return Refusal("version_not_loaded", str(err.args[0]) if err.args else "version not loaded")


@serve.deployment(
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,  # let batches in flight finish when a replica is replaced
    max_constructor_retry_count=3,  # a version that cannot load fails fast; the old one keeps serving
    max_surge_percent=100,  # start the new replicas before the old ones stop
    max_ongoing_requests=64,
)
class ModelServer:
    def __init__(self, spec: ServeSpec) -> None:
        import mlflow
        import torch

        from tuneloop.models import artifact_kind, load_base, read_base_ref

        spec = ServeSpec.model_validate(spec)
        torch.set_num_threads(spec.engine.torch_threads)
        self.spec = spec
        self.model_name = spec.model_name
        mlflow.set_tracking_uri(spec.tracking_uri)
        art = self._verified_artifact(spec.base_uri)
        self.base_ref = read_base_ref(art)
        self.full_version: str | None = None
        cuda = torch.cuda.is_available()
        self.dtype = spec.engine.resolved_dtype(cuda, cuda and torch.cuda.is_bf16_supported())
        attention = None if spec.engine.attn_implementation == "auto" else spec.engine.attn_implementation
        self.engines: dict[str, Engine] = {}  # derived (GGUF) versions hot-loaded next to the adapters
        self._default: str | None = None
        if artifact_kind(art) == "gguf":  # a derived version: llama.cpp runs it, the HF tokenizer reads it
            self._init_gguf(spec, art)
            return
        if (art / "model").is_dir():  # a fully fine-tuned version is its own base, with no adapter
            from tuneloop.models import load_adapter_model

            model, self.tokenizer = load_adapter_model(art, self.dtype, attention)
            self.full_version = spec.base_version
        else:
            model, self.tokenizer = load_base(self.base_ref, self.dtype, attn_implementation=attention)
            model.eval()
        self.attention = str(getattr(model.config, "_attn_implementation", attention or "auto"))
        if torch.cuda.is_available():  # a replica given num_gpus sees its GPU(s)
            model.to("cuda")
        self.engine: Engine = BatchingEngine(model, self.tokenizer, spec.engine, fixed_version=self.full_version)
        self._init_common()

    def _init_gguf(self, spec: ServeSpec, art: Path) -> None:
        from transformers import AutoTokenizer

        from serving.llamacpp import LlamaCppEngine
        from tuneloop.gguf import read_derivation

        self.tokenizer = AutoTokenizer.from_pretrained(art / "tokenizer")
        self.full_version = spec.base_version
        derivation = read_derivation(art) or {}
        self.dtype = f"gguf {derivation.get('method', '?')}"
        self.attention = "llama.cpp"
        self.engine = LlamaCppEngine(art, self.tokenizer, spec.engine, spec.base_version)
        self._init_common()

    def _init_common(self) -> None:
        self.adapters: dict[str, str] = {}  # version -> model URI
        in_serve = _in_serve()
        self.replica = serve.get_replica_context().replica_id.unique_id if in_serve else "local"
        self.actor_name = serve.get_replica_context().replica_id.to_full_id_str() if in_serve else ""
        self.loaded_at: dict[str, float] = {}
        self.failed: dict[str, str] = {}  # version -> why it could not be loaded
        self._grammars: Any = None  # xgrammar compiler for response_format, made on first use
        self.started_at = time.time()

    @property
    def default(self) -> str | None:
        return self._default if self._default is not None else self.engine.default

    def _set_default(self, version: str | None) -> None:
        """The version routed requests fall back to: an adapter of the float engine (merged there),
        or a derived version on its own engine (the float engine keeps its adapter default)."""
        self._default = version if version in self.engines else None
        if version not in self.engines:
            self.engine.set_default(version)

    def _engine_of(self, version: str) -> Engine:
        return self.engines.get(version, self.engine)

    # ------------------------------------------------------------------ versions

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the configured adapter versions that are not loaded; unload the others."""
        served = ServedVersions.model_validate(user_config or {})
        wanted = dict(served.adapters)
        if self.full_version is not None:
            self._set_default(self.full_version)
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
        default = served.default or next(iter(wanted))
        self._set_default(default if default in self.adapters else next(iter(self.adapters), None))
        for version in [v for v in self.adapters if v not in wanted]:
            if version in self.engines:
                self.engines.pop(version).unload(version)
            else:
                self.engine.unload(version)
            del self.adapters[version]
            self.loaded_at.pop(version, None)
            log.info("Unloaded adapter v%s", version)
        if self.default not in self.adapters:  # the default was unloaded: the first loaded one
            self._set_default(next(iter(self.adapters), None))

    def _champion(self) -> dict[str, str]:
        from mlflow import MlflowClient

        name = self.model_name
        version = MlflowClient().get_model_version_by_alias(name, self.spec.champion_alias).version
        return {str(version): f"models:/{name}/{version}"}

    def _verified_artifact(self, uri: str) -> Path:
        """Download a version (`models:/<name>/<version>`) and check it against its registered digest."""
        import mlflow
        from mlflow import MlflowClient

        from tuneloop.models import DIGEST_TAG, find_artifact_dir, verify_artifact

        name, version = uri.removeprefix("models:/").rstrip("/").rsplit("/", 1)
        art = find_artifact_dir(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        tags = MlflowClient().get_model_version(name, version).tags
        verify_artifact(art, tags.get(DIGEST_TAG), f"Version {version} of {name}")
        return art

    def _load(self, version: str, uri: str) -> None:

        from tuneloop.models import BaseModelError, artifact_kind, read_base_ref

        art = self._verified_artifact(uri)
        ref = read_base_ref(art)
        if artifact_kind(art) == "gguf" and ref.sha256 == self.base_ref.sha256:
            # A derived version of this base: its own llama.cpp engine, next to the float one
            # (it canaries against its float parent like any challenger).
            from serving.llamacpp import LlamaCppEngine

            self.engines[version] = LlamaCppEngine(art, self.tokenizer, self.spec.engine, version)
            self.adapters[version] = uri
            self.loaded_at[version] = time.time()
            self.failed.pop(version, None)
            log.info("Loaded derived v%s (llama.cpp) from %s", version, uri)
            return
        if ref.sha256 != self.base_ref.sha256 or not (art / "adapter").is_dir():
            raise BaseModelError(
                f"Version {version} ({uri}) cannot be hot-loaded here: it is not a LoRA adapter of the "
                f"serving base {self.base_ref.location} (sha256 {self.base_ref.sha256[:12]}…); "
                "deploy it as a new base"
            )
        self.engine.load(version, art / "adapter")
        self.adapters[version] = uri
        self.loaded_at[version] = time.time()
        self.failed.pop(version, None)
        log.info("Loaded adapter v%s from %s", version, uri)

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            replica=self.replica,
            actor_name=self.actor_name,
            pid=os.getpid(),
            base=self.base_ref.location,
            base_sha256=self.base_ref.sha256,
            versions=sorted({*self.engine.versions(), *self.engines}),
            default=self.default,
            started_at=self.started_at,
            loaded_at=dict(self.loaded_at),
            failed=dict(self.failed),
            merged=self.engine.merged_versions(),
            engine="+".join(dict.fromkeys(type(e).__name__ for e in [self.engine, *self.engines.values()])),
            decoding=_summed([self.engine.stats(), *(e.stats() for e in self.engines.values())]),
            dtype=self.dtype,
            attention=self.attention,
        )

    # ------------------------------------------------------------------ requests

    def _resolve(self, req: GenerationRequest) -> str:
        version = req.version or self.default
        if version != self.full_version and version not in self.adapters and not req.pinned:
            # A routed request reaching a replica that is being replaced (a new base rolling
            # out): the replica's own default answers it, as it did before the rollout began.
            version = self.default
        if version is None:
            raise VersionNotLoaded("no adapter is loaded")
        if version != self.full_version and version not in self.adapters:
            raise VersionNotLoaded(f"version {version} is not loaded on this replica")
        return version

    def _encode(self, req: GenerationRequest) -> list[int]:
        from tuneloop.generation import chat_prompt, text_prompt

        ids = (
            chat_prompt(self.tokenizer, req.chat)
            if req.messages is not None
            else text_prompt(self.tokenizer, req.text or "")
        )
        if not ids:
            raise EmptyPrompt("The prompt is empty: send at least one character")
        limit = self.spec.engine.max_prompt_tokens
        if len(ids) > limit:
            raise PromptTooLong(f"The prompt is {len(ids)} tokens; this server takes at most {limit}")
        return ids

    def _submit(self, req: GenerationRequest, stream: bool) -> Ticket:
        """Hand the request to the engine; raises VersionNotLoaded or PromptTooLong at once."""
        stops = req.sampling.stop
        version = self._resolve(req)
        engine = self._engine_of(version)
        ticket = engine.submit(
            self._encode(req),
            req.max_tokens,
            version,
            stream=stream,
            pinned=req.pinned,
            sampling=req.sampling,
            stopper=_stopper(self.tokenizer, stops) if stops else None,
            constraint=self._json_constraint(req.sampling.json_schema) if req.sampling.json_schema else None,
        )
        ticket.engine = engine
        return ticket

    def _json_constraint(self, schema: str) -> JsonConstraint:
        """A matcher for `schema` (compiled once per schema: xgrammar's compiler caches)."""
        import xgrammar as xgr

        if self._grammars is None:
            vocab = self.engine.vocab_size()
            self._grammars = xgr.GrammarCompiler(
                xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab), max_threads=1
            )
        try:
            compiled = self._grammars.compile_json_schema(schema, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as err:  # what xgrammar raises on a schema it cannot use
            raise BadResponseFormat(f"response_format: the JSON schema cannot be used: {err}"[:500]) from None
        return JsonConstraint(compiled)

    def _answer(self, ticket: Ticket, row: Any) -> Answer:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stops = ticket.sampling.stop if ticket.sampling is not None else ()
        text = cut_at_stop(text, stops)[0].strip()
        logprobs = None
        if ticket.sampling is not None and ticket.sampling.logprobs:
            piece = self.tokenizer.decode
            logprobs = tuple(
                TokenLogprob(piece([tok]), lp, tuple((piece([t]), v) for t, v in top)) for tok, lp, top in row.logprobs
            )
        return Answer(
            text, len(ticket.prompt), len(row.tokens), row.finish_reason, ticket.version, self.replica, logprobs
        )

    async def generate(self, request: GenerationRequest) -> Answer | Refusal:
        """The answer, or why this request is refused (returned, not raised: the gateway maps it to a 4xx)."""
        try:
            ticket = self._submit(request, stream=False)
        except (VersionNotLoaded, PromptTooLong, BadResponseFormat, EmptyPrompt) as err:
            return _refusal(err)
        try:
            row = await ticket.done
        except VersionNotLoaded as err:
            return _refusal(err)
        except asyncio.CancelledError:  # Serve cancels a request whose HTTP client went away
            ticket.engine.cancel(ticket)
            raise
        return self._answer(ticket, row)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Yield `start` (or `refused`), a `delta` per piece of decoded text, then `done` with the
        answer and the text not yet sent. A failure while decoding is raised."""
        try:
            ticket = self._submit(request, stream=True)
        except (VersionNotLoaded, PromptTooLong, BadResponseFormat, EmptyPrompt) as err:
            yield StreamEvent("refused", refusal=_refusal(err))
            return
        row = None
        try:
            yield StreamEvent("start")
            tokens: list[int] = []
            sent = ""
            stops = request.sampling.stop
            async for tok in ticket.engine.stream(ticket):
                if tok == self.tokenizer.eos_token_id:
                    break
                tokens.append(tok)
                text, stopped = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), stops)
                # hold back a split character, and the end that may be the start of a stop string
                if not text.endswith("\ufffd"):
                    ready = text if stopped else text[: len(text) - partial_stop(text, stops)]
                    if ready[len(sent) :] and ready.startswith(sent):
                        yield StreamEvent("delta", ready[len(sent) :])
                        sent = ready
                if stopped:
                    break
            row = await ticket.done
        finally:
            if row is None:  # closed or cancelled: the client went away
                ticket.engine.cancel(ticket)
        answer = self._answer(ticket, row)
        rest = answer.text[len(sent.strip()) :] if answer.text.startswith(sent.strip()) else ""
        yield StreamEvent("done", rest, answer=answer)


def _summed(stats: list[DecodingStats]) -> DecodingStats:
    """The decoding figures of every engine of a replica, added up."""
    from dataclasses import fields

    return DecodingStats(**{f.name: sum(getattr(s, f.name) for s in stats) for f in fields(DecodingStats)})


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop string in it (not included), and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could begin a stop string (held back while streaming)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _stopper(tokenizer: Any, stops: tuple[str, ...]) -> Callable[[list[int]], bool]:
    """True once the decoded tokens hold a stop string. Only the tail is decoded: a token is at
    least one byte, so 4 tokens per character of the longest stop (plus a margin) cover it."""
    tail = 4 * max(len(s) for s in stops) + 4

    def stopped(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-tail:], skip_special_tokens=True)
        return any(s in text for s in stops)

    return stopped


def _in_serve() -> bool:
    try:
        serve.get_replica_context()
    except RayServeException:  # not inside a replica
        return False
    return True
