"""How well a collection answers: recall@k and MRR of labelled questions, with a report.

    questions = read_questions(Path("labelled.jsonl"))   # {"question": …, "relevant": ["faq.jsonl#ship-ca", …]}
    result = evaluate_retrieval(retriever, "handbook", questions, k=5)
    result.metrics   # {"recall_at_k": 0.92, "mrr": 0.81, "mean_best_score": 0.63}

A retrieved chunk is relevant when its id or its source is listed for the question (label by
document or by chunk). `recall_at_k`: share of questions with a relevant chunk among the first
k; `mrr`: mean of 1/rank of the first relevant chunk (0 when none is in the first k). Rules in
`collections.rules` (the gate's language: `recall_at_k >= 0.8`) give the verdict; the report
shows the figures, the rank histogram and the questions that found nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.retrieval import Retriever

RETRIEVAL_METRICS = ("recall_at_k", "mrr", "mean_best_score")


class QuestionsError(ValueError):
    """A labelled question set that cannot be used; says the file and line."""


@dataclass
class RetrievalResult:
    collection: str
    version: str
    k: int
    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)  # question, relevant, rank, hits
    rules: list[str] = field(default_factory=list)  # one line per rule: outcome, rule, values
    passed: bool = True


def read_questions(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise QuestionsError(f"{path}: cannot read: {err}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise QuestionsError(f"{path}:{n}: not JSON ({err})") from None
        question, relevant = (row.get("question"), row.get("relevant")) if isinstance(row, dict) else (None, None)
        if not isinstance(question, str) or not question.strip():
            raise QuestionsError(f"{path}:{n}: no question (a non-empty `question` string)")
        if isinstance(relevant, str):
            relevant = [relevant]
        if not isinstance(relevant, list) or not relevant or not all(isinstance(r, str) for r in relevant):
            raise QuestionsError(f"{path}:{n}: `relevant` must list the sources or chunk ids that answer it")
        out.append((question, relevant))
    if not out:
        raise QuestionsError(f"{path}: no questions")
    return out


def evaluate_retrieval(
    retriever: Retriever, collection: str, questions: list[tuple[str, list[str]]], k: int, rules: list[str] = ()
) -> RetrievalResult:
    from tuneloop.gate import Figures, evaluate_rule, parse_rule

    examples = []
    for question, relevant in questions:
        hits = retriever.search(collection, question, k)
        wanted = set(relevant)
        rank = next((i for i, h in enumerate(hits, 1) if h.id in wanted or h.source in wanted), None)
        examples.append(
            {
                "question": question,
                "relevant": relevant,
                "rank": rank,
                "best_score": hits[0].score if hits else None,
                "hits": [h.cite() for h in hits],
            }
        )
    n = len(examples)
    metrics = {
        "recall_at_k": sum(e["rank"] is not None for e in examples) / n,
        "mrr": sum(1 / e["rank"] for e in examples if e["rank"]) / n,
        "mean_best_score": sum(e["best_score"] or 0.0 for e in examples) / n,
    }
    results = [r for rule in rules for r in evaluate_rule(parse_rule(rule), Figures.flat(metrics, None))]
    version = retriever.store(collection).version
    return RetrievalResult(
        collection,
        version,
        k,
        metrics,
        examples,
        [r.line() for r in results],
        all(r.outcome == "pass" for r in results),
    )


def write_retrieval_report(result: RetrievalResult, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneloop.reports import Table, figure_html, fmt, page, png_base64

    ranks = [e["rank"] for e in result.examples]
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [str(i) for i in range(1, result.k + 1)] + ["none"]
    ax.bar(labels, [ranks.count(i) for i in range(1, result.k + 1)] + [ranks.count(None)])
    ax.set(xlabel="rank of the first relevant chunk", ylabel="questions", title=f"{result.collection}, k={result.k}")
    picture = figure_html("Where the first relevant chunk was found", png_base64(fig))
    plt.close(fig)
    missed = [e for e in result.examples if e["rank"] is None]
    body = (
        f"<h1>Retrieval: {result.collection} (version {result.version})</h1>"
        + Table(["metric", "value"], [[m, fmt(v)] for m, v in result.metrics.items()], title="Figures").html()
        + (Table(["rule"], [[r] for r in result.rules], title="Rules").html() if result.rules else "")
        + picture
        + Table(
            ["question", "relevant", "retrieved instead (best first)"],
            [[e["question"], ", ".join(e["relevant"]), ", ".join(h["source"] for h in e["hits"])] for e in missed],
            title=f"Questions that found nothing relevant ({len(missed)})",
        ).html()
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(f"retrieval {result.collection}", body))
    return out
