"""Decoding for a served batch: shared prompt prefix computed once, finished rows dropped.

    decoder = Decoder(max_prefixes=8)
    batch = decoder.batch(model, eos_id=2, pad_id=0, key="v3")   # key: the adapter (prefix caches)
    events = batch.add(prompts, budgets, owners, rows=[Row(sampling=..., stopper=...)])  # prefill
    while len(batch):
        events = batch.step()                      # one token per row; done rows leave
    row.tokens, row.finish_reason                  # "stop" (end of turn) or "length" (its own budget)

HF `generate` pays for what a server's batch does not need: every row prefills the chat
template's system prompt again (the same tokens for every request), and a row that has
stopped keeps being decoded until the longest row is done. Here the longest prefix shared by
the whole batch is run once, batch size 1, its KV cache kept (an LRU per `key`, the adapter)
and repeated across the rows; each row's own tokens follow it with padding in between
(masked, positions continuing from the prefix); a row leaves the batch, and the KV cache,
as soon as it stops or reaches its own `max_tokens`. Greedy rows get the tokens of greedy
`generate` on each prompt; a row with a temperature samples with its own seeded generator
(`choose`), so rows of one batch may decode with different settings.

Rows join a running batch between steps (continuous batching): the server adds the requests
that arrived while the batch decodes. A model whose KV cache is not made of plain per-layer
key/value tensors takes no rows into a running batch.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIN_PREFIX = 4  # a shorter shared prefix is not worth a separate forward pass


@dataclass
class Row:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" once done
    sampling: Any = None  # tuneloop.seams.Sampling; None: greedy
    stopper: Callable[[list[int]], bool] | None = None  # True once the tokens end with a stop string
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    generator: Any = None  # the row's torch.Generator (sampling rows)
    constraint: Any = None  # allows only some next tokens: .restrict(logits) in place, .accept(token)

    def __post_init__(self) -> None:
        if self.sampling is not None and not self.sampling.greedy:
            import torch

            self.generator = torch.Generator()
            if self.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.sampling.seed)


def choose(logits: Any, rows: list[Row]) -> Any:
    """The next token of each row from its last logits [rows, vocab]: the argmax for greedy rows
    (all of them at once when no row samples or wants logprobs), a draw for sampling rows, and
    the log-probabilities rows asked for."""
    import torch

    constrained = [i for i, r in enumerate(rows) if r.constraint is not None]
    if constrained:
        logits = logits.float().clone()
        for i in constrained:
            rows[i].constraint.restrict(logits[i])
    nxt = logits.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if r.sampling is not None and not r.sampling.greedy]
    if len(sampled) == len(rows):  # every row samples: no copies of the logits
        nxt = _draw(logits.float(), rows, nxt)
    elif sampled:
        nxt[sampled] = _draw(logits[sampled].float(), [rows[i] for i in sampled], nxt[sampled])
    for i, r in enumerate(rows):
        s = r.sampling
        if s is not None and s.logprobs:
            lp = torch.log_softmax(logits[i].float(), -1)
            tok = int(nxt[i])
            top = torch.topk(lp, s.top_logprobs) if s.top_logprobs else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
            r.logprobs.append((tok, float(lp[tok]), alternatives))
    for i in constrained:
        rows[i].constraint.accept(int(nxt[i]))
    return nxt


CANDIDATES = 256  # top-k / top-p look at the likeliest tokens first: a full sort of 49k costs 70 ms a step


def _draw(logits: Any, rows: list[Row], argmax: Any) -> Any:
    """One token per sampling row, all rows at once: temperature, then top-k and top-p over the
    likeliest CANDIDATES tokens (a row whose nucleus is not among them, or whose top_k is
    larger, is sorted in full), then inverse-CDF sampling with a uniform draw from each row's
    own generator (a row's tokens depend on its seed, never on the rows beside it). A row
    whose probabilities are not finite (logits too extreme for its temperature) keeps its argmax."""
    import torch

    settings = [r.sampling for r in rows]
    temperature = torch.tensor([s.temperature for s in settings]).unsqueeze(1)
    probs = torch.softmax(logits / temperature, -1)
    vocab = probs.shape[-1]
    top_p = torch.tensor([s.top_p for s in settings]).unsqueeze(1)
    top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in settings]).unsqueeze(1)
    u = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).unsqueeze(1)
    if not ((top_p < 1.0).any() or (top_k < vocab).any()):
        cdf = probs.cumsum(-1)
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=vocab - 1).squeeze(1)
    else:
        k = min(vocab, CANDIDATES)
        cand, order = probs.topk(k, -1)
        full = ((cand.sum(-1, keepdim=True) < top_p) & (top_k > k)) | ((top_k > k) & (top_k < vocab))
        full = full.squeeze(1)
        if full.any():  # rare: sort those rows in full
            cand = torch.cat([cand, cand.new_zeros(len(rows), vocab - k)], 1) if k < vocab else cand
            order = torch.cat([order, order.new_zeros(len(rows), vocab - k)], 1) if k < vocab else order
            cand[full], order[full] = probs[full].sort(-1, descending=True)
        width = cand.shape[-1]
        before = cand.cumsum(-1) - cand  # the mass of the likelier tokens
        drop = (before >= top_p) | (torch.arange(width).unsqueeze(0) >= top_k)
        drop[:, 0] = False  # always the likeliest (a tiny top_p rounds to dropping it)
        cdf = cand.masked_fill(drop, 0.0).cumsum(-1)
        pos = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=width - 1)
        tokens = order.gather(1, pos).squeeze(1)
    ok = torch.isfinite(probs).all(-1)
    return torch.where(ok, tokens, argmax)


def record(row: Row, tok: int, eos_id: int, budget: int) -> None:
    """A decoded token into its row; the row is done at EOS (not kept), a stop string, or its budget."""
    if tok == eos_id:
        row.finish_reason = "stop"
        return
    row.tokens.append(tok)
    if row.stopper is not None and row.stopper(row.tokens):
        row.finish_reason = "stop"
    elif len(row.tokens) >= budget:
        row.finish_reason = "length"


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest prefix all prompts share, leaving each at least one token of its own."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for i in range(max(n, 0)):
        tok = first[i]
        if any(p[i] != tok for p in prompts):
            return i
    return max(n, 0)


class Decoder:
    def __init__(self, max_prefixes: int = 8) -> None:
        self.max_prefixes = max_prefixes
        self._prefixes: OrderedDict[tuple[Any, tuple[int, ...]], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.prefix_hits = 0
        self.prefix_misses = 0

    def forget(self, key: Any = None) -> None:
        """Drop the cached prefixes of `key` (an adapter that was unloaded), or all of them."""
        with self._lock:
            for k in [k for k in self._prefixes if key is None or k[0] == key]:
                del self._prefixes[k]

    def _prefix_cache(self, model: Any, key: Any, prompts: list[list[int]]) -> tuple[int, Any]:
        """The KV cache of the longest prefix shared by `prompts`, repeated per row, and its length.

        A cached prefix of this key that every prompt starts with is used as it is; otherwise a
        batch's own shared prefix is computed, and kept for the next batches. A single prompt
        only uses what is cached (its whole text is no one else's prefix).
        """
        import torch

        shared = common_prefix(prompts)
        first = tuple(prompts[0][:shared])
        best: tuple[Any, tuple[int, ...]] | None = None
        with self._lock:
            for k in self._prefixes:
                fits = k[0] == key and len(k[1]) <= shared and first[: len(k[1])] == k[1]
                if fits and (best is None or len(k[1]) > len(best[1])):
                    best = k
            cached = self._prefixes[best] if best is not None else None
            if best is not None:
                self._prefixes.move_to_end(best)
                self.prefix_hits += 1
        if cached is not None:
            shared = len(best[1])
        elif len(prompts) > 1 and shared >= MIN_PREFIX:
            self.prefix_misses += 1
            ids = torch.tensor([first], device=model.device)
            with torch.inference_mode():
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            cached = out.past_key_values
            with self._lock:
                self._prefixes[(key, first)] = cached
                while len(self._prefixes) > self.max_prefixes:
                    self._prefixes.popitem(last=False)
        else:
            return 0, None
        with torch.inference_mode():
            cache = copy.deepcopy(cached)
        if len(prompts) > 1:
            cache.batch_repeat_interleave(len(prompts))
        return shared, cache

    def batch(
        self, model: Any, *, eos_id: int, pad_id: int, key: Any = None, mixed: bool = False, share_prefix: bool = True
    ) -> Batch:
        """A batch to decode on `model`; `mixed`: each row names its adapter (a PEFT model)."""
        return Batch(self, model, eos_id=eos_id, pad_id=pad_id, key=key, mixed=mixed, share_prefix=share_prefix)


class Batch:
    """Rows decoded together, one token per row per step. Rows join between steps (`add`:
    their prompts are prefilled, their KV cache left-padded to the batch's width and appended)
    and leave the batch as soon as they are done.

    Each event is (owner, row, token): the token a row got in that step (its `finish_reason`
    set when that was its last).
    """

    def __init__(
        self, decoder: Decoder, model: Any, *, eos_id: int, pad_id: int, key: Any, mixed: bool, share_prefix: bool
    ) -> None:
        self.decoder, self.model, self.eos_id, self.pad_id, self.key = decoder, model, eos_id, pad_id, key
        self.share_prefix = share_prefix and not mixed
        self.names: list[str] | None = [] if mixed else None
        self.owners: list[Any] = []
        self.rows: list[Row] = []
        self.budgets: list[int] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, cached tokens]: 1 where a row has a token
        self.positions: Any = None  # [rows, 1]: the position of each row's next input
        self.ids: Any = None  # [rows, 1]: each row's next input
        self.joinable = True  # a cache this class cannot merge takes no rows after the first

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any, names: list[str] | None) -> Any:
        extra = {"adapter_names": names} if names is not None else {}
        return self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )

    def add(
        self,
        prompts: list[list[int]],
        budgets: list[int],
        owners: list[Any],
        adapter_names: list[str] | None = None,
        rows: list[Row] | None = None,
    ) -> list[tuple[Any, Row, int]]:
        """Prefill `prompts` and take them into the batch; their first tokens. `rows`: each
        prompt's row with its sampling settings and stop hook (default: greedy rows)."""
        import torch

        if self.rows and not self.joinable:
            raise RuntimeError("this model's KV cache cannot take rows into a running batch")
        device = self.model.device
        share, cache = 0, None
        if self.share_prefix:
            share, cache = self.decoder._prefix_cache(self.model, self.key, prompts)
        own = [p[share:] for p in prompts]
        width = max(len(p) for p in own)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in own], device=device)
        mask = torch.tensor([[1] * share + [0] * (width - len(p)) + [1] * len(p) for p in own], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, share:]
        with torch.inference_mode():
            out = self._forward(ids, mask, positions, cache, adapter_names)
        rows = rows if rows is not None else [Row() for _ in prompts]
        nxt = choose(out.logits[:, -1], rows)
        events = self._record(nxt, rows, budgets, owners)
        keep = [b for b, row in enumerate(rows) if row.finish_reason is None]
        if not keep:
            return events
        index = torch.tensor(keep, device=device)
        cache = out.past_key_values
        if len(keep) < len(rows):
            cache.batch_select_indices(index)
        part = (cache, mask[index], positions[index, -1:] + 1, nxt[index].unsqueeze(-1))
        names = [adapter_names[b] for b in keep] if adapter_names is not None else None
        self._join(part, [rows[b] for b in keep], [budgets[b] for b in keep], [owners[b] for b in keep], names)
        return events

    def _record(self, nxt: Any, rows: list[Row], budgets: list[int], owners: list[Any]) -> list[tuple[Any, Row, int]]:
        events = []
        for tok, row, budget, owner in zip(nxt.tolist(), rows, budgets, owners):
            record(row, tok, self.eos_id, budget)
            events.append((owner, row, tok))
        return events

    def _join(
        self,
        part: tuple[Any, Any, Any, Any],
        rows: list[Row],
        budgets: list[int],
        owners: list[Any],
        names: list[str] | None,
    ) -> None:
        import torch
        import torch.nn.functional as F

        cache, mask, positions, ids = part
        if not self.rows:
            self.cache, self.mask, self.positions, self.ids = cache, mask, positions, ids
            self.joinable = _mergeable(cache)
        else:
            width = max(self.mask.shape[1], mask.shape[1])

            def left(t: Any, n: int, dim: int) -> Any:  # pad `n` columns of zeros before dimension `dim`
                pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]
                return F.pad(t, pad) if n else t

            grow_old, grow_new = width - self.mask.shape[1], width - mask.shape[1]
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([left(mine.keys, grow_old, 2), left(theirs.keys, grow_new, 2)])
                mine.values = torch.cat([left(mine.values, grow_old, 2), left(theirs.values, grow_new, 2)])
            self.mask = torch.cat([left(self.mask, grow_old, 1), left(mask, grow_new, 1)])
            self.positions = torch.cat([self.positions, positions])
            self.ids = torch.cat([self.ids, ids])
            self._trim()
        self.rows += rows
        self.budgets += budgets
        self.owners += owners
        if self.names is not None:
            self.names += names or []

    def _trim(self) -> None:
        """Drop the leading cache columns no row attends to any more."""
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def step(self) -> list[tuple[Any, Row, int]]:
        """Decode one token for every row; rows that are done leave the batch."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        with torch.inference_mode():
            out = self._forward(self.ids, self.mask, self.positions, self.cache, self.names)
        self.cache = out.past_key_values
        nxt = choose(out.logits[:, -1], self.rows)
        events = self._record(nxt, self.rows, self.budgets, self.owners)
        self.positions = self.positions + 1
        self.ids = nxt.unsqueeze(-1)
        keep = [b for b, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) < len(self.rows):
            self.drop(keep)
        return events

    def drop(self, keep: list[int]) -> None:
        """Keep only the rows at `keep` (indices into the batch's rows)."""
        import torch

        if keep:
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions, self.ids = self.mask[index], self.positions[index], self.ids[index]
        self.rows = [self.rows[b] for b in keep]
        self.budgets = [self.budgets[b] for b in keep]
        self.owners = [self.owners[b] for b in keep]
        if self.names is not None:
            self.names = [self.names[b] for b in keep]
        if not keep:
            self.cache = self.mask = self.positions = self.ids = None


def _mergeable(cache: Any) -> bool:
    """A cache of plain per-layer key/value tensors (`DynamicLayer`): rows can be added and dropped."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
