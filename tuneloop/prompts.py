"""A prompt version as every layer sees it: the template, its variables, and how a request fills it.

    spec = PromptSpec.from_template("support", "3", [
        {"role": "system", "content": "You answer for {{product}}. Be brief."},
        {"role": "user", "content": "Q: Is the sky blue?"}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Q: {{input}}"},
    ])
    spec.render([{"role": "user", "content": "Is water wet?"}], {"product": "Acme"})
    # -> system, the few-shot pair, then "Q: Is water wet?"

Templates are MLflow Prompt Registry templates (`{{ name }}` variables, text or chat). A bound
prompt renders before the model sees a request, in serving, evaluation and training alike:

- its messages come first (system prompt, few-shot examples), the client's messages follow;
- `{{input}}` is the client's last user message: the template message holding it wraps that
  message (the client's earlier turns go before it), so a template can frame each question;
- every other variable comes from the request (`prompt_variables`); a missing or an unknown one
  is the caller's error (`PromptVariablesError`, a 400 in serving), never a template crash.

Substitution is one pass of plain text replacement: a value holding `{{x}}` stays as written.

A prompt version may bind a collection (`retrieval: {collection, k}`): then `{{context}}` is not
the client's to fill but the `k` chunks retrieved for the client's last user message, numbered
`[1] …` so an answer can cite them (tuneloop.retrieval renders it, in serving and evaluation alike).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")  # MLflow's prompt variables
INPUT = "input"
CONTEXT = "context"  # filled by retrieval when the version binds a collection
Role = Literal["system", "user", "assistant"]


class PromptVariablesError(ValueError):
    """A request does not fill a prompt's variables (missing or unknown ones): the caller's error."""


class PromptMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Role
    content: str


def template_messages(template: str | Sequence[Mapping[str, str]]) -> list[PromptMessage]:
    """A registry template as messages: a text prompt is one user message."""
    if isinstance(template, str):
        return [PromptMessage(role="user", content=template)]
    return [PromptMessage.model_validate(dict(m)) for m in template]


def template_sha256(messages: Sequence[PromptMessage]) -> str:
    canonical = json.dumps([m.model_dump() for m in messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Retrieval(BaseModel):
    """A collection a prompt version retrieves from, and how many chunks fill its `{{context}}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    collection: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    k: int = Field(4, ge=1, le=20)


def prompt_sha256(messages: Sequence[PromptMessage], retrieval: Retrieval | None = None) -> str:
    """What a version's hash covers: its template, and the collection it binds (when it binds one)."""
    digest = template_sha256(messages)
    if retrieval is None:
        return digest
    return hashlib.sha256(f"{digest}\x00{retrieval.model_dump_json()}".encode()).hexdigest()


class PromptSpec(BaseModel):
    """One immutable prompt version, resolved from the registry (what a route binds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    version: str
    messages: tuple[PromptMessage, ...] = Field(min_length=1)
    sha256: str
    retrieval: Retrieval | None = None

    @classmethod
    def from_template(
        cls,
        name: str,
        version: str,
        template: str | Sequence[Mapping[str, str]],
        retrieval: Retrieval | Mapping[str, object] | None = None,
    ) -> PromptSpec:
        messages = template_messages(template)
        bound = Retrieval.model_validate(retrieval) if retrieval is not None else None
        if bound is not None and not any(CONTEXT in VARIABLE.findall(m.content) for m in messages):
            raise PromptVariablesError(
                f"The prompt {name} retrieves from {bound.collection} but has no {{{{context}}}} for the chunks"
            )
        return cls(
            name=name,
            version=str(version),
            messages=tuple(messages),
            sha256=prompt_sha256(messages, bound),
            retrieval=bound,
        )

    @property
    def ref(self) -> str:
        """`name/version`: what the inference log and lineage record."""
        return f"{self.name}/{self.version}"

    @property
    def variables(self) -> list[str]:
        """The variables a request fills (`input` excluded: the client's last user message is it)."""
        found = {v for m in self.messages for v in VARIABLE.findall(m.content)}
        return sorted(found - {INPUT} - ({CONTEXT} if self.retrieval else set()))

    @property
    def wraps_input(self) -> bool:
        return any(INPUT in VARIABLE.findall(m.content) for m in self.messages)

    def check_variables(self, values: Mapping[str, str]) -> None:
        wanted, given = set(self.variables), set(values)
        missing, unknown = sorted(wanted - given), sorted(given - wanted)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if unknown:
                parts.append(f"unknown {unknown}")
            raise PromptVariablesError(
                f"The prompt {self.ref} takes the variables {sorted(wanted) or 'none'} "
                f"(`prompt_variables`): {', '.join(parts)}"
            )

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        values: Mapping[str, str] | None = None,
        context: str | None = None,
    ) -> list[dict[str, str]]:
        """The conversation the model sees: this template filled, with the client's `messages` (and,
        for a version that retrieves, the retrieved `context`)."""
        values = dict(values or {})
        self.check_variables(values)
        if self.retrieval is not None:
            if context is None:
                raise PromptVariablesError(
                    f"The prompt {self.ref} retrieves from {self.retrieval.collection}: render it with its context"
                )
            values[CONTEXT] = context
        client = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.wraps_input:
            last = next((i for i in range(len(client) - 1, -1, -1) if client[i]["role"] == "user"), None)
            if last is None:
                raise PromptVariablesError(f"The prompt {self.ref} wraps the user's message, and there is none")
            values[INPUT] = client.pop(last)["content"]

        def fill(text: str) -> str:
            return VARIABLE.sub(lambda m: values.get(m.group(1), m.group(0)), text)

        rendered = [{"role": m.role, "content": fill(m.content)} for m in self.messages]
        if not self.wraps_input:
            return rendered + client
        at = next(i for i, m in enumerate(self.messages) if INPUT in VARIABLE.findall(m.content))
        return rendered[:at] + client + rendered[at:]

    def render_text(self, prompt: str, values: Mapping[str, str] | None = None) -> list[dict[str, str]]:
        """A single question (evaluation, training) rendered as the served route renders it."""
        return self.render([{"role": "user", "content": prompt}], values)
