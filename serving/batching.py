"""The inference engine behind a model replica: its interface, and continuous batching on one model.

    engine: Engine = BatchingEngine(model, tokenizer, spec.engine)
    engine.load("3", adapter_dir); engine.set_default("3")   # hot-load, merge the default
    ticket = engine.submit(prompt_ids, 64, "3", stream=True, pinned=False)  # on the event loop
    async for token in engine.stream(ticket): ...             # token ids as they are decoded
    row = await ticket.done                                   # the tokens and the finish reason
    engine.cancel(ticket)                                     # its client went away
    engine.unload("3"); engine.stats()                        # DecodingStats

`Engine` is the seam another engine (a quantized CPU engine, a GPU engine) plugs into: the
replica shell (serving/engine.py: versions, reconfigure, info, chat rendering, text) and the
gateway never see more than this interface. `BatchingEngine` is the implementation on a
transformers model with PEFT adapters and serving/decoding.py's decoder.

Continuous batching: a request waits in a queue; one thread decodes the running batch a step
at a time and, between steps, takes the waiting requests into it (up to max_batch_size rows)
— unless one waits that the batch cannot take (another version than its one adapter): then
the batch drains and the next one takes them all. Serve's `@serve.batch` is not used: its
queue closes a batch as soon as its wait ends and then holds it behind the running one (Ray
2.60), so under 32 clients each batch held the 1-2 requests of a 10 ms window (2.7x sequential
generate; this: 9.0-10.7x, BENCHMARKS.md). The model lock is taken per step, so adapters
(un)load between steps; a version is unloaded once no running row uses it.

A batch for the default version runs on a copy of the base with that adapter merged in
(`merge_default`); a batch for another single version runs it as PEFT's active adapter;
requests for different versions share one batch, PEFT applying each row's adapter.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from serving.decoding import Batch, Decoder, Row
from tuneloop.seams import DecodingStats, EngineSpec, Sampling

log = logging.getLogger("ray.serve")

JOIN_AT_ONCE = 8  # a running batch takes waiting requests once this many wait (or as many as fit) …
JOIN_WAIT_S = 0.5  # … or once the first of them has waited this long


class VersionNotLoaded(KeyError):
    """The version a request needs is not (or no longer) loaded."""


class Unsupported(ValueError):
    """A setting this engine cannot honour (the gateway answers 400 naming it)."""


class Ticket:
    """A submitted request: waiting for, or in, a batch; its results arrive on its event loop."""

    def __init__(
        self,
        prompt: list[int],
        budget: int,
        version: str,
        loop: asyncio.AbstractEventLoop,
        stream: bool,
        pinned: bool,
        sampling: Sampling | None = None,
        stopper: Callable[[list[int]], bool] | None = None,
        constraint: Any = None,
    ) -> None:
        self.prompt, self.budget, self.version, self.loop, self.stream = prompt, budget, version, loop, stream
        self.sampling, self.stopper, self.constraint = sampling, stopper, constraint
        self.pinned = pinned  # asked for this version by name: never answered by another
        self.arrived = time.monotonic()
        self.done: asyncio.Future[Row] = loop.create_future()
        self.tokens: asyncio.Queue[int | None] = asyncio.Queue()
        self.abandoned = False  # its client went away: it leaves the queue or batch before the next step
        self.engine: Any = None  # the engine it was submitted to (a replica may run several)

    def finish(self, result: Row | BaseException) -> None:  # on the loop
        self.tokens.put_nowait(None)
        if self.done.cancelled():  # the client went away
            return
        if isinstance(result, BaseException):
            self.done.set_exception(result)
        else:
            self.done.set_result(result)


class Engine(Protocol):
    """What a model replica asks of an inference engine."""

    def load(self, version: str, adapter_dir: Path) -> None: ...
    def unload(self, version: str) -> None: ...
    def set_default(self, version: str | None) -> None: ...
    def versions(self) -> list[str]: ...
    def merged_versions(self) -> list[str]: ...
    def submit(
        self,
        prompt: list[int],
        max_tokens: int,
        version: str,
        *,
        stream: bool,
        pinned: bool,
        sampling: Sampling | None = None,
        stopper: Callable[[list[int]], bool] | None = None,
        constraint: Any = None,
    ) -> Ticket:
        """Queue a request. An engine that cannot honour a `sampling` setting raises
        `Unsupported` naming it (the gateway answers 400)."""
        ...

    def stream(self, ticket: Ticket) -> AsyncIterator[int]: ...
    def cancel(self, ticket: Ticket) -> None: ...
    def stats(self) -> DecodingStats: ...
    def vocab_size(self) -> int:
        """Width of the model's logits (constrained decoding masks that many tokens)."""
        ...


class TicketQueue:
    """What an engine does with a request around its decoding: queue it (on the caller's event
    loop; the engine's thread takes it from `_waiting`), stream its tokens, cancel it."""

    _waiting: list[Ticket]
    _arrived: threading.Condition

    def _enqueue(
        self,
        prompt: list[int],
        max_tokens: int,
        version: str,
        stream: bool,
        pinned: bool,
        sampling: Sampling | None,
        stopper: Callable[[list[int]], bool] | None,
        constraint: Any,
    ) -> Ticket:
        loop = asyncio.get_running_loop()
        ticket = Ticket(prompt, max_tokens, version, loop, stream, pinned, sampling, stopper, constraint)
        with self._arrived:
            self._waiting.append(ticket)
            self._arrived.notify()
        return ticket

    async def stream(self, ticket: Ticket) -> AsyncIterator[int]:
        """The ticket's token ids as they are decoded (submitted with stream=True)."""
        while (token := await ticket.tokens.get()) is not None:
            yield token

    def cancel(self, ticket: Ticket) -> None:
        """Its client went away: the request leaves the queue or its batch before the next step."""
        ticket.abandoned = True


@dataclass
class _Running:
    """The batch being decoded and what it may take: `version` None takes any version (mixed
    adapters, or a model without adapters); `adapter` is set when it runs one PEFT adapter active."""

    batch: Batch
    version: str | None
    adapter: str | None


class BatchingEngine(TicketQueue):
    """Continuous batching of decoding (greedy or sampled, per row) on one transformers model and its PEFT adapters."""

    def __init__(self, model: Any, tokenizer: Any, spec: EngineSpec, fixed_version: str | None = None) -> None:
        """`fixed_version`: the model is that version's full weights (no adapters are loaded)."""
        self.model = model
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.spec = spec
        self.peft = False
        self.fixed_version = fixed_version
        self.adapters: set[str] = set()
        self.default: str | None = fixed_version
        self.merged: dict[str, Any] = {}  # the default version merged into a copy of the base
        self.decoder = Decoder(max_prefixes=spec.prefix_cache)
        self._counts = {
            "batches": 0,
            "rows": 0,
            "tokens": 0,
            "steps": 0,
            "row_steps": 0,
            "prefills": 0,
            "abandoned": 0,
            "prefill_s": 0.0,
            "decode_s": 0.0,
        }
        self._lock = threading.Lock()  # decoding and adapter (un)loading never overlap
        self._waiting: list[Ticket] = []
        self._arrived = threading.Condition()  # guards _waiting; taken after _lock, never before
        self._active: set[str] = set()  # versions of the rows being decoded
        self._retiring: set[str] = set()  # versions being unloaded: no new rows
        threading.Thread(target=self._schedule, name="tuneloop-batches", daemon=True).start()

    # ------------------------------------------------------------------ versions

    def versions(self) -> list[str]:
        return sorted(self.adapters) or ([self.fixed_version] if self.fixed_version else [])

    def merged_versions(self) -> list[str]:
        """Versions decoded on a copy of the base with their adapter merged in (the fast path)."""
        return sorted(self.merged)

    def load(self, version: str, adapter_dir: Path) -> None:
        from peft import PeftModel

        with self._lock:
            if not self.peft:
                self.model = PeftModel.from_pretrained(self.model, adapter_dir, adapter_name=_name(version))
                self.peft = True
            else:
                self.model.load_adapter(adapter_dir, adapter_name=_name(version))
            self.model.eval()
        self.adapters.add(version)

    def unload(self, version: str, timeout_s: float = 120) -> None:
        """Unload a version once no running row decodes with it (no new row takes it meanwhile).
        Past `timeout_s` it is unloaded anyway, and rows still decoding with it fail."""
        self._retiring.add(version)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if version not in self._active or time.monotonic() > deadline:
                    self.model.delete_adapter(_name(version))
                    self.merged.pop(version, None)
                    self.adapters.discard(version)
                    break
            time.sleep(0.05)
        self._retiring.discard(version)
        self.decoder.forget(version)
        self.decoder.forget(("merged", version))

    def set_default(self, version: str | None) -> None:
        """The version routed requests fall back to; with merge_default, a merged copy of it (only
        it), built outside the lock."""
        self.default = version
        if not self.spec.merge_default or version is None or version in self.merged or not self.peft:
            return
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

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt: list[int],
        max_tokens: int,
        version: str,
        *,
        stream: bool,
        pinned: bool,
        sampling: Sampling | None = None,
        stopper: Callable[[list[int]], bool] | None = None,
        constraint: Any = None,
    ) -> Ticket:
        """Queue a request (on the caller's event loop); its ticket's `done` gets the row.
        Every Sampling setting is honoured, per row (rows of one batch may differ)."""
        return self._enqueue(prompt, max_tokens, version, stream, pinned, sampling, stopper, constraint)

    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def stats(self) -> DecodingStats:
        return DecodingStats(
            **self._counts, prefix_hits=self.decoder.prefix_hits, prefix_misses=self.decoder.prefix_misses
        )

    # ------------------------------------------------------------------ the scheduler thread

    def _schedule(self) -> None:
        while True:
            try:
                self._decode_batches()
            except Exception:  # never leave requests waiting on a dead thread
                log.exception("The batch scheduler failed; restarting it")
                time.sleep(0.1)

    def _decode_batches(self) -> None:
        running: _Running | None = None
        counts = self._counts
        while True:
            if running is None:
                with self._arrived:
                    while not self._waiting:
                        self._arrived.wait()
                    if len(self._waiting) < self.spec.max_batch_size and self.spec.batch_wait_timeout_s > 0:
                        # the model was idle: give the requests sent together a moment to arrive together
                        self._arrived.wait_for(
                            lambda: len(self._waiting) >= self.spec.max_batch_size, self.spec.batch_wait_timeout_s
                        )
            items: list[Ticket] = []
            try:
                with self._lock:
                    if running is None:
                        running = self._start()
                        if running is None:
                            continue
                    batch = running.batch
                    if any(item.abandoned for item in batch.owners):
                        self._abandon(batch)
                        if not len(batch):  # the next batch is chosen afresh for what waits
                            running, self._active = None, set()
                            continue
                    room = batch.joinable and len(batch) < self.spec.max_batch_size
                    items = self._take(running) if room else []
                    if not items and not len(batch):
                        running = None
                        continue
                    start = time.perf_counter()
                    if items:
                        events = batch.add(
                            [i.prompt for i in items],
                            [i.budget for i in items],
                            items,
                            [_name(i.version) for i in items] if batch.names is not None else None,
                            [Row(sampling=i.sampling, stopper=i.stopper, constraint=i.constraint) for i in items],
                        )
                    else:
                        if running.adapter is not None:  # one adapter, PEFT's active one
                            self.model.set_adapter(_name(running.adapter))
                        events = batch.step()
                        counts["steps"] += 1
                        counts["row_steps"] += len(events)
                    counts["prefill_s" if items else "decode_s"] += time.perf_counter() - start
                    counts["prefills"] += bool(items)
                    self._active = {item.version for item in batch.owners}
            except BaseException as err:  # the batch's requests get the error; the thread goes on
                log.exception("Decoding a batch failed")
                owners = running.batch.owners if running is not None else []
                for item in owners + [i for i in items if i not in owners]:
                    item.loop.call_soon_threadsafe(item.finish, err)
                running, self._active = None, set()
                continue
            self._deliver(events)
            if not len(running.batch):
                running, self._active = None, set()

    def _start(self) -> _Running | None:
        """A new batch for what waits: on the merged copy, PEFT's active adapter, or mixed adapters."""
        with self._arrived:
            self._recheck()
            versions = {item.version for item in self._waiting[: self.spec.max_batch_size]}
        if not versions:
            return None
        args = {"eos_id": self.eos_id, "pad_id": self.pad_id, "share_prefix": self.decoder.max_prefixes > 0}
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
        self._counts["batches"] += 1
        return _Running(
            batch, version if self.peft else None, version if self.peft and version not in self.merged else None
        )

    def _take(self, running: _Running) -> list[Ticket]:
        """The waiting requests the batch takes now: none while one it cannot take waits (it drains,
        and the next batch takes them all); a mixed batch also drains when all that waits could
        run on the faster merged copy."""
        batch, limit = running.batch, self.spec.max_batch_size
        with self._arrived:
            self._recheck()
            waiting = self._waiting
            if not waiting:
                return []
            if not len(batch):  # a new batch: the requests it was chosen for
                fits = [i for i in waiting if running.version is None or i.version == running.version]
                items = fits[:limit]
                self._waiting = [i for i in waiting if i not in items]
                self._counts["rows"] += len(items)
                return items
            if running.version is not None and any(item.version != running.version for item in waiting):
                return []
            versions = {item.version for item in waiting}
            if batch.names is not None and len(versions) == 1 and versions <= set(self.merged):
                return []
            room = limit - len(batch)
            if len(waiting) < min(room, JOIN_AT_ONCE) and time.monotonic() - waiting[0].arrived < JOIN_WAIT_S:
                return []  # a prefill pauses the running rows: take requests a few at a time
            items, self._waiting = waiting[:room], waiting[room:]
        self._counts["rows"] += len(items)
        return items

    def _abandon(self, batch: Batch) -> None:
        """The rows whose client went away leave the batch: no step is spent on an answer no one reads."""
        keep = [b for b, item in enumerate(batch.owners) if not item.abandoned]
        self._counts["abandoned"] += len(batch) - len(keep)
        batch.drop(keep)

    def _recheck(self) -> None:
        """Requests whose client went away leave the queue. Requests for a version being
        unloaded: the default answers a routed one; a pinned one fails."""
        for item in list(self._waiting):
            if item.abandoned:
                self._waiting.remove(item)
                self._counts["abandoned"] += 1
            elif item.version in self._retiring or (self.peft and item.version not in self.adapters):
                if item.pinned or self.default is None or self.default in self._retiring:
                    self._waiting.remove(item)
                    err = VersionNotLoaded(f"version {item.version} is not loaded on this replica")
                    item.loop.call_soon_threadsafe(item.finish, err)
                else:
                    item.version = self.default

    def _deliver(self, events: list[tuple[Ticket, Row, int]]) -> None:
        for item, row, tok in events:
            try:
                if item.stream:
                    item.loop.call_soon_threadsafe(item.tokens.put_nowait, tok)
                if row.finish_reason is not None:
                    self._counts["tokens"] += len(row.tokens)
                    item.loop.call_soon_threadsafe(item.finish, row)
            except RuntimeError:  # its event loop is closed: no one waits for it any more
                pass


def _name(version: str) -> str:
    return f"v{version}"
