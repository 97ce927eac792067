"""The HF engine's serving dtype and attention kernel (serve.dtype, serve.attn_implementation):
resolved per machine, and the continuous-batching decoder runs with each on the tiny model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serving.batching import BatchingEngine
from tuneloop.config import load_config
from tuneloop.models import load_base, resolve_base
from tuneloop.seams import EngineSpec
from tuneloop.servespec import serve_spec

PROMPTS = ["What is the capital of France?", "Name a colour.", "Count to three."]


def spec(**kw) -> EngineSpec:
    base = {
        "torch_threads": 1,
        "max_batch_size": 4,
        "batch_wait_timeout_s": 0.0,
        "merge_default": False,
        "prefix_cache": 0,
        "max_prompt_tokens": 256,
    }
    return EngineSpec(**{**base, **kw})


def test_auto_is_bfloat16_on_a_gpu_that_has_it_and_float32_on_cpu() -> None:
    assert spec().resolved_dtype(cuda=False, bf16=False) == "float32"
    assert spec().resolved_dtype(cuda=True, bf16=True) == "bfloat16"
    assert spec().resolved_dtype(cuda=True, bf16=False) == "float16"
    assert spec(dtype="bfloat16").resolved_dtype(cuda=False, bf16=False) == "bfloat16"  # asked for: as asked
    cfg = load_config(None, ["serve.dtype=bfloat16", "serve.attn_implementation=eager"])
    engine = serve_spec(cfg, base_version="1").engine
    assert (engine.dtype, engine.attn_implementation) == ("bfloat16", "eager")


def answers(model, tok, engine_spec: EngineSpec) -> list[list[int]]:
    async def run() -> list[list[int]]:
        engine = BatchingEngine(model, tok, engine_spec, fixed_version="1")
        tickets = [engine.submit(tok(p)["input_ids"], 6, "1", stream=False, pinned=False) for p in PROMPTS]
        return [(await t.done).tokens for t in tickets]

    return asyncio.run(run())


def test_the_decoder_serves_in_bfloat16_and_with_either_attention_kernel(models_dir) -> None:
    base = resolve_base("builtin:tiny-llama", models_dir)
    model, tok = load_base(base, "float32", attn_implementation="eager")
    eager = answers(model.eval(), tok, spec())
    model, tok = load_base(base, "float32", attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert answers(model.eval(), tok, spec()) == eager  # the same greedy tokens from either kernel
    model, tok = load_base(base, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    half = answers(model.eval(), tok, spec(dtype="bfloat16"))
    assert [len(t) for t in half] == [len(t) for t in eager] and all(t for t in half)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 serving on a GPU needs CUDA")
def test_bfloat16_on_the_gpu_decodes(models_dir) -> None:
    base = resolve_base("builtin:tiny-llama", models_dir)
    model, tok = load_base(base, spec().resolved_dtype(True, torch.cuda.is_bf16_supported()))
    model = model.eval().to("cuda")
    assert all(answers(model, tok, spec()))
