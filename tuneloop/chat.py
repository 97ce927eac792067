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
        self._head_cache: dict[str, tuple[str, int]] | None = None
        self._special: re.Pattern[str] | None = None
        self._control: re.Pattern[str] | None = None  # any added token, in message contents

    def _template(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=generation_prompt
            )
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
        shifted = [
            b + sum(len(messages[i]["content"]) - len(_placeholder(i)) for i in before) for b, before in skeleton.bounds
        ]
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
        """Return input ids, attention mask and labels per conversation, cut to `max_seq_len`.

        A conversation whose contents hold a control token (`<|im_start|>` typed in a message)
        is tokenized with that token as text, as serving does (`_tokenize_as_text`)."""
        rendered = [self.render(c) for c in conversations]
        out = []
        for c, r, enc in zip(conversations, rendered, self._encode([r.text for r in rendered]), strict=True):
            if self._holds_control_tokens(c):
                ids, labels = self._tokenize_as_text(c)
            else:
                ids = enc.ids
                labels = [IGNORE] * len(ids)
                starts = [a for a, _ in enc.offsets]
                for start, end in r.spans:
                    for t in range(self._token_at(starts, start), self._token_at(starts, end)):
                        labels[t] = ids[t]
            out.append(
                {
                    "input_ids": ids[:max_seq_len],
                    "attention_mask": [1] * min(len(ids), max_seq_len),
                    "labels": labels[:max_seq_len],
                }
            )
        return out

    def _holds_control_tokens(self, messages: Sequence[Message]) -> bool:
        if self._control is None:
            tokens = sorted((t.content for t in self.tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
            self._control = re.compile("|".join(map(re.escape, tokens)) or "(?!)")
        return any(self._control.search(m["content"]) for m in messages)

    def _tokenize_as_text(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Ids and labels of a conversation whose contents hold control tokens: transformers'
        `sanitize_control_tokens` encodes them as text; each assistant turn trains on the tokens
        between the rendering before it (with the generation prompt) and the rendering through it."""

        def ids(msgs: Sequence[Message], generation_prompt: bool) -> list[int]:
            if not msgs:
                return []
            out = self.tokenizer.apply_chat_template(
                list(msgs), add_generation_prompt=generation_prompt, tokenize=True, sanitize_control_tokens=True
            )
            return list(out["input_ids"] if hasattr(out, "keys") else out)

        full = ids(messages, False)
        labels = [IGNORE] * len(full)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start, end = len(ids(messages[:i], True)), len(ids(messages[: i + 1], False))
                labels[start:end] = full[start:end]
        return full, labels

    def _heads(self) -> list[str]:
        """Template text every conversation of a role sequence starts with (a default system
        prompt, say), cut where a special token starts: text before a special token
        tokenizes on its own, so it is tokenized once, not per row."""
        if self._head_cache is None:
            specials = [t for t in self.tokenizer.added_tokens_decoder.values() if t.special]
            if any(t.lstrip or t.rstrip or t.normalized for t in specials):
                return []  # a special token that eats or rewrites its neighbours: no shortcut
            self._special = re.compile("|".join(re.escape(t.content) for t in specials)) if specials else None
            self._head_cache = {}
        for skeleton in self._skeletons.values():
            literal = skeleton.pieces[0] if skeleton and isinstance(skeleton.pieces[0], str) else ""
            if literal not in self._head_cache:
                starts = [m.start() for m in self._special.finditer(literal)] if self._special else []
                head = literal[: starts[-1]] if starts else ""
                # Checked, not assumed: the head and the rest tokenize as the whole does.
                whole, alone, rest = self._encode([literal, head, literal[len(head) :]])
                same = whole.ids == alone.ids + rest.ids
                self._head_cache[literal] = (head, len(alone.ids)) if head and same else ("", 0)
        return sorted({h for h in self._head_cache.values() if h[0]}, key=lambda h: -len(h[0]))

    @staticmethod
    def _first_token_from(encoding: Any, char: int, length: int, n_tokens: int) -> int:
        """Index of the first token starting at or after `char` (n_tokens past the end)."""
        if char >= length:
            return n_tokens
        token = encoding.char_to_token(char)
        if token is None:  # a character in no token (stripped by the normaliser): search the offsets
            return bisect.bisect_left([a for a, _ in encoding.offsets], char)
        return token if encoding.token_to_chars(token)[0] >= char else token + 1

    def measure(
        self,
        conversations: Sequence[Sequence[Message]],
        max_seq_len: int,
        batch: int = 8192,
        rows: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return per conversation (or per index in `rows`) its token count and how many
        tokens train after truncation at `max_seq_len`."""
        picked = list(range(len(conversations))) if rows is None else list(rows)
        lengths = np.zeros(len(picked), dtype=np.int64)
        trained = np.zeros(len(picked), dtype=np.int64)
        for lo in range(0, len(picked), batch):
            rendered = [self.render(conversations[j]) for j in picked[lo : lo + batch]]
            heads = self._heads()
            cut = []
            for r in rendered:
                head = next(((h, n) for h, n in heads if r.text.startswith(h)), ("", 0))
                cut.append(head)
            rests = [r.text[len(h) :] for r, (h, _) in zip(rendered, cut)]
            for i, (r, (head, n_head), rest, enc) in enumerate(
                zip(rendered, cut, rests, self._encode(rests)), start=lo
            ):
                n = len(enc.ids)
                lengths[i] = n_head + n
                for start, end in r.spans:
                    a = n_head + self._first_token_from(enc, start - len(head), len(rest), n)
                    b = n_head + self._first_token_from(enc, end - len(head), len(rest), n)
                    trained[i] += min(b, max_seq_len) - min(a, max_seq_len)
        return lengths, trained

    @property
    def byte_level(self) -> bool:
        """Whether every token covers at least one byte of the text (byte-level BPE: GPT-2,
        Llama 3, SmolLM, Qwen): then a text of at most N UTF-8 bytes has at most N tokens."""
        from tokenizers import decoders

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        return backend is not None and isinstance(backend.decoder, decoders.ByteLevel)

    def bytes_bound(self, conversations: Sequence[Sequence[Message]]) -> np.ndarray:
        """UTF-8 bytes of each rendered conversation: with `byte_level`, an upper bound on its tokens."""
        return np.fromiter(
            (len(self.render(c).text.encode()) for c in conversations), dtype=np.int64, count=len(conversations)
        )

    def segments(self, messages: Sequence[Message], max_seq_len: int) -> list[tuple[str, str]]:
        """Return the rendered text in pieces marked "masked", "trained" or "cut" (past max_seq_len)."""
        r = self.render(messages)
        [enc] = self._encode([r.text])
        [example] = self.tokenize([messages], len(enc.ids))
        states = [
            "cut" if t >= max_seq_len else "masked" if label == IGNORE else "trained"
            for t, label in enumerate(example["labels"])
        ]
        out: list[tuple[str, str]] = []
        for t, state in enumerate(states):
            start = 0 if t == 0 else enc.offsets[t][0]
            end = enc.offsets[t + 1][0] if t + 1 < len(states) else len(r.text)
            if out and out[-1][1] == state:
                out[-1] = (out[-1][0] + r.text[start:end], state)
            else:
                out.append((r.text[start:end], state))
        return out
