"""Fine-tuning stage: LoRA, QLoRA or full fine-tuning with the HF Trainer, fast and resumable.

    trained = finetune(split.train, base, cfg.model, cfg.train, workdir, run_id)   # in a flow
    train_model(examples, base, model_cfg, train_cfg, out_dir)                      # no MLflow

What makes it faster than a plain Trainer + PEFT run (bench/finetune.py measures each):
- packing: a batch's examples in one row, no padding, no attention across examples; on
  CPU the prefix all of them share (system prompt and template) is computed once;
- the output head and the loss only on the tokens that train (answer tokens are a small
  share of instruction data; the head is a fifth of a 135M model's matmuls);
- bf16 on GPU, torch.compile and gradient checkpointing as switches.

Checkpoints are complete when they hold `COMPLETE_MARKER`, written after the Trainer saved
everything; a re-run with the same `out_dir` resumes from the newest complete one. The
training flow names that folder by `training_key` (the Prefect flow run id), so a task retry
and a restart of the same flow run both resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from transformers import Trainer, TrainerCallback

from tuneloop.chat import IGNORE
from tuneloop.config import REPO_ROOT, ModelConfig, TrainConfig
from tuneloop.models import (
    BaseModelError,
    BaseRef,
    artifact_kind,
    load_base,
    read_base_ref,
    save_adapter_artifact,
    save_full_artifact,
    write_artifact_metadata,
)

log = logging.getLogger(__name__)

COMPLETE_MARKER = "tuneloop-complete"  # written last into a checkpoint folder: the save finished
CONFIG_FILE = "train-config.json"  # in the checkpoint root: what the checkpoints were trained with
DEEPSPEED_DIR = REPO_ROOT / "infra" / "deepspeed"
# Dense bf16 tensor-core peaks (vendor data sheets), TFLOP/s, by a substring of the device name;
# first match wins. CPUs have no such table entry: MFU is left out there.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


class TrainingSetupError(ValueError):
    """A training that cannot run here (device, packages), found before any work."""


class TrainingOOMError(RuntimeError):
    """Training ran out of memory; the message says with which figures and what to lower."""


@dataclass
class TrainedAdapter:
    artifact_dir: Path
    base: BaseRef
    steps: int
    final_loss: float
    train_tokens: int
    tokens_per_second: float
    started_from: str = "base"  # or the artifact whose adapter trained on (the champion's)


@dataclass
class TrainingOutcome:
    """What `train_model` returns: the artifact and the figures of the run."""

    artifact_dir: Path
    steps: int
    final_loss: float
    train_tokens: int  # example tokens (prompt + answer, no padding) of the steps this process ran
    tokens_per_second: float
    resumed_from: Path | None
    metrics: list[tuple[int, str, float]] = field(default_factory=list)  # (step, key, value)
    params: dict[str, str] = field(default_factory=dict)


def training_key(model_cfg: ModelConfig, cfg: TrainConfig, data_digest: str) -> str:
    """Return the name of one training that holds across restarts: the Prefect flow run id.

    A task retry and a flow run started again (`prefect flow-run retry`, a worker picking the
    run up again) keep the flow run id, so they find its checkpoints and MLflow run. Outside a
    flow run, a digest of what the training depends on (base, train config, data) names it.
    """
    from prefect.runtime import flow_run

    if flow_run.id:
        return str(flow_run.id)
    inputs = {"model": model_cfg.model_dump(mode="json"), "train": cfg.model_dump(mode="json"), "data": data_digest}
    return "inputs-" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def tokenize_examples(tokenizer, frame: pd.DataFrame, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Render each conversation with the chat template; loss only on assistant turns.

    Rows without a `messages` column are read as one user prompt and its response. A row with
    no trained token left after truncation teaches nothing and is left out (validation's
    loss-mask contract reports such rows before training).
    """
    from tuneloop.chat import ChatRenderer

    if "messages" in frame:
        conversations = list(frame["messages"])
    else:
        conversations = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(frame["prompt"], frame["response"])
        ]
    examples = ChatRenderer(tokenizer).tokenize(conversations, max_seq_len)
    return [e for e in examples if any(label != IGNORE for label in e["labels"])]


# ---------------------------------------------------------------------------------------------
# Model: target modules, methods


def adapted_modules(peft_model: Any) -> list[str]:
    """The kinds of module a PEFT model put adapters on (`all-linear` resolves to their full paths)."""
    return sorted({name.rsplit(".", 1)[-1] for name in peft_model.peft_config["default"].target_modules})


def linear_params(model: Any) -> int:
    """Return the weights of every matmul a token goes through (linear layers and output head)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and not type(m).__module__.startswith("peft")
    )  # base weights only, not LoRA's A/B


def check_device(cfg: TrainConfig) -> str:
    """Return the device training runs on, or raise what this machine cannot do for `cfg`."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    if cfg.method == "qlora":
        if not cuda:
            raise TrainingSetupError(
                "train.method qlora needs a CUDA GPU (bitsandbytes 4-bit weights); "
                "none is visible here: use method lora on CPU"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainingSetupError("train.method qlora needs the bitsandbytes package: pip install bitsandbytes")
    if cfg.mixed_precision == "bf16" and not (cuda and torch.cuda.is_bf16_supported()):
        raise TrainingSetupError(
            "train.mixed_precision bf16 needs a CUDA GPU with bf16 (Ampere or newer): set mixed_precision: auto"
        )
    if cfg.deepspeed and not (DEEPSPEED_DIR / f"{cfg.deepspeed}.json").exists():
        raise TrainingSetupError(f"DeepSpeed config {DEEPSPEED_DIR / (cfg.deepspeed + '.json')} is missing")
    return "cuda" if cuda else "cpu"


def resolve_packing(cfg: TrainConfig, device: str) -> str:
    """Return the packing mode `cfg.packing` means on `device` (auto: the fastest measured)."""
    if cfg.packing != "auto":
        return cfg.packing
    # CPU (bench/finetune.py): the shared prefix of chat data is most of a short example.
    # GPU: flash / SDPA varlen kernels take position ids; a dense prefix mask would cost them.
    return "shared_prefix" if device == "cpu" else "padding_free"


def build_model(
    base: BaseRef, model_cfg: ModelConfig, cfg: TrainConfig, start: Path | None = None
) -> tuple[Any, Any, list[str]]:
    """Load the base for `cfg.method`; return (trainable model, tokenizer, adapted module names).

    With `start`, an adapter artifact on the same base (the champion's), that adapter trains on
    instead of a new one: its rank and modules, whatever `cfg` says.
    """
    import torch
    from transformers import set_seed

    if start is not None and (started := read_base_ref(start)).sha256 != base.sha256:
        raise TrainingSetupError(
            f"The adapter to start from ({start}) was trained on base {started.location} "
            f"(sha256 {started.sha256[:12]}), not on {base.location} ({base.sha256[:12]})"
        )
    set_seed(cfg.seed)  # LoRA's A matrices start random: the same seed, the same adapter

    quantization = None
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model, tok = load_base(base, model_cfg.dtype, quantization_config=quantization)
    model.config.use_cache = False  # a KV cache in training also hides packed-sequence boundaries
    if cfg.method == "full":
        return model, tok, []
    from peft import LoraConfig, get_peft_model

    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if start is not None:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, start / "adapter", is_trainable=True)
        return peft_model, tok, adapted_modules(peft_model)
    # auto: PEFT's own `all-linear` (every linear layer of attention and MLP blocks, not the
    # output head; Llama/Qwen/Mistral q/k/v/o/gate/up/down_proj, GPT-2's Conv1D c_attn/c_proj/c_fc).
    targets = "all-linear" if cfg.target_modules in ("auto", "all-linear") else list(cfg.target_modules)
    try:
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    except ValueError as err:  # e.g. "Target modules {'q_projx'} not found in the base model"
        raise TrainingSetupError(f"train.target_modules {targets}: {err}") from None
    return peft_model, tok, adapted_modules(peft_model)


# ---------------------------------------------------------------------------------------------
# Batches


class PackedCollator:
    """Put a batch's examples into one row: no padding, no attention across examples.

    Each example keeps its own position ids (0, 1, …). `target_ids[t]` is the token that the
    output at row position t must predict (IGNORE where nothing trains), so the model computes
    its output head only where a target is. With `share_prefix`, the leading tokens every
    example of the batch shares — up to the first trained token — appear once; every example
    attends to that one copy (a 4-D mask), which gives the same outputs and gradients as
    computing it per example. Without a shared prefix, the boundaries are read from the
    position ids (flash / SDPA variable-length attention, and transformers' packed-sequence
    mask for SDPA).
    """

    def __init__(self, share_prefix: bool) -> None:
        self.share_prefix = share_prefix

    @staticmethod
    def shared_prefix(features: list[dict[str, list[int]]]) -> int:
        """Return how many leading tokens all examples share with no trained token after them."""
        first = features[0]["input_ids"]
        n = min(len(f["input_ids"]) for f in features) - 1  # each example keeps one token of its own
        for f in features:
            ids, labels = f["input_ids"], f["labels"]
            trained = next((t for t, label in enumerate(labels) if label != IGNORE), len(labels))
            n = min(n, trained - 1)  # the output at position t predicts label t + 1
            n = next((t for t in range(n) if ids[t] != first[t]), n)
        return max(n, 0)

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        prefix = self.shared_prefix(features) if self.share_prefix else 0
        ids, positions, targets = list(features[0]["input_ids"][:prefix]), list(range(prefix)), [IGNORE] * prefix
        spans = []
        for f in features:
            n = len(f["input_ids"])
            spans.append((len(ids), n - prefix))
            ids += f["input_ids"][prefix:]
            positions += range(prefix, n)
            targets += f["labels"][prefix + 1 :] + [IGNORE]
        batch = {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([positions]),
            "target_ids": torch.tensor([targets]),
            "example_tokens": sum(len(f["input_ids"]) for f in features),
        }
        if prefix:
            size = len(ids)
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[:prefix, :prefix] = torch.ones(prefix, prefix, dtype=torch.bool).tril()
            for start, n in spans:
                mask[start : start + n, :prefix] = True
                mask[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
            batch["attention_mask"] = mask[None, None]  # True: attend (SDPA's convention)
        return batch


class TuneloopTrainer(Trainer):
    """The Trainer with the loss of packed batches computed only where a token trains.

    Records the example tokens (no padding) and the tokens the model computed (a packed row's
    length; the non-pad tokens of a padded batch) of every step in `token_log`.
    """

    def __init__(self, *args: Any, token_log: list[tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_log = token_log
        self._keeps_logits: bool | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        example_tokens = inputs.pop("example_tokens", None)
        mask = inputs.get("attention_mask")
        if example_tokens is None:  # a padded batch: padding is waste, not model FLOPs
            example_tokens = computed = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        else:  # a packed row: with a shared prefix, fewer tokens than its examples hold
            computed = inputs["input_ids"].shape[-1]
        self.token_log.append((int(example_tokens), int(computed)))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch.nn.functional as F

        if "target_ids" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        targets = inputs.pop("target_ids")[0]
        keep = (targets != IGNORE).nonzero().squeeze(-1)
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        logits = outputs.logits[0]
        if logits.shape[0] != keep.numel():  # a model whose forward ignores logits_to_keep
            logits = logits[keep]
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / max(keep.numel(), 1)
        return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------------------------------------
# Figures


def peak_tflops(device: str) -> float | None:
    """Return the device's dense bf16 peak in TFLOP/s, or None where unknown (every CPU)."""
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def peak_memory_mb(device: str) -> float:
    """Return peak memory in MB: allocated by torch on GPU, the process's resident set on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StepFigures(TrainerCallback):
    """Keep per-step figures (loss, lr, grad norm, tokens/s, MFU) and send them to MLflow in batches.

    One MLflow call costs ~20 ms, more than a tiny model's step: figures go out at each
    checkpoint (so a killed run keeps those of its saved steps) and at the end, one call each.
    """

    def __init__(
        self, token_log: list[tuple[int, int]], flops_per_token: float, peak: float | None, run_id: str | None
    ) -> None:
        self.token_log, self.flops_per_token, self.peak, self.run_id = token_log, flops_per_token, peak, run_id
        self.rows: list[tuple[int, str, float]] = []
        self._sent = 0
        self._last = 0.0
        self._loss = float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        from tuneloop.progress import report

        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        report(
            "train",
            state.global_step,
            state.max_steps,
            "steps" if math.isnan(self._loss) else f"steps, loss {self._loss:.4g}",
        )
        if not self.token_log:
            return
        example_tokens, computed = self.token_log[-1]
        step = state.global_step
        self.rows += [
            (step, "train/tokens_per_second", example_tokens / seconds),
            (step, "train/step_seconds", seconds),
        ]
        # 6 · N · tokens: the usual training FLOPs (forward 2N, backward 4N), N = matmul weights.
        tflops = 6 * self.flops_per_token * computed / seconds / 1e12
        self.rows.append((step, "train/model_tflops", tflops))
        if self.peak:
            self.rows.append((step, "train/mfu", tflops / self.peak))

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "learning_rate", "grad_norm"):
            if logs and key in logs:
                self.rows.append((state.global_step, f"train/{key}", float(logs[key])))
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])

    def on_save(self, args, state, control, **kwargs):
        self.flush()

    def flush(self, extra: list[tuple[int, str, float]] = ()) -> None:
        rows = self.rows[self._sent :] + list(extra)
        self._sent = len(self.rows)
        if self.run_id and rows:
            import mlflow
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, s) for s, k, v in rows]
            for lo in range(0, len(metrics), 1000):  # MLflow's limit per batch call
                mlflow.MlflowClient().log_batch(self.run_id, metrics=metrics[lo : lo + 1000])


# ---------------------------------------------------------------------------------------------
# Checkpoints


class MarkComplete(TrainerCallback):
    """Write `COMPLETE_MARKER` into a checkpoint once the Trainer has saved all of it."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tmp = folder / (COMPLETE_MARKER + ".tmp")
            tmp.write_text(json.dumps({"step": state.global_step}))
            tmp.replace(folder / COMPLETE_MARKER)  # atomic: the marker is there whole or not at all


def last_complete_checkpoint(root: Path, remove_incomplete: bool = True) -> Path | None:
    """Return the newest checkpoint under `root` with its marker; remove those without one.

    A folder without the marker is a save that was cut off (killed mid-write): resuming from it
    would load a truncated optimizer state or none at all. In a multi-process run only rank 0
    removes (`remove_incomplete`); every rank picks the same complete checkpoint.
    """
    if not root.is_dir():
        return None
    complete = []
    for folder in root.glob("checkpoint-*"):
        if (folder / COMPLETE_MARKER).exists():
            complete.append((int(folder.name.rsplit("-", 1)[-1]), folder))
        elif remove_incomplete:
            log.warning("Skipping incomplete checkpoint %s (no %s): removed", folder, COMPLETE_MARKER)
            shutil.rmtree(folder, ignore_errors=True)
    return max(complete)[1] if complete else None


def _check_same_training(root: Path, cfg: TrainConfig, base: BaseRef) -> None:
    """Refuse to resume checkpoints that another config or base wrote; record ours otherwise.

    Without a complete checkpoint there is nothing to resume (say, a first attempt that ran out
    of memory before its first save): the folder is taken over by the new config.
    """
    fingerprint = {"train": cfg.model_dump(mode="json"), "base": base.to_json()}
    path = root / CONFIG_FILE
    if path.exists() and list(root.glob(f"checkpoint-*/{COMPLETE_MARKER}")):
        saved = json.loads(path.read_text())
        if saved != fingerprint:
            changed = sorted(
                k for k in fingerprint["train"] if saved.get("train", {}).get(k) != fingerprint["train"][k]
            )
            raise TrainingSetupError(
                f"Checkpoints in {root} were written by another training (changed: {changed or ['base']}): "
                "delete the folder to start over, or train into a new one"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Training


def training_arguments(cfg: TrainConfig, device: str, output_dir: Path, packing: str) -> Any:
    """Return the Trainer's arguments for `cfg` on `device`."""
    from transformers import TrainingArguments

    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device == "cuda" and _bf16_supported())
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        bf16=bf16,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,  # ≥ 2: rotation runs before the marker, so one complete checkpoint always stays
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        torch_compile=cfg.compile,
        deepspeed=str(DEEPSPEED_DIR / f"{cfg.deepspeed}.json") if cfg.deepspeed else None,
    )


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _oom_message(
    err: BaseException, cfg: TrainConfig, device: str, packing: str, token_log: list[tuple[int, int]]
) -> str:
    largest = max((c for _, c in token_log), default=None)
    tried = f"the largest batch so far had {largest} tokens; " if largest else ""
    lower = ["train.batch_size", "train.max_seq_len"]
    if not cfg.gradient_checkpointing:
        lower.append("or set train.gradient_checkpointing: true")
    if cfg.method == "lora" and device == "cuda":
        lower.append("or use method qlora (4-bit base)")
    if cfg.method == "full" and cfg.deepspeed != "zero3":
        lower.append("or shard with deepspeed: zero3")
    return (
        f"Out of memory training on {device} with batch_size={cfg.batch_size} × max_seq_len={cfg.max_seq_len} "
        f"(up to {cfg.batch_size * cfg.max_seq_len} tokens per step, packing {packing}); {tried}"
        f"lower {', '.join(lower)}. ({type(err).__name__}: {str(err)[:200]})"
    )


def train_model(
    examples: list[dict[str, list[int]]],
    base: BaseRef,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    run_id: str | None = None,
    *,
    loaded: tuple[Any, Any, list[str]] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    device: str | None = None,
) -> TrainingOutcome:
    """Train on tokenized `examples`, resuming from a complete checkpoint in `out_dir`; save the artifact.

    `loaded` is a (model, tokenizer, targets) already built with `build_model` (the caller
    tokenized with that tokenizer), `device` what `check_device` said for `cfg` (None: ask it);
    with `run_id`, per-step figures go to that MLflow run.
    Under a distributed launcher (torchrun, deepspeed, accelerate, Ray Train: `RANK` set) every
    rank trains, and rank 0 alone writes checkpoint markers, figures and the artifact.
    """
    import os

    import torch

    device = device or check_device(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    model, tok, targets = loaded or build_model(base, model_cfg, cfg)
    packing = resolve_packing(cfg, device)
    if packing == "shared_prefix" and model.config._attn_implementation != "sdpa":
        raise TrainingSetupError(
            f"packing shared_prefix needs SDPA attention; the model uses "
            f"{model.config._attn_implementation}: set packing: padding_free"
        )
    ckpt_root = out_dir / "checkpoints"
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        _check_same_training(ckpt_root, cfg, base)
    resume = last_complete_checkpoint(ckpt_root, remove_incomplete=main_rank)
    token_log: list[tuple[int, int]] = []
    figures = StepFigures(token_log, linear_params(model), peak_tflops(device), run_id if main_rank else None)
    trainer = TuneloopTrainer(
        model=model,
        args=training_arguments(cfg, device, ckpt_root, packing),
        train_dataset=examples,
        data_collator=_collator(packing, tok),
        callbacks=[figures, MarkComplete(), *(callbacks or [])],
        token_log=token_log,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; MLflow has them
    if resume:
        log.info("Resuming from %s", resume)
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        message = _oom_message(err, cfg, device, packing, token_log)
        del trainer, model
        if device == "cuda":
            torch.cuda.empty_cache()
        raise TrainingOOMError(message) from err
    seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]  # restored on resume
    final_loss = losses[-1] if losses else float(result.training_loss)
    tokens = sum(t for t, _ in token_log)
    tps = tokens / seconds if seconds else 0.0
    peak_mb = peak_memory_mb(device)
    summary = [
        (result.global_step, "train/final_loss", final_loss),
        (result.global_step, "train/mean_tokens_per_second", tps),
        (result.global_step, "train/peak_memory_mb", peak_mb),
    ]
    figures.flush(summary)
    artifact = out_dir / "artifact"
    if cfg.deepspeed:  # every rank: ZeRO-3 gathers the weight shards, rank 0 writes them
        trainer.save_model(str(artifact / ("model" if cfg.method == "full" else "adapter")))
        if main_rank:
            write_artifact_metadata(tok, base, artifact)
    elif main_rank and cfg.method == "full":
        save_full_artifact(model, tok, base, artifact)
    elif main_rank:  # DDP ranks hold whole replicas: rank 0's is the model
        save_adapter_artifact(model, tok, base, artifact)
    params = {
        "train.resolved_packing": packing,
        "train.device": device,
        "train.resolved_target_modules": ",".join(targets) or "all weights",
        "train.resumed_from": resume.name if resume else "none: from scratch",
        "train.mfu": "logged" if figures.peak else f"absent: no peak FLOP/s known for {device}",
    }
    log.info(
        "Trained %d steps (%s), final loss %.4f, %.0f tok/s, peak memory %.0f MB",
        result.global_step,
        f"resumed from {resume.name}" if resume else "from scratch",
        final_loss,
        tps,
        peak_mb,
    )
    return TrainingOutcome(
        artifact, result.global_step, final_loss, tokens, tps, resume, figures.rows + summary, params
    )


def train_on(
    frame: pd.DataFrame,
    base: BaseRef,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    run_id: str | None = None,
    start: Path | None = None,
) -> TrainingOutcome:
    """The one training composition (the flow's task, the launchers' `main`, each Ray Train worker):
    load the model for `cfg.method` (continuing `start`'s adapter), tokenize `frame` with its
    tokenizer, train, save the artifact. What this machine cannot do for `cfg` fails first."""
    device = check_device(cfg)  # before loading anything: a CPU worker given qlora fails here
    loaded = build_model(base, model_cfg, cfg, start)
    examples = tokenize_examples(loaded[1], frame, cfg.max_seq_len)
    if not examples:
        raise ValueError(f"No training example fits max_seq_len={cfg.max_seq_len}: raise it")
    return train_model(examples, base, model_cfg, cfg, out_dir, run_id, loaded=loaded, device=device)


def _collator(packing: str, tokenizer: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq

    if packing == "off":
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    return PackedCollator(share_prefix=packing == "shared_prefix")


def _no_retry_for_bad_input(task, task_run, state) -> bool:
    """Retry errors mid-training (the retry resumes from the last checkpoint), not ones that would repeat."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, (TrainingSetupError, TrainingOOMError, BaseModelError, ValueError))


def start_adapter(cfg: TrainConfig, champion: Path | BaseRef, base: BaseRef) -> tuple[Path | None, str]:
    """Return the adapter artifact a training starts from (None: a new adapter) and why, in words.

    `champion` is what the candidate is compared with: the champion's artifact, or the base
    while no version serves. Only an adapter on the same base can train on.
    """
    if cfg.start_from == "base":
        return None, "base"
    if not isinstance(champion, Path):
        return None, "base (no champion yet)"
    if (kind := artifact_kind(champion)) != "adapter":
        held = "full weights" if kind == "full" else "a merged, quantized (GGUF) model"
        return None, f"base (the champion holds {held}, not an adapter)"
    if read_base_ref(champion).sha256 != base.sha256:
        return None, "base (the champion was trained on another base model)"
    return champion, "champion's adapter"


@task(name="finetune", retries=2, retry_delay_seconds=5, retry_condition_fn=_no_retry_for_bad_input)
def finetune(
    train: pd.DataFrame,
    base: BaseRef,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    run_id: str,
    champion: Path | BaseRef | None = None,
) -> TrainedAdapter:
    """Fine-tune on `train` (resuming a killed attempt in `out_dir`), log to MLflow run `run_id`, save.

    With `train.start_from: champion`, the champion's adapter (`champion`, its artifact) trains on.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    start, started_from = start_adapter(cfg, champion if champion is not None else base, base)
    log.info("Training starts from the %s", started_from)
    # CPU, memory, GPU utilisation every 10 s, sent 6 samples per call.
    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=6, resume_logging=True)
    monitor.start()
    try:
        outcome = train_on(train, base, model_cfg, cfg, out_dir, run_id, start)
    finally:
        monitor.finish()
    import mlflow

    tags = {**outcome.params, "train.started_from": started_from}
    mlflow.MlflowClient().log_batch(run_id, tags=[_tag(k, v) for k, v in tags.items()])
    return TrainedAdapter(
        outcome.artifact_dir,
        base,
        outcome.steps,
        outcome.final_loss,
        outcome.train_tokens,
        outcome.tokens_per_second,
        started_from,
    )


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(f"tuneloop.{key}", value)


@task(name="check-training-setup")
def check_training_setup(cfg: TrainConfig) -> str:
    """Return the device training will run on; raise what this machine cannot do, before any work."""
    return check_device(cfg)


@task(name="prepare-base-model", retries=1)
def prepare_base_model(cfg: ModelConfig, models_dir: Path) -> BaseRef:
    """Return a verifiable reference to the base model, building a builtin one once."""
    from tuneloop.models import resolve_base

    return resolve_base(cfg.base, models_dir)


def launcher_parser(doc: str | None, out_help: str):
    """The arguments every training launcher takes (`main` here, tasks/finetune_ray.py's)."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default configs/local.yaml)")
    parser.add_argument("--data", required=True, help="training data (any form data.path takes)")
    parser.add_argument("--out", required=True, type=Path, help=out_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    return parser


def launcher_inputs(parser, argv: list[str] | None):
    """Parse a launcher's arguments; return (args, config, training rows, resolved base model)."""
    from tasks.data import load_split
    from tuneloop.config import load_config
    from tuneloop.models import resolve_base
    from tuneloop.state import state_paths

    args = parser.parse_args(argv)
    # importing prefect configured logging for its own loggers only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    cfg = load_config(args.config, [*args.overrides, f"data.path={args.data}"])
    base = resolve_base(cfg.model.base, state_paths(cfg).ensure().models)
    return args, cfg, load_split(cfg.data).train, base


def main(argv: list[str] | None = None) -> None:
    """Train only (no validation, evaluation or registry): the entry point of multi-process launchers.

        torchrun --nproc-per-node 2 -m tasks.finetune --data data.jsonl --out runs/a
        deepspeed --num_gpus 8 -m tasks.finetune --data data.jsonl --out runs/a \\
            --set train.method=full --set train.deepspeed=zero3
        accelerate launch --num_processes 4 -m tasks.finetune --data data.jsonl --out runs/a

    Every rank runs this; each trains its share of every step, rank 0 writes the artifact to
    `--out`/artifact. Run it again with the same `--out` to resume a killed training.
    """
    parser = launcher_parser(main.__doc__, "checkpoints and artifact; reuse to resume")
    args, cfg, rows, base = launcher_inputs(parser, argv)
    outcome = train_on(rows, base, cfg.model, cfg.train, args.out)
    import torch.distributed as dist

    ranks = dist.get_world_size() if dist.is_initialized() else 1
    log.info(
        "Artifact: %s (%d steps on %d ranks, final loss %.4f)",
        outcome.artifact_dir,
        outcome.steps,
        ranks,
        outcome.final_loss,
    )


if __name__ == "__main__":
    main()
