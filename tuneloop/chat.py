"""Conversations rendered with the model's chat template, and which tokens train.

One rendering serves the trainer (input ids and labels) and data validation (token lengths,
loss-token counts, the masked example people look at), so what validation measures is
what training sees. A token trains when it belongs to an assistant turn: for turn i, the
text between the template's rendering of turns [0, i) with the generation prompt and its
rendering of turns [0, i]. That is the answer and the template's end-of-turn marker.

    renderer = ChatRenderer(tokenizer)
    examples = renderer.tokenize(conversations, max_seq_len=512)   # ids + labels (-100: masked)
    lengths, trained = renderer.measure(conversations, max_seq_len=512)

Rendering 100k conversations through jinja takes seconds, so each distinct sequence of
roles is rendered once with placeholder contents (a skeleton) and rows are filled in by
string joins; the first rows of every role sequence are checked against the template
itself, and a template that transforms contents (trims them, say) falls back to jinja.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Message = dict[str, str]
IGNORE = -100  # label of a token that does not contribute to the loss (HF convention)
_SLOT = re.compile("\ue000(\\d+)\ue001")  # placeholder contents: private-use characters
_CHECKED_ROWS = 3  # rows per role sequence compared with the template itself


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # character spans of the assistant turns (trained)


@dataclass(frozen=True)
class _Skeleton:
    pieces: tuple[str | int, ...]  # literal text, or the index of the message whose content goes there
    # Each trained span boundary: its position in the placeholder rendering and the messages
    # whose placeholders come before it (their length difference shifts it).
    bounds: tuple[tuple[int, tuple[int, ...]], ...]


def _placeholder(i: int) -> str:
    return f"\ue000{i}\ue001"


class TemplateError(ValueError):
    """A conversation the model's chat template cannot render."""


class ChatRenderer:
    """Render conversations with `tokenizer`'s chat template and mark the trained spans."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("The tokenizer has no chat template: use an instruct/chat model or set one")
        self.tokenizer = tokenizer
        self._skeletons: dict[tuple[str, ...], _Skeleton | None] = {}
        self._checked: dict[tuple[str, ...], int] = {}

    def _template(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=generation_prompt)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as err:  # e.g. "roles must alternate"
            raise TemplateError(f"chat template cannot render roles {[m['role'] for m in messages]}: {err}") from None

    def render_slow(self, messages: Sequence[Message]) -> Rendered:
        """Render through the template only (the reference the fast path is checked against)."""
        text = self._template(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                before = self._template(messages[:i], True) if i else ""
                upto = self._template(messages[: i + 1], False)
                if not text.startswith(upto) or not upto.startswith(before):
                    raise TemplateError("chat template renders a conversation differently from its prefixes")
                spans.append((len(before), len(upto)))
        return Rendered(text, tuple(spans))

    def _skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        try:
            reference = self.render_slow([{"role": r, "content": _placeholder(i)} for i, r in enumerate(roles)])
        except TemplateError:
            return None
        pieces: list[str | int] = []
        pos = 0
        slots: list[tuple[int, int]] = []  # (message index, position) of each placeholder
        for match in _SLOT.finditer(reference.text):
            pieces += [reference.text[pos : match.start()], int(match.group(1))]
            slots.append((int(match.group(1)), match.start()))
            pos = match.end()
        pieces.append(reference.text[pos:])
        if sorted(i for i, _ in slots) != list(range(len(roles))):
            return None  # a content dropped or repeated: the template does more than insert it
        bounds = tuple((b, tuple(i for i, at in slots if at < b)) for span in reference.spans for b in span)
        return _Skeleton(tuple(pieces), bounds)

    def render(self, messages: Sequence[Message]) -> Rendered:
        """Render one conversation: text and the character spans of its assistant turns."""
        roles = tuple(m["role"] for m in messages)
        if roles not in self._skeletons:
            self._skeletons[roles] = self._skeleton(roles)
        skeleton = self._skeletons[roles]
        if skeleton is None:
            return self.render_slow(messages)
        text = "".join(messages[p]["content"] if isinstance(p, int) else p for p in skeleton.pieces)
        shifted = [b + sum(len(messages[i]["content"]) - len(_placeholder(i)) for i in before)
                   for b, before in skeleton.bounds]
        fast = Rendered(text, tuple(zip(shifted[::2], shifted[1::2], strict=True)))
        seen = self._checked.get(roles, 0)
        if seen < _CHECKED_ROWS:
            self._checked[roles] = seen + 1
            slow = self.render_slow(messages)
            if slow != fast:  # the template changes contents: jinja for this role sequence
                self._skeletons[roles] = None
                return slow
        return fast

    def _encode(self, texts: list[str]) -> list[Any]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TemplateError("A fast (Rust) tokenizer is required")
        return backend.encode_batch(texts, add_special_tokens=False)  # the template adds BOS etc.

    @staticmethod
    def _token_at(starts: list[int], char: int) -> int:
        """Index of the first token that starts at or after `char` (len(starts) past the end)."""
        return bisect.bisect_left(starts, char)

    def tokenize(self, conversations: Sequence[Sequence[Message]], max_seq_len: int) -> list[dict[str, list[int]]]:
        """Return input ids, attention mask and labels per conversation, cut to `max_seq_len`."""
        rendered = [self.render(c) for c in conversations]
        out = []
        for r, enc in zip(rendered, self._encode([r.text for r in rendered])):
            ids = enc.ids
            labels = [IGNORE] * len(ids)
            starts = [a for a, _ in enc.offsets]
            for start, end in r.spans:
                for t in range(self._token_at(starts, start), self._token_at(starts, end)):
                    labels[t] = ids[t]
            out.append({"input_ids": ids[:max_seq_len], "attention_mask": [1] * min(len(ids), max_seq_len),
                        "labels": labels[:max_seq_len]})
        return out

    def measure(self, conversations: Sequence[Sequence[Message]], max_seq_len: int,
                batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """Return per conversation its token count and how many tokens train after truncation."""
        lengths = np.zeros(len(conversations), dtype=np.int64)
        trained = np.zeros(len(conversations), dtype=np.int64)
        for lo in range(0, len(conversations), batch):
            rendered = [self.render(c) for c in conversations[lo : lo + batch]]
            for i, (r, enc) in enumerate(zip(rendered, self._encode([r.text for r in rendered])), start=lo):
                starts = [a for a, _ in enc.offsets]
                lengths[i] = len(starts)
                for start, end in r.spans:
                    a = min(self._token_at(starts, start), max_seq_len)
                    b = min(self._token_at(starts, end), max_seq_len)
                    trained[i] += b - a
        return lengths, trained

    def segments(self, messages: Sequence[Message], max_seq_len: int) -> list[tuple[str, str]]:
        """Return the rendered text in pieces marked "masked", "trained" or "cut" (past max_seq_len)."""
        r = self.render(messages)
        [enc] = self._encode([r.text])
        [example] = self.tokenize([messages], len(enc.ids))
        states = ["cut" if t >= max_seq_len else "masked" if label == IGNORE else "trained"
                  for t, label in enumerate(example["labels"])]
        out: list[tuple[str, str]] = []
        for t, state in enumerate(states):
            start = 0 if t == 0 else enc.offsets[t][0]
            end = enc.offsets[t + 1][0] if t + 1 < len(states) else len(r.text)
            if out and out[-1][1] == state:
                out[-1] = (out[-1][0] + r.text[start:end], state)
            else:
                out.append((r.text[start:end], state))
        return out
