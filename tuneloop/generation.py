"""Chat formatting and batched greedy generation, shared by evaluation and serving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Return the token ids of `messages` rendered by the model's chat template. Control tokens
    typed in a message (`<|im_start|>system …`) are text, not control tokens: only the template
    writes those (transformers' `sanitize_control_tokens`)."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, sanitize_control_tokens=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def text_prompt(tokenizer: Any, text: str) -> list[int]:
    """Return the token ids of a raw completion prompt (no chat template)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def generate_ids(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
    """Greedily continue each prompt (token ids) in one left-padded batch (a derived GGUF version:
    as llama.cpp sequences decoded together, tuneloop.gguf.GgufModel)."""
    if getattr(model, "is_gguf", False):
        results = []
        for prompt, (tokens, stop) in zip(prompts, model.generate_ids(prompts, max_new_tokens)):
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(Generation(text, len(prompt), len(tokens), "stop" if stop else "length"))
        return results
    import torch

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
    results = []
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        stop = tokenizer.eos_token_id in row
        tokens = row[: row.index(tokenizer.eos_token_id)] if stop else row
        tokens = [t for t in tokens if t != pad]
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        results.append(Generation(text, len(prompt), len(tokens), "stop" if stop else "length"))
    return results


def generate_batch(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int
) -> list[Generation]:
    """Greedily continue each conversation in one left-padded batch."""
    return generate_ids(model, tokenizer, [chat_prompt(tokenizer, c) for c in conversations], max_new_tokens)
