"""What an evaluation costs with and without perplexity, in one process, on one model and slice.

    .venv/bin/python bench/eval_cost.py --artifact RUN/artifact --data DEMO_DATA/arithmetic.jsonl [--repeat 2]

`--artifact` is a trained version's artifact (e.g. `runs/<key>/artifact` in the state dir of
bench/learning.py or the demo); `--data` the JSONL it was trained on (its 20% held-out split
is the slice, as in the demo). Times `evaluate_model` (no cache) with the demo's settings,
first with the default metrics, then without perplexity, alternating `--repeat` times after an
untimed warm-up, and prints each time and the ratio of the means.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from tasks.data import load_split
    from tasks.evaluate import EvalSlice, evaluate_model
    from tuneloop.cli import DEMO_SETTINGS
    from tuneloop.config import EvalConfig, load_config

    cfg = load_config(None, [*DEMO_SETTINGS, f"data.path={args.data}", "data.slice=bench"])
    rows = load_split(cfg.data).eval
    sl = EvalSlice("bench", 1, "bench", rows)
    default = EvalConfig(**{**cfg.eval.model_dump(), "metrics": EvalConfig().metrics})
    without = default.model_copy(update={"metrics": [m for m in default.metrics if m != "perplexity"]})
    evaluate_model(args.artifact, [sl], without.model_copy(update={"max_examples": 8}), "warm-up")
    times: dict[str, list[float]] = {"with perplexity": [], "without perplexity": []}
    for _ in range(args.repeat):
        for name, settings in (("with perplexity", default), ("without perplexity", without)):
            start = time.perf_counter()
            evaluate_model(args.artifact, [sl], settings, name)
            times[name].append(time.perf_counter() - start)
            print(f"{name}: {times[name][-1]:.1f} s ({min(len(rows), settings.max_examples)} examples)", flush=True)
    ratio = statistics.mean(times["without perplexity"]) / statistics.mean(times["with perplexity"])
    print(f"mean without / with perplexity: {ratio:.2f}")


if __name__ == "__main__":
    main()
