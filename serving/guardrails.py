"""Output guardrails: what a route lets through of a model's answer, checked before the client sees it.

    guard = OutputGuard(policy)                # one per route (serve.guardrails.chat / .completions)
    checked = guard.check(answer_text)         # -> Checked(text, blocked, actions, entities, toxicity)
    stream = guard.stream()
    for delta in deltas:
        visible = stream.feed(delta)           # what may be sent now ("" while it is held back)
        if stream.blocked:                     # stop decoding; the stream ends with content_filter
            break
    visible = stream.finish()                  # the rest, checked

PII findings are presidio's (`tuneloop.safety.PiiScanner`) and toxicity is scored per sentence
with the same classifier as evaluation and monitoring. A stream releases text only once it has
been checked: it holds back its last `stream_holdback_chars` characters and the word being
written, so an email or a phone number arriving token by token is redacted (or blocks the
answer) before any of it leaves, and a toxic sentence stops the stream before the word that made
it toxic is sent. `check` is the same machine fed the whole answer at once, so a streamed and a
non-streamed answer get the same verdict.

No guardrail library does this here: NeMo Guardrails and guardrails-ai wrap an LLM call (and
want a hub or an LLM to judge); what the gateway needs is a check of text it already has, in
the event loop, at token granularity, with the detectors the project already ships.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneloop.config import OutputPolicy

log = logging.getLogger("ray.serve")

_SENTENCE = re.compile(r"[^.!?\n]+[.!?\n]*")
_SENTENCE_END = re.compile(r"[.!?\n]")
_CONTEXT = 64  # characters before the released point that presidio re-reads (an entity cut by a release)


@dataclass
class Checked:
    """One answer as a route lets it through."""

    text: str  # what the client gets
    blocked: str | None = None  # "pii" | "toxicity": the answer was refused
    actions: list[str] = field(default_factory=list)  # pii_redacted, pii_blocked, toxicity_flagged, toxicity_blocked
    entities: list[str] = field(default_factory=list)  # PII types found
    toxicity: float = 0.0  # the highest sentence probability scored (0 with toxicity off)

    @property
    def changed(self) -> bool:
        """Whether the client gets other text than the model wrote (its logprobs would tell it)."""
        return any(a in ("pii_redacted", "pii_blocked", "toxicity_blocked") for a in self.actions)

    def filter_results(self) -> dict[str, Any] | None:
        """The response's `content_filter_results` (the field Azure OpenAI's clients read); None: nothing acted."""
        if not self.actions:
            return None
        return {
            "pii": {
                "filtered": "pii_blocked" in self.actions or "pii_redacted" in self.actions,
                "action": "block" if "pii_blocked" in self.actions else "redact",
                "entities": self.entities,
            }
            if self.entities
            else {"filtered": False},
            "toxicity": {
                "filtered": "toxicity_blocked" in self.actions,
                "flagged": "toxicity_flagged" in self.actions,
                "score": round(self.toxicity, 4),
            },
        }


def _usable_entities(entities: Sequence[str]) -> list[str]:
    from tuneloop.safety import NER_ENTITIES, ner_available

    if ner_available():
        return list(entities)
    dropped = sorted(set(entities) & set(NER_ENTITIES))
    if dropped:
        log.warning("No spaCy model: answers are not checked for %s", dropped)
    return [e for e in entities if e not in NER_ENTITIES]


class OutputGuard:
    """A route's output policy, ready to check answers (see the module docstring)."""

    def __init__(
        self,
        policy: OutputPolicy,
        score: Callable[[Sequence[str]], list[float]] | None = None,
    ) -> None:
        self.policy = policy
        self.scanner = None
        if policy.pii != "off":
            entities = _usable_entities(policy.pii_entities)
            if entities:
                from tuneloop.safety import PiiScanner

                self.scanner = PiiScanner(entities)
        self.score = None
        if policy.toxicity != "off":
            if score is None:
                from tuneloop.safety import toxicity_probabilities as score
            self.score = score

    @property
    def active(self) -> bool:
        return self.scanner is not None or self.score is not None

    def warm_up(self) -> None:
        """Load presidio and the classifier now, not with the first answer."""
        self.check("warm-up: alice@example.com, a fine sentence.")

    def stream(self) -> GuardedStream:
        return GuardedStream(self)

    def check(self, text: str) -> Checked:
        stream = GuardedStream(self)
        stream.text = text
        visible = stream.finish()
        return stream.result(visible)


class GuardedStream:
    """One answer checked as it is written: `feed` deltas, then `finish`; `blocked` says when to stop."""

    def __init__(self, guard: OutputGuard) -> None:
        self.guard = guard
        self.text = ""  # everything the model wrote so far
        self.released = 0  # characters of `text` already let through
        self.blocked: str | None = None
        self.actions: list[str] = []
        self.entities: list[str] = []
        self.toxicity = 0.0

    def feed(self, delta: str) -> str:
        """Take the next piece of the answer; return what may be sent now."""
        if self.blocked is not None or not delta:
            return ""
        self.text += delta
        if not self.guard.active:
            self.released = len(self.text)
            return delta
        if all(c.isalnum() for c in delta):  # in the middle of a word: nothing new to judge or release
            return ""
        return self._release(final=False)

    def finish(self) -> str:
        """The answer is complete: return the rest of it that may be sent."""
        if self.blocked is not None:
            return ""
        if not self.guard.active:
            rest, self.released = self.text[self.released :], len(self.text)
            return rest
        return self._release(final=True)

    def result(self, visible: str) -> Checked:
        """The verdict over the whole answer; `visible` is what the client got (a refusal when blocked)."""
        if self.blocked is not None and not visible:
            visible = self.guard.policy.refusal
        return Checked(visible, self.blocked, list(self.actions), sorted(set(self.entities)), self.toxicity)

    # ------------------------------------------------------------------

    def _act(self, action: str) -> None:
        if action not in self.actions:
            self.actions.append(action)

    def _hold_point(self) -> int:
        """Where the checked-and-safe prefix may end: before the last `holdback` characters and
        never inside the word being written."""
        text = self.text
        p = len(text) - self.guard.policy.stream_holdback_chars
        while p > self.released and not text[p - 1].isspace():
            p -= 1
        return max(p, self.released)

    def _toxic(self) -> bool:
        """Score the sentences not yet fully released; True when the answer must stop here."""
        policy = self.guard.policy
        ends = [m.end() for m in _SENTENCE_END.finditer(self.text, 0, self.released)]
        start = ends[-1] if ends else 0  # the sentence the released point is in
        sentences = [m.group().strip() for m in _SENTENCE.finditer(self.text, start)]
        sentences = [s for s in sentences if s]
        if not sentences:
            return False
        worst = max(self.guard.score(sentences))
        self.toxicity = max(self.toxicity, worst)
        if worst < policy.toxicity_threshold:
            return False
        if policy.toxicity == "block":
            self.blocked = "toxicity"
            self._act("toxicity_blocked")
            return True
        self._act("toxicity_flagged")
        return False

    def _release(self, final: bool) -> str:
        if self.guard.score is not None and self._toxic():
            return ""
        boundary = len(self.text) if final else self._hold_point()
        findings: list[tuple[int, int, str]] = []
        if self.guard.scanner is not None:
            lo = max(0, self.released - _CONTEXT)
            for f in self.guard.scanner.scan([self.text[lo:]])[0]:
                start, end = lo + f.start, lo + f.end
                if end > self.released:  # what was let through is gone; an entity cut by it is clipped
                    findings.append((max(start, self.released), end, f.entity))
            if findings and self.guard.policy.pii == "block":
                self.blocked = "pii"
                self._act("pii_blocked")
                self.entities.extend(e for _, _, e in findings)
                return ""
            moved = True
            while moved:  # never release half an entity (overlapping ones included)
                moved = False
                for start, end, _ in findings:
                    if start < boundary < end:
                        boundary, moved = start, True
        if boundary <= self.released:
            return ""
        piece, cursor = [], self.released
        kept_end = self.released
        for start, end, entity in sorted(findings, key=lambda f: (f[0], -(f[1] - f[0]))):
            if end > boundary or start < kept_end:  # held back for now, or inside a longer finding
                continue
            piece.append(self.text[cursor:start] + f"<{entity}>")
            cursor = kept_end = end
            self.entities.append(entity)
            self._act("pii_redacted")
        piece.append(self.text[cursor:boundary])
        self.released = boundary
        return "".join(piece)
