"""Constrained decoding libraries on this machine: what each adds per token to choose a JSON answer.

    .venv/bin/python bench/constrained.py          # SmolLM2-135M's tokenizer (49,152 tokens)

For each installed library (xgrammar, llguidance), the same JSON schema is compiled for the
same tokenizer, then a valid answer (29 tokens) is fed token by token: per token, the mask of
allowed next tokens is computed and applied to a logits row, and the token is accepted. Five
passes; the median and the worst token are reported, with the compile time. A decoding step of
the model itself (SmolLM2-135M, batch 1, 2 CPU threads) is timed too, as the scale.
outlines-core needs its vocabulary from the model hub (`Vocabulary.from_pretrained`), which
this machine cannot reach: not measured.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer"},
        "country": {"type": "string"},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "country", "capital"],
    "additionalProperties": False,
}
ANSWER = {"city": "Paris", "population": 2100000, "country": "France", "capital": True}


def run(make, ids, vocab):
    start = time.perf_counter()
    first = make()
    compile_s = time.perf_counter() - start
    per = []
    for rep in range(5):
        matcher = first if rep == 0 else make(compiled_only=True)
        for tid in ids:
            logits = torch.randn(1, vocab)
            t = time.perf_counter()
            matcher(logits, tid)
            per.append(time.perf_counter() - t)
    return {"compile_ms": compile_s * 1000, "median_ms": statistics.median(per) * 1000, "max_ms": max(per) * 1000}


def main() -> None:
    from tuneloop.models import load_base, resolve_base

    base = resolve_base("builtin:smollm2-135m-instruct", Path(".tuneloop/models").resolve())
    model, tok = load_base(base)
    torch.set_num_threads(2)
    vocab = model.config.vocab_size
    ids = tok(json.dumps(ANSWER), add_special_tokens=False)["input_ids"]
    results = {}

    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    state = {}

    def xg(compiled_only=False):
        if "compiled" not in state:
            compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            state["compiled"] = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        matcher = xgr.GrammarMatcher(state["compiled"])
        mask = xgr.allocate_token_bitmask(1, info.vocab_size)

        def step(logits, tid):
            matcher.fill_next_token_bitmask(mask)
            xgr.apply_token_bitmask_inplace(logits, mask)
            assert matcher.accept_token(tid)

        return step

    results["xgrammar"] = run(xg, ids, vocab)

    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        llguidance = None
    if llguidance is not None:
        lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        lstate = {}

        def lg(compiled_only=False):
            if "grammar" not in lstate:
                lstate["grammar"] = llguidance.LLMatcher.grammar_from_json_schema(
                    json.dumps(SCHEMA), defaults={"whitespace_flexible": True}
                )
            matcher = llguidance.LLMatcher(lt, lstate["grammar"])
            mask = llguidance.torch.allocate_token_bitmask(1, lt.vocab_size)

            def step(logits, tid):
                llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
                llguidance.torch.apply_token_bitmask_inplace(logits, mask)
                assert matcher.consume_token(tid), matcher.get_error()

            return step

        results["llguidance"] = run(lg, ids, vocab)

    from tuneloop.generation import chat_prompt

    prompt = torch.tensor([chat_prompt(tok, [{"role": "user", "content": "Hi"}])])
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        steps = []
        nxt = out.logits[:, -1:].argmax(-1)
        cache = out.past_key_values
        for _ in range(20):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - t)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    results["model_step_median_ms"] = statistics.median(steps) * 1000
    for name, r in results.items():
        if isinstance(r, dict):
            print(
                f"{name:12} compile {r['compile_ms']:7.0f} ms   per token median {r['median_ms']:.3f} ms, "
                f"worst {r['max_ms']:.2f} ms"
            )
    print(f"model decode step (batch 1): median {results['model_step_median_ms']:.1f} ms")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
