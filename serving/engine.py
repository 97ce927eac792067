"""The model deployment: one base model per replica, several LoRA adapters on it, batched.

    ModelServer(spec)                       # loads the base of spec["base_uri"] once
    reconfigure({"adapters": {"3": "models:/tuneloop/3", "4": "models:/tuneloop/4"}})

Adapters are registered MLflow versions. Serve calls `reconfigure` on the running replicas
when only the `user_config` changes (a declarative update: `serve deploy` or the deploy
task), so a new adapter version is hot-loaded and an old one unloaded without restarting a
replica. A different base model changes the application's args, and Serve replaces the
replicas one by one (new ones start before old ones stop).

Requests are batched by the replica itself, continuously: requests that arrive while a batch
decodes join it between steps (up to `max_batch_size` rows), streaming or not, and leave it as
soon as they are done (`serving.decoding`: the chat template's shared prefix is computed once
and its KV cache reused) or their client goes away (Serve cancels the request). A batch for
the default version runs on a copy of the base with that adapter merged in
(`serve.merge_default`); a batch for another single version runs it as PEFT's active adapter;
requests for different versions share one batch, PEFT applying each row's adapter
(`adapter_names`).
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

from tuneloop.seams import ServeSpec

log = logging.getLogger("ray.serve")

JOIN_AT_ONCE = 8  # a running batch takes waiting requests once this many wait (or as many as fit) …
JOIN_WAIT_S = 0.5  # … or once the first of them has waited this long


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
    def __init__(self, spec: ServeSpec) -> None:
        import mlflow
        import torch

        from tuneloop.models import find_artifact_dir, load_base, read_base_ref

        spec = ServeSpec.model_validate(spec)
        torch.set_num_threads(spec.engine.torch_threads)
        self.spec = spec
        self.model_name = spec.model_name
        mlflow.set_tracking_uri(spec.tracking_uri)
        art = find_artifact_dir(mlflow.artifacts.download_artifacts(artifact_uri=spec.base_uri))
        self.base_ref = read_base_ref(art)
        self.full_version: str | None = None
        if (art / "model").is_dir():  # a fully fine-tuned version is its own base, with no adapter
            from tuneloop.models import load_adapter_model

            self.model, self.tokenizer = load_adapter_model(art)
            self.full_version = spec.base_version
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
        self.merged: dict[str, Any] = {}  # the default version merged into a copy of the base
        from serving.decoding import Decoder

        self.decoder = Decoder(max_prefixes=spec.engine.prefix_cache)
        # since start, for info(): rows decoded per step = row_steps / steps
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "steps": 0, "row_steps": 0, "prefills": 0, "abandoned": 0,
                      "prefill_s": 0.0, "decode_s": 0.0}
        self.started_at = time.time()
        self.max_batch = spec.engine.max_batch_size
        self.batch_wait_s = spec.engine.batch_wait_timeout_s
        self._waiting: list[_Pending] = []
        self._arrived = threading.Condition()  # guards _waiting; taken after _lock, never before
        self.active: set[str] = set()  # versions of the rows being decoded
        self.retiring: set[str] = set()  # versions being unloaded: no new rows
        threading.Thread(target=self._schedule, name="tuneloop-batches", daemon=True).start()

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
        default = str(user_config.get("default") or next(iter(wanted)))
        self.default = default if default in self.adapters else next(iter(self.adapters), None)
        for version in [v for v in self.adapters if v not in wanted]:
            self._unload(version)
        if self.default not in self.adapters:
            self.default = next(iter(self.adapters), None)
        self._merge_default()

    def _unload(self, version: str, timeout_s: float = 120) -> None:
        """Unload a version once no running row decodes with it (no new row takes it meanwhile).
        Past `timeout_s` it is unloaded anyway, and rows still decoding with it fail."""
        self.retiring.add(version)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if version not in self.active or time.monotonic() > deadline:
                    self.model.delete_adapter(_name(version))
                    self.merged.pop(version, None)
                    del self.adapters[version]
                    break
            time.sleep(0.05)
        self.retiring.discard(version)
        self.decoder.forget(version)
        self.decoder.forget(("merged", version))
        self.loaded_at.pop(version, None)
        log.info("Unloaded adapter v%s", version)

    def _merge_default(self) -> None:
        """Keep a merged copy of the default version (only it), built outside the lock."""
        version = self.default
        if not self.spec.engine.merge_default or version is None or version in self.merged:
            return
        import copy

        try:
            # The PEFT model copied in memory, that one adapter merged, every LoRA layer removed.
            merged = copy.deepcopy(self.model).merge_and_unload(adapter_names=[_name(version)])
            merged.eval()
        except Exception:
            # Not fatal: the version is served by PEFT's active adapter, only slower.
            log.exception("Could not build a merged copy of v%s", version)
            return
        with self._lock:
            self.merged = {version: merged}
        for old in self.adapters:
            if old != version:
                self.decoder.forget(("merged", old))
        log.info("Merged v%s into a copy of the base for batches that only ask for it", version)

    def _champion(self) -> dict[str, str]:
        from mlflow import MlflowClient

        name = self.model_name
        version = MlflowClient().get_model_version_by_alias(name, self.spec.champion_alias).version
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
                "loaded_at": dict(self.loaded_at), "failed": dict(self.failed), "merged": sorted(self.merged),
                "decoding": {**self.stats, "prefix_hits": self.decoder.prefix_hits,
                             "prefix_misses": self.decoder.prefix_misses}}

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
        limit = self.spec.engine.max_prompt_tokens
        if len(ids) > limit:
            raise PromptTooLong(f"The prompt is {len(ids)} tokens; this server takes at most {limit}")
        return ids

    # Continuous batching: a request waits in `_waiting`; one thread decodes the running batch a
    # step at a time and, between steps, takes the waiting requests into it (up to
    # max_batch_size rows) — unless one waits that the batch cannot take (another version than
    # its one adapter): then the batch drains and the next one takes them all. Serve's
    # `@serve.batch` is not used: its queue closes a batch as soon as its wait ends and then
    # holds it behind the running one (Ray 2.60), so under 32 clients each batch held the 1-2
    # requests of a 10 ms window (2.7x sequential generate; this: 9.0-10.7x, BENCHMARKS.md).
    # The lock is taken per step, so adapters (un)load between steps; a version is unloaded
    # once no running row uses it.

    def _submit(self, req: GenerationRequest, stream: bool) -> _Pending:
        """Queue a request; raises UnknownAdapter or PromptTooLong at once."""
        item = _Pending(self._encode(req), req.max_tokens, self._resolve(req), asyncio.get_running_loop(), stream,
                        req.pinned)
        with self._arrived:
            self._waiting.append(item)
            self._arrived.notify()
        return item

    def _schedule(self) -> None:
        while True:
            try:
                self._decode_batches()
            except Exception:  # never leave requests waiting on a dead thread
                log.exception("The batch scheduler failed; restarting it")
                time.sleep(0.1)

    def _decode_batches(self) -> None:
        batch: Any = None
        while True:
            if batch is None:
                with self._arrived:
                    while not self._waiting:
                        self._arrived.wait()
                    if len(self._waiting) < self.max_batch and self.batch_wait_s > 0:
                        # the model was idle: give the requests sent together a moment to arrive together
                        self._arrived.wait_for(lambda: len(self._waiting) >= self.max_batch, self.batch_wait_s)
            items: list[_Pending] = []
            try:
                with self._lock:
                    if batch is None:
                        batch = self._start()
                        if batch is None:
                            continue
                    if any(item.abandoned for item in batch.owners):
                        self._abandon(batch)
                        if not len(batch):  # the next batch is chosen afresh for what waits
                            batch, self.active = None, set()
                            continue
                    items = self._take(batch) if batch.joinable and len(batch) < self.max_batch else []
                    if not items and not len(batch):
                        batch = None
                        continue
                    start = time.perf_counter()
                    if items:
                        events = batch.add([i.prompt for i in items], [i.budget for i in items], items,
                                           [_name(i.version) for i in items] if batch.names is not None else None)
                    else:
                        if batch.adapter is not None:  # one adapter, PEFT's active one
                            self.model.set_adapter(_name(batch.adapter))
                        events = batch.step()
                        self.stats["steps"] += 1
                        self.stats["row_steps"] += len(events)
                    self.stats["prefill_s" if items else "decode_s"] += time.perf_counter() - start
                    self.stats["prefills"] += bool(items)
                    self.active = {item.version for item in batch.owners}
            except BaseException as err:  # the batch's requests get the error; the thread goes on
                log.exception("Decoding a batch failed")
                owners = batch.owners if batch is not None else []
                for item in owners + [i for i in items if i not in owners]:
                    item.loop.call_soon_threadsafe(item.finish, err)
                batch, self.active = None, set()
                continue
            self._deliver(events)
            if not len(batch):
                batch, self.active = None, set()

    def _start(self) -> Any:
        """A new batch for what waits: on the merged copy, PEFT's active adapter, or mixed adapters."""
        with self._arrived:
            self._recheck()
            versions = {item.version for item in self._waiting[: self.max_batch]}
        if not versions:
            return None
        tok = self.tokenizer
        args = {"eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "share_prefix": self.decoder.max_prefixes > 0}
        (version,) = versions if len(versions) == 1 else (None,)
        if not self.peft:
            batch = self.decoder.batch(self.model, key="base", **args)
        elif version in self.merged:
            batch = self.decoder.batch(self.merged[version], key=("merged", version), **args)
        elif version is not None:
            # One adapter for the whole batch: the active adapter, not PEFT's per-row
            # routing, which costs ~1.2x at batch 16-32 on CPU for the same ids.
            self.model.set_adapter(_name(version))
            batch = self.decoder.batch(self.model, key=version, **args)
        else:
            batch = self.decoder.batch(self.model, mixed=True, **args)
        batch.version = version if self.peft else None  # the only version it takes; None: any
        batch.adapter = version if self.peft and version not in self.merged else None
        self.stats["batches"] += 1
        return batch

    def _take(self, batch: Any) -> list[_Pending]:
        """The waiting requests `batch` takes now: none while one it cannot take waits (it drains,
        and the next batch takes them all); a mixed batch also drains when all that waits could
        run on the faster merged copy."""
        with self._arrived:
            self._recheck()
            waiting = self._waiting
            if not waiting:
                return []
            if not len(batch):  # a new batch: the requests it was chosen for
                fits = [i for i in waiting if batch.version is None or i.version == batch.version]
                items = fits[: self.max_batch]
                self._waiting = [i for i in waiting if i not in items]
                self.stats["rows"] += len(items)
                return items
            if batch.version is not None and any(item.version != batch.version for item in waiting):
                return []
            versions = {item.version for item in waiting}
            if batch.names is not None and len(versions) == 1 and versions <= set(self.merged):
                return []
            room = self.max_batch - len(batch)
            if len(waiting) < min(room, JOIN_AT_ONCE) and time.monotonic() - waiting[0].arrived < JOIN_WAIT_S:
                return []  # a prefill pauses the running rows: take requests a few at a time
            items, self._waiting = waiting[:room], waiting[room:]
        self.stats["rows"] += len(items)
        return items

    def _abandon(self, batch: Any) -> None:
        """The rows whose client went away leave the batch: no step is spent on an answer no one reads."""
        keep = [b for b, item in enumerate(batch.owners) if not item.abandoned]
        self.stats["abandoned"] += len(batch) - len(keep)
        batch.drop(keep)

    def _recheck(self) -> None:
        """Requests whose client went away leave the queue. Requests for a version being
        unloaded: the default answers a routed one; a pinned one fails."""
        for item in list(self._waiting):
            if item.abandoned:
                self._waiting.remove(item)
                self.stats["abandoned"] += 1
            elif item.version in self.retiring or (self.peft and item.version not in self.adapters):
                if item.pinned or self.default is None or self.default in self.retiring:
                    self._waiting.remove(item)
                    err = UnknownAdapter(f"version {item.version} is not loaded on this replica")
                    item.loop.call_soon_threadsafe(item.finish, err)
                else:
                    item.version = self.default

    def _deliver(self, events: list[tuple[Any, Any, int]]) -> None:
        for item, row, tok in events:
            try:
                if item.stream:
                    item.loop.call_soon_threadsafe(item.tokens.put_nowait, tok)
                if row.finish_reason is not None:
                    self.stats["tokens"] += len(row.tokens)
                    item.loop.call_soon_threadsafe(item.finish, row)
            except RuntimeError:  # its event loop is closed: no one waits for it any more
                pass

    def _answer(self, item: _Pending, row: Any) -> Answer:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
        return Answer(text, len(item.prompt), len(row.tokens), row.finish_reason, item.version, self.replica)

    async def generate(self, request: GenerationRequest) -> Answer | Exception:
        """The answer, or the request's own error (returned, not raised: the gateway maps it)."""
        try:
            item = self._submit(request, stream=False)
        except (UnknownAdapter, PromptTooLong) as err:
            return err
        try:
            row = await item.done
        except UnknownAdapter as err:
            return err
        except asyncio.CancelledError:  # Serve cancels a request whose HTTP client went away
            item.abandoned = True
            raise
        return self._answer(item, row)

    async def __call__(self, request: GenerationRequest) -> Answer:
        out = await self.generate(request)
        if isinstance(out, Exception):
            raise out
        return out

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Any, None]:
        """Yield "" (or the request's own error), then text deltas as tokens are decoded, then
        [last delta, Answer]."""
        try:
            item = self._submit(request, stream=True)
        except (UnknownAdapter, PromptTooLong) as err:
            yield err
            return
        row = None
        try:
            yield ""
            tokens: list[int] = []
            sent = ""
            while (tok := await item.tokens.get()) is not None:
                if tok == self.tokenizer.eos_token_id:
                    break
                tokens.append(tok)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # hold back a split character
                    if text[len(sent):]:
                        yield text[len(sent):]
                    sent = text
            row = await item.done
        finally:
            if row is None:  # closed or cancelled: the client went away
                item.abandoned = True
        answer = self._answer(item, row)
        yield [answer.text[len(sent.strip()):] if answer.text.startswith(sent.strip()) else "", answer]


class _Pending:
    """A request waiting for, or in, a batch; its results arrive on its event loop."""

    def __init__(self, prompt: list[int], budget: int, version: str, loop: asyncio.AbstractEventLoop,
                 stream: bool, pinned: bool) -> None:
        self.prompt, self.budget, self.version, self.loop, self.stream = prompt, budget, version, loop, stream
        self.pinned = pinned
        self.arrived = time.monotonic()
        self.done: asyncio.Future[Any] = loop.create_future()
        self.tokens: asyncio.Queue[int | None] = asyncio.Queue()
        self.abandoned = False  # its client went away: it leaves the queue or batch before the next step

    def finish(self, result: Any) -> None:  # on the loop
        self.tokens.put_nowait(None)
        if self.done.cancelled():  # the client went away
            return
        if isinstance(result, BaseException):
            self.done.set_exception(result)
        else:
            self.done.set_result(result)


def _name(version: str) -> str:
    return f"v{version}"


def _in_serve() -> bool:
    try:
        serve.get_replica_context()
    except RayServeException:  # not inside a replica
        return False
    return True
