"""The fine-tuning engine on the tiny model: methods, target modules, packing that changes no
loss, figures, bad input and out-of-memory messages. The crash-and-resume test is in
tests/test_finetune_resume.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from tasks.finetune import (
    PackedCollator,
    TrainingOOMError,
    TrainingSetupError,
    TuneloopTrainer,
    adapted_modules,
    build_model,
    check_device,
    start_adapter,
    tokenize_examples,
    train_model,
    training_key,
)
from tests.conftest import ASSETS
from tuneloop.chat import IGNORE
from tuneloop.config import REPO_ROOT, ModelConfig, TrainConfig
from tuneloop.models import BaseRef, load_adapter_model, load_base, resolve_base

LLAMA_MODULES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
TINY_TRAIN = {"max_steps": 3, "batch_size": 4, "max_seq_len": 48, "save_steps": None}


@pytest.fixture(scope="module")
def tiny(models_dir: Path):
    return resolve_base("builtin:tiny-llama", models_dir)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_json(ASSETS / "tiny_qa.jsonl", lines=True)


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "qlora", "deepspeed": "zero3"}, "qlora cannot run under deepspeed"),
        ({"packing": "shared_prefix", "group_by_length": True}, "group_by_length only applies with packing: off"),
        ({"packing": "padding_free", "batch_size": 1}, "batch_size 1 packs nothing"),
        ({"method": "dora"}, "method"),
        ({"deepspeed": "zero1"}, "deepspeed"),
        ({"method": "full", "start_from": "champion"}, "start_from champion continues the champion's LoRA adapter"),
    ],
)
def test_invalid_train_config_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**fields)


def test_packing_reads_booleans_and_defaults_to_auto() -> None:
    assert TrainConfig(packing=True).packing == "padding_free"
    assert TrainConfig(packing=False).packing == "off"
    cfg = TrainConfig()
    assert cfg.packing == "auto" and cfg.target_modules == "auto" and cfg.mixed_precision == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_qlora_and_bf16_on_cpu_fail_before_any_work() -> None:
    with pytest.raises(TrainingSetupError, match="qlora needs a CUDA GPU"):
        check_device(TrainConfig(method="qlora"))
    with pytest.raises(TrainingSetupError, match="bf16 needs a CUDA GPU"):
        check_device(TrainConfig(mixed_precision="bf16"))
    assert check_device(TrainConfig()) == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU (bitsandbytes 4-bit)")
def test_qlora_trains_on_gpu(tiny, frame, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = TrainConfig(method="qlora", **TINY_TRAIN)
    loaded = build_model(tiny, ModelConfig(), cfg)
    examples = tokenize_examples(loaded[1], frame, cfg.max_seq_len)
    outcome = train_model(examples, tiny, ModelConfig(), cfg, tmp_path, loaded=loaded)
    assert outcome.steps == 3 and (outcome.artifact_dir / "adapter").is_dir()


# --- target modules ------------------------------------------------------------------------


def _from_config(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def test_target_modules_are_every_attention_and_mlp_linear_layer(tiny) -> None:
    from transformers import GPT2Config, MistralConfig, Qwen2Config

    def adapted(model) -> list[str]:  # what train.target_modules=auto gives: PEFT's all-linear
        from peft import LoraConfig, get_peft_model

        return adapted_modules(get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")))

    model, _ = load_base(tiny)
    assert adapted(model) == LLAMA_MODULES  # not lm_head, not the embeddings
    small = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    assert adapted(_from_config(Qwen2Config(**small))) == LLAMA_MODULES
    assert adapted(_from_config(MistralConfig(**small))) == LLAMA_MODULES
    gpt2 = _from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    assert adapted(gpt2) == ["c_attn", "c_fc", "c_proj"]


def test_auto_targets_are_adapted_and_a_wrong_name_is_refused(tiny) -> None:
    model, _, targets = build_model(tiny, ModelConfig(), TrainConfig())
    assert targets == LLAMA_MODULES
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == set(LLAMA_MODULES)
    with pytest.raises(TrainingSetupError, match="q_projx"):
        build_model(tiny, ModelConfig(), TrainConfig(target_modules=["q_projx"]))


# --- packing --------------------------------------------------------------------------------


def _chats(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """Conversations with a system prompt, as chat templates of instruct models add one."""
    return pd.DataFrame(
        {
            "messages": [
                [
                    {"role": "system", "content": "You are a helpful assistant who answers in one sentence."},
                    {"role": "user", "content": p},
                    {"role": "assistant", "content": r},
                ]
                for p, r in zip(frame["prompt"][:n], frame["response"][:n])
            ]
        }
    )


def _padded_loss_and_grads(model, tok, examples):
    from transformers import DataCollatorForSeq2Seq

    model.zero_grad()
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)(examples)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _packed_loss_and_grads(model, collator, examples):
    model.zero_grad()
    trainer = TuneloopTrainer.__new__(TuneloopTrainer)  # only its loss: no Trainer state needed
    batch = collator(examples)
    batch.pop("example_tokens")
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("share_prefix", [False, True], ids=["padding_free", "shared_prefix"])
def test_packed_batch_has_the_padded_loss_and_gradients(tiny, frame, share_prefix: bool) -> None:
    torch.manual_seed(0)
    model, tok, _ = build_model(tiny, ModelConfig(), TrainConfig(lora_dropout=0.0))
    for module in model.modules():  # a trained-looking adapter: B = 0 would hide LoRA's gradients
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    model.train()
    examples = tokenize_examples(tok, _chats(frame, 6), 64)
    collator = PackedCollator(share_prefix=share_prefix)
    prefix = collator.shared_prefix(examples)
    assert prefix > 10  # the system turn and the user header are shared
    padded, padded_grads = _padded_loss_and_grads(model, tok, examples)
    packed, packed_grads = _packed_loss_and_grads(model, collator, examples)
    assert packed == pytest.approx(padded, rel=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    row = collator(examples)
    assert row["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in examples) - (5 * prefix if share_prefix else 0)


def test_examples_in_one_row_do_not_attend_to_each_other(tiny, frame) -> None:
    """Changing one example's tokens changes no output of another example in the row."""
    model, tok = load_base(tiny)
    model.eval()
    examples = tokenize_examples(tok, frame.head(3), 48)
    for share_prefix in (False, True):
        collator = PackedCollator(share_prefix=share_prefix)
        batch = collator(examples)
        altered = [examples[0], dict(examples[1], input_ids=[7] * len(examples[1]["input_ids"])), examples[2]]
        other = collator(altered) if not share_prefix else None
        if share_prefix:  # altering example 1 also changes the shared prefix: alter its answer only
            ids = list(examples[1]["input_ids"])
            answer = [t for t, label in enumerate(examples[1]["labels"]) if label != IGNORE]
            for t in answer:
                ids[t] = 7
            other = collator([examples[0], dict(examples[1], input_ids=ids), examples[2]])
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
        others = {k: v for k, v in other.items() if k in ("input_ids", "position_ids", "attention_mask")}
        with torch.no_grad():
            a, b = model(**inputs, use_cache=False).logits[0], model(**others, use_cache=False).logits[0]
        last = (
            batch["input_ids"].shape[1]
            - len(examples[2]["input_ids"])
            + (collator.shared_prefix(examples) if share_prefix else 0)
        )
        torch.testing.assert_close(a[last:], b[last:])  # example 2 never sees example 1
        assert not torch.allclose(a, b)


def test_shared_prefix_stops_before_the_first_trained_token() -> None:
    features = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, IGNORE, IGNORE, 4, 5]},
        {"input_ids": [1, 2, 3, 4, 9, 9], "labels": [IGNORE] * 4 + [9, 9]},
    ]
    assert PackedCollator.shared_prefix(features) == 2  # position 2 predicts the trained token 4
    batch = PackedCollator(share_prefix=True)(features)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert batch["target_ids"].tolist() == [[IGNORE, IGNORE, 4, 5, IGNORE, IGNORE, 9, 9, IGNORE]]
    assert batch["example_tokens"] == 11


# --- training -------------------------------------------------------------------------------


def test_lora_training_records_its_figures(tiny, frame, tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY_TRAIN)
    outcome = train_model(tokenize_examples(load_base(tiny)[1], frame, 48), tiny, ModelConfig(), cfg, tmp_path)
    keys = {k for _, k, _ in outcome.metrics}
    assert {
        "train/loss",
        "train/grad_norm",
        "train/learning_rate",
        "train/tokens_per_second",
        "train/model_tflops",
        "train/peak_memory_mb",
        "train/final_loss",
    } <= keys
    per_step = [s for s, k, _ in outcome.metrics if k == "train/tokens_per_second"]
    assert per_step == [1, 2, 3] and outcome.tokens_per_second > 0
    assert "train/mfu" not in keys and outcome.params["train.mfu"].startswith("absent: no peak FLOP/s known for cpu")
    assert outcome.params["train.resolved_packing"] == "shared_prefix"  # auto on CPU
    assert outcome.params["train.resumed_from"] == "none: from scratch"
    assert (outcome.artifact_dir / "adapter" / "adapter_config.json").exists()


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_a_training_from_the_champion_continues_its_adapter(tiny, frame, tmp_path: Path) -> None:
    examples = tokenize_examples(load_base(tiny)[1], frame, 48)
    first = train_model(examples, tiny, ModelConfig(), TrainConfig(lora_rank=4, **TINY_TRAIN), tmp_path / "v1")
    champion = first.artifact_dir
    cfg = TrainConfig(start_from="champion", lora_rank=16, **TINY_TRAIN)  # the champion's rank wins
    assert start_adapter(cfg, champion, tiny) == (champion, "champion's adapter")
    model, tok, targets = build_model(tiny, ModelConfig(), cfg, champion)
    trained_before = _lora_weights(load_adapter_model(champion)[0])
    assert sorted(targets) == LLAMA_MODULES and model.peft_config["default"].r == 4
    assert all(torch.equal(w, trained_before[k]) for k, w in _lora_weights(model).items())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0  # it trains on
    second = train_model(examples, tiny, ModelConfig(), cfg, tmp_path / "v2", loaded=(model, tok, targets))
    after = _lora_weights(load_adapter_model(second.artifact_dir)[0])
    assert after.keys() == trained_before.keys() and any(not torch.equal(after[k], trained_before[k]) for k in after)


def test_a_training_starts_from_the_base_without_a_champion_adapter_on_the_same_base(
    tiny, frame, tmp_path: Path
) -> None:
    cfg = TrainConfig(start_from="champion", **TINY_TRAIN)
    assert start_adapter(cfg, tiny, tiny) == (None, "base (no champion yet)")
    assert start_adapter(TrainConfig(**TINY_TRAIN), tmp_path, tiny) == (None, "base")
    full = train_model(
        tokenize_examples(load_base(tiny)[1], frame, 48),
        tiny,
        ModelConfig(),
        TrainConfig(method="full", **TINY_TRAIN),
        tmp_path / "full",
    )
    assert start_adapter(cfg, full.artifact_dir, tiny)[1] == "base (the champion holds full weights, not an adapter)"
    lora = train_model(
        tokenize_examples(load_base(tiny)[1], frame, 48),
        tiny,
        ModelConfig(),
        TrainConfig(**TINY_TRAIN),
        tmp_path / "lora",
    )
    other = BaseRef(tiny.location, "0" * 64)
    assert start_adapter(cfg, lora.artifact_dir, other)[1] == "base (the champion was trained on another base model)"
    with pytest.raises(TrainingSetupError, match="was trained on base"):
        build_model(other, ModelConfig(), cfg, lora.artifact_dir)


def test_full_fine_tuning_on_cpu_saves_a_model_that_loads(tiny, frame, tmp_path: Path) -> None:
    cfg = TrainConfig(method="full", learning_rate=1e-3, **TINY_TRAIN)
    outcome = train_model(tokenize_examples(load_base(tiny)[1], frame, 48), tiny, ModelConfig(), cfg, tmp_path)
    assert outcome.params["train.resolved_target_modules"] == "all weights"
    tuned, _ = load_adapter_model(outcome.artifact_dir)
    base, _ = load_base(tiny)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(tuned.state_dict()[name], base.state_dict()[name])


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, MemoryError])
def test_out_of_memory_names_the_figures_and_what_to_lower(tiny, frame, tmp_path: Path, error) -> None:
    # A fault this CPU machine cannot cause for real (no GPU; a real CPU MemoryError would take the
    # machine down with it): raised from a forward hook of the tiny model, where a real one arises.
    cfg = TrainConfig(**TINY_TRAIN)
    model, tok, targets = build_model(tiny, ModelConfig(), cfg)

    def out_of_memory(*_):
        raise error("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.get_base_model().model.layers[0].register_forward_hook(out_of_memory)
    with pytest.raises(TrainingOOMError) as caught:
        train_model(tokenize_examples(tok, frame, 48), tiny, ModelConfig(), cfg, tmp_path, loaded=(model, tok, targets))
    message = str(caught.value)
    assert "batch_size=4 × max_seq_len=48" in message and "lower train.batch_size, train.max_seq_len" in message
    assert "gradient_checkpointing" in message and "largest batch so far had" in message
    assert not (tmp_path / "artifact").exists()


def test_checkpoints_of_another_training_are_not_resumed(tiny, frame, tmp_path: Path) -> None:
    examples = tokenize_examples(load_base(tiny)[1], frame, 48)
    train_model(examples, tiny, ModelConfig(), TrainConfig(**{**TINY_TRAIN, "save_steps": 2}), tmp_path)
    other = TrainConfig(**{**TINY_TRAIN, "save_steps": 2, "learning_rate": 1e-2})
    with pytest.raises(TrainingSetupError, match=r"another training \(changed: \['learning_rate'\]\)"):
        train_model(examples, tiny, ModelConfig(), other, tmp_path)
    for folder in (tmp_path / "checkpoints").glob("checkpoint-*"):  # nothing left to resume:
        shutil.rmtree(folder)
    assert train_model(examples, tiny, ModelConfig(), other, tmp_path).resumed_from is None  # the new config trains


def test_a_training_is_named_by_its_flow_run_or_else_by_its_inputs(monkeypatch) -> None:
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    key = training_key(ModelConfig(), TrainConfig(), "data-a")
    assert key.startswith("inputs-") and key == training_key(ModelConfig(), TrainConfig(), "data-a")
    assert key != training_key(ModelConfig(), TrainConfig(), "data-b")
    assert key != training_key(ModelConfig(), TrainConfig(max_steps=21), "data-a")
    assert key != training_key(ModelConfig(base="builtin:tiny-llama"), TrainConfig(), "data-a")
    # A worker runs a flow run's process with its id in the environment; inside the flow, the
    # flow run context gives the same id (tests/integration/test_training_flow.py).
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "7f3c0a52-1d2e-4b8f-9a61-0c5d2e8b4f10")
    assert training_key(ModelConfig(), TrainConfig(), "data-a") == "7f3c0a52-1d2e-4b8f-9a61-0c5d2e8b4f10"


def test_every_deepspeed_config_is_valid_json_for_the_trainer() -> None:
    for stage in ("zero2", "zero3"):
        config = json.loads((REPO_ROOT / "infra" / "deepspeed" / f"{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == int(stage[-1])
        # "auto" lets the HF Trainer fill these from train.* so the two never disagree
        assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"]["enabled"] == "auto"
        assert TrainConfig(method="full", deepspeed=stage).deepspeed == stage


def test_prefect_retries_crashes_but_not_errors_that_would_repeat() -> None:
    from prefect.states import Failed

    from tasks.finetune import _no_retry_for_bad_input, finetune
    from tuneloop.models import BaseModelError

    assert finetune.retries == 2 and finetune.retry_condition_fn is _no_retry_for_bad_input
    for repeats in (
        TrainingSetupError("qlora needs a CUDA GPU"),
        TrainingOOMError("lower train.batch_size"),
        BaseModelError("Base model 'x' cannot be loaded"),
    ):
        assert not _no_retry_for_bad_input(None, None, Failed(data=repeats))
    assert _no_retry_for_bad_input(None, None, Failed(data=RuntimeError("worker lost: resume from checkpoint")))
