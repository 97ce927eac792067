"""Fine-tuning stage: LoRA on a base model with the HF Trainer and PEFT."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from transformers import TrainerCallback

from tuneloop.config import ModelConfig, TrainConfig
from tuneloop.models import BaseRef, load_base, save_adapter_artifact

log = logging.getLogger(__name__)


@dataclass
class TrainedAdapter:
    artifact_dir: Path
    base: BaseRef
    steps: int
    final_loss: float
    train_tokens: int
    tokens_per_second: float


def tokenize_examples(tokenizer, frame: pd.DataFrame, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Render each conversation with the chat template; loss only on assistant turns.

    Rows without a `messages` column are read as one user prompt and its response. A row with
    no trained token left after truncation teaches nothing and is left out (validation's
    loss-mask contract reports such rows before training).
    """
    from tuneloop.chat import IGNORE, ChatRenderer

    if "messages" in frame:
        conversations = list(frame["messages"])
    else:
        conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                         for p, r in zip(frame["prompt"], frame["response"])]
    examples = ChatRenderer(tokenizer).tokenize(conversations, max_seq_len)
    return [e for e in examples if any(label != IGNORE for label in e["labels"])]


class MetricsBuffer(TrainerCallback):
    """Keep per-step figures so they reach MLflow in one batch at the end.

    One MLflow call costs ~20 ms; per-step calls would cost more than a tiny model's step.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "learning_rate", "grad_norm"):
            if logs and key in logs:
                self.rows.append((state.global_step, f"train/{key}", float(logs[key])))


@task(name="finetune-lora")
def finetune_lora(
    train: pd.DataFrame, base: BaseRef, model_cfg: ModelConfig, cfg: TrainConfig,
    out_dir: Path, run_id: str,
) -> TrainedAdapter:
    """Fine-tune a LoRA adapter on `train`, log its curve to MLflow run `run_id`, save it."""
    import mlflow
    import torch
    from mlflow.entities import Metric
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    model, tok = load_base(base, model_cfg.dtype)
    examples = tokenize_examples(tok, train, cfg.max_seq_len)
    if not examples:
        raise ValueError(f"No training example fits max_seq_len={cfg.max_seq_len}: raise it")
    peft_model = get_peft_model(model, LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM",
    ))
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"), max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=True, dataloader_num_workers=0,
        lr_scheduler_type="constant", remove_unused_columns=False,
    )
    metrics = MetricsBuffer()
    trainer = Trainer(
        model=peft_model, args=args, train_dataset=examples, callbacks=[metrics],
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; MLflow has them
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    steps = result.global_step
    # Tokens seen: examples cycle through the epochs the Trainer ran.
    seen = steps * cfg.batch_size
    lengths = [len(e["input_ids"]) for e in examples]
    tokens = sum(lengths[i % len(lengths)] for i in range(seen))
    losses = [v for _, k, v in metrics.rows if k == "train/loss"]
    final_loss = losses[-1] if losses else float(result.training_loss)
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, s) for s, k, v in metrics.rows]
    batch += [Metric("train/tokens_per_second", tokens / seconds, now, steps),
              Metric("train/final_loss", final_loss, now, steps)]
    mlflow.MlflowClient().log_batch(run_id, metrics=batch)
    artifact = save_adapter_artifact(peft_model, tok, base, out_dir / "artifact")
    log.info("Trained %d steps, final loss %.4f, %.0f tok/s", steps, final_loss, tokens / seconds)
    return TrainedAdapter(artifact, base, steps, final_loss, tokens, tokens / seconds)


@task(name="prepare-base-model", retries=1)
def prepare_base_model(cfg: ModelConfig, models_dir: Path) -> BaseRef:
    """Return a verifiable reference to the base model, building a builtin one once."""
    from tuneloop.models import resolve_base

    return resolve_base(cfg.base, models_dir)
