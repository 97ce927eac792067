"""The engine of a derived version (merged, quantized GGUF): llama.cpp decodes, batched continuously.

    engine = LlamaCppEngine(artifact_dir, tokenizer, spec.engine, version="7")
    ticket = engine.submit(prompt_ids, 64, "7", stream=False, pinned=False, sampling=s)
    row = await ticket.done

The same `Engine` interface as serving/batching.py's `BatchingEngine` (the replica shell, the
gateway, canary and inference log see no difference). Each request is a llama.cpp sequence
of one context (tuneloop.gguf.Sequences): one thread takes waiting requests into free
sequences between steps and runs one `llama_decode` per step over the new prompts and one
token of every running request, as llama.cpp's own server does. The next token is chosen
by serving/decoding.py's `choose` from llama.cpp's logits, so greedy, seeded sampling,
logprobs, stop strings and JSON-schema constraints behave as on the float engine.
llama-cpp-python's `Llama` class decodes one sequence at a time; this batching is what it
lacks (BENCHMARKS.md "A CPU engine for derived versions").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.batching import Ticket, TicketQueue, Unsupported, VersionNotLoaded
from serving.decoding import Row, choose, record
from tuneloop.seams import DecodingStats, EngineSpec, Sampling

log = logging.getLogger("ray.serve")


class LlamaCppEngine(TicketQueue):
    """Continuous batching of one derived version on llama.cpp (no adapters: its LoRA is merged in)."""

    def __init__(self, artifact_dir: Path, tokenizer: Any, spec: EngineSpec, version: str) -> None:
        from tuneloop.gguf import GGUF_DIR, GGUF_FILE, Sequences

        self.spec = spec
        self.version = version
        self.default: str | None = version
        self.eos_id = tokenizer.eos_token_id
        self.seqs = Sequences(
            Path(artifact_dir) / GGUF_DIR / GGUF_FILE,
            n_seq=spec.max_batch_size,
            n_ctx_seq=spec.max_prompt_tokens + spec.max_new_tokens,
            threads=spec.torch_threads,
        )
        self._counts: dict[str, Any] = {
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
        self._waiting: list[Ticket] = []
        self._arrived = threading.Condition()
        self._closed = False
        self._previous: list[int] | None = None  # the last prompt taken (a lone new one shares with it)
        threading.Thread(target=self._schedule, name=f"tuneloop-llamacpp-{version}", daemon=True).start()

    # ------------------------------------------------------------------ versions

    def load(self, version: str, adapter_dir: Path) -> None:
        raise Unsupported(f"v{self.version} is a merged GGUF model: LoRA adapters are not loaded onto it")

    def unload(self, version: str) -> None:
        if version == self.version:
            self.close()

    def close(self) -> None:
        """Stop taking requests; the scheduler frees the model once the running ones are done."""
        with self._arrived:
            self._closed = True
            self._arrived.notify()

    def set_default(self, version: str | None) -> None:
        self.default = version

    def versions(self) -> list[str]:
        return [self.version]

    def merged_versions(self) -> list[str]:
        return []

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
        if version != self.version or self._closed:
            raise VersionNotLoaded(f"version {version} is not loaded on this replica")
        return self._enqueue(prompt, max_tokens, version, stream, pinned, sampling, stopper, constraint)

    def vocab_size(self) -> int:
        return int(self.seqs.n_vocab)

    def stats(self) -> DecodingStats:
        return DecodingStats(**self._counts)

    # ------------------------------------------------------------------ the scheduler thread

    def _schedule(self) -> None:
        running: dict[int, tuple[Ticket, Row]] = {}  # sequence id -> its request
        while True:
            with self._arrived:
                while not self._waiting and not running and not self._closed:
                    self._arrived.wait()
                if self._closed and not running:
                    for item in self._waiting:
                        item.loop.call_soon_threadsafe(
                            item.finish, VersionNotLoaded(f"version {self.version} was unloaded")
                        )
                    self._waiting = []
                    self.seqs.close()
                    return
                if not running and len(self._waiting) < self.spec.max_batch_size and self.spec.batch_wait_timeout_s:
                    self._arrived.wait_for(
                        lambda: len(self._waiting) >= self.spec.max_batch_size, self.spec.batch_wait_timeout_s
                    )
                fresh = self._take(running)
            try:
                self._step(running, fresh)
            except Exception as err:  # the running requests get the error; the thread goes on
                log.exception("llama.cpp decoding failed")
                for seq, (item, _row) in list(running.items()):
                    item.loop.call_soon_threadsafe(item.finish, err)
                    self.seqs.forget(seq)
                running.clear()

    def _take(self, running: dict[int, tuple[Ticket, Row]]) -> dict[int, Ticket]:
        """Waiting requests into free sequences (under the condition's lock)."""
        for item in [i for i in self._waiting if i.abandoned]:
            self._waiting.remove(item)
            self._counts["abandoned"] += 1
        free = [s for s in range(self.seqs.n_seq) if s not in running]
        fresh = dict(zip(free, self._waiting))
        self._waiting = self._waiting[len(fresh) :]
        if fresh and not running:
            self._counts["batches"] += 1
        self._counts["rows"] += len(fresh)
        return fresh

    def _step(self, running: dict[int, tuple[Ticket, Row]], fresh: dict[int, Ticket]) -> None:
        import torch

        for seq in [s for s, (item, _row) in running.items() if item.abandoned]:
            del running[seq]
            self.seqs.forget(seq)
            self._counts["abandoned"] += 1
        work: dict[int, tuple[list[int], int]] = {}
        for seq, (item, row) in running.items():
            work[seq] = ([row.tokens[-1]], len(item.prompt) + len(row.tokens) - 1)
        if fresh:  # what the new prompts begin with (a chat template's system prompt) is decoded once
            prompts = [item.prompt for item in fresh.values()]
            self.seqs.share(prompts + ([self._previous] if len(prompts) == 1 and self._previous else []))
            self._previous = prompts[-1]
        for seq, item in fresh.items():
            if len(item.prompt) >= self.seqs.n_ctx_seq:  # no room for one token (a clamped context)
                item.loop.call_soon_threadsafe(item.finish, Row(finish_reason="length"))
                continue
            running[seq] = (item, Row(sampling=item.sampling, stopper=item.stopper, constraint=item.constraint))
            work[seq] = self.seqs.start(seq, item.prompt)
        if not work:
            return
        start = time.perf_counter()
        logits = self.seqs.decode(work)
        order = sorted(logits)
        rows = [running[s][1] for s in order]
        nxt = choose(torch.from_numpy(self.seqs.np.stack([logits[s] for s in order])), rows)
        spent = time.perf_counter() - start
        self._counts["prefill_s" if fresh else "decode_s"] += spent
        self._counts["prefills"] += bool(fresh)
        self._counts["steps"] += 1
        self._counts["row_steps"] += len(order)
        for seq, tok in zip(order, nxt.tolist()):
            item, row = running[seq]
            record(row, tok, self.eos_id, min(item.budget, self.seqs.n_ctx_seq - len(item.prompt)))
            try:
                if item.stream:  # EOS too: the shell's stream ends at it, as with the float engine
                    item.loop.call_soon_threadsafe(item.tokens.put_nowait, tok)
                if row.finish_reason is not None:
                    self._counts["tokens"] += len(row.tokens)
                    item.loop.call_soon_threadsafe(item.finish, row)
            except RuntimeError:  # its event loop is closed: no one waits for it any more
                pass
            if row.finish_reason is not None:
                del running[seq]
                self.seqs.forget(seq)
