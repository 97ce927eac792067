"""What the demo's model learns: the demo's data and training recipe through the real training flow,
without serving or monitoring, so the figures are the model's on a quiet machine.

    .venv/bin/python bench/learning.py [--replay-share 0.5] [--start-from champion] [--retrain-steps N]
        [--set key=value] [--home DIR]

Version 1 trains on the first task (ASDiv word problems) and is gated against the base model;
it is made champion; version 2 trains on the labelled medication set with a share of version
1's training rows replayed, and is gated against version 1 on both slices. Prints, per version
and slice, token F1 and exact match of the version and its reference with the paired gain and
its 95% interval (the gate's own figures), the gate's lines and the wall time of each training
(train + evaluation of both models). Needs Prefect's test harness (a temporary local API).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replay-share", type=float, default=0.5)
    parser.add_argument("--first-rows", type=int, default=400)
    parser.add_argument(
        "--start-from",
        choices=["base", "champion"],
        default="champion",
        help="what version 2 trains on (monitor.retrain_start_from)",
    )
    parser.add_argument("--retrain-steps", type=int, default=None, help="version 2's steps (default: the demo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra key.path=value")
    parser.add_argument("--home", type=Path, default=None, help="state dir (default: a new temporary one)")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from flows.training import training_flow
    from tasks.data import export_demo_data
    from tasks.registry import promote_champion
    from tasks.retrain import replay_rows
    from tuneloop.cli import DEMO_SETTINGS
    from tuneloop.config import load_config
    from tuneloop.state import DEFAULT_ENV, apply_environment

    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    home = args.home or Path(tempfile.mkdtemp(prefix="tuneloop-learning-"))
    cfg = load_config(
        None,
        [
            f"home={home}",
            *DEMO_SETTINGS,
            "registry.on_gate_pass=register_only",
            "validation.data_docs=false",
            *args.overrides,
        ],
    )
    apply_environment(cfg, prefect_api=False)
    data = export_demo_data.fn(home / "demo-data", args.first_rows, 1)

    def on(path: Path, slice_: str, replay: Path | None = None, **train):
        update = {"path": str(path), "slice": slice_, **({"replay_path": str(replay)} if replay else {})}
        return cfg.model_copy(
            update={"data": cfg.data.model_copy(update=update), "train": cfg.train.model_copy(update=train)}
        )

    def show(label: str, result, seconds: float) -> None:
        print(f"\n{label}: gate {result.decision} against {result.compared_with} ({seconds:.0f} s)")
        print(f"  {'slice':12} {'metric':12} {'reference':>9} {'version':>8}  gain [95% CI]")
        for d in result.comparison:
            if d.metric in ("token_f1", "exact_match"):
                mine = result.figures[d.slice][d.metric]
                print(
                    f"  {d.slice:12} {d.metric:12} {mine - d.mean:9.3f} {mine:8.3f}  "
                    f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
                )
        for line in result.rules:
            print(f"    {line}")

    with prefect_test_harness():
        start = time.perf_counter()
        first = training_flow(on(data.first_train, data.first_topic))
        show(f"v{first.version.version} on {data.first_topic}", first, time.perf_counter() - start)
        promote_champion.fn(first.version, cfg.registry, "bench/learning.py")
        rows = sum(1 for line in Path(data.drifted_train).read_text().splitlines() if line.strip())
        replay = replay_rows(first.version, rows, args.replay_share, "bench", home / "replay-source")
        replay_file = None
        if replay:
            replay_file = home / "replay.jsonl"
            replay_file.write_text("".join(json.dumps(r) + "\n" for r in replay))
        start = time.perf_counter()
        steps = {"max_steps": args.retrain_steps} if args.retrain_steps else {}
        second = training_flow(
            on(data.drifted_train, data.drifted_topic, replay_file, start_from=args.start_from, **steps)
        )
        show(
            f"v{second.version.version} on {data.drifted_topic} ({len(replay)} rows replayed, from the "
            f"{args.start_from})",
            second,
            time.perf_counter() - start,
        )


if __name__ == "__main__":
    main()
