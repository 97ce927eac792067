"""The serving decoder gives each row the tokens HF `generate` gives that prompt alone."""

from __future__ import annotations

import copy

import pytest
import torch

from serving.decoding import Decoder, common_prefix
from tuneloop.generation import chat_prompt
from tuneloop.models import load_base, resolve_base

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer in one short sentence."}
QUESTIONS = [
    "Who wrote Hamlet?",
    "What is the capital of France and why?",
    "Name a prime number.",
    "How far is the moon from the earth in kilometres?",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = load_base(resolve_base("builtin:tiny-llama", tmp_path_factory.mktemp("models")))
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: the untrained model repeats one token otherwise
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.15)
    prompts = [chat_prompt(tok, [SYSTEM, {"role": "user", "content": q}]) for q in QUESTIONS]
    return model, tok, prompts


def alone(model, prompt: list[int], budget: int, eos: int, pad: int) -> tuple[list[int], str]:
    """HF greedy `generate` on one prompt, no padding: the reference."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    new = out[0, len(prompt) :].tolist()
    if eos in new:
        return new[: new.index(eos)], "stop"
    return new, "length"


def run(
    decoder: Decoder,
    model,
    prompts: list[list[int]],
    budgets: list[int],
    *,
    eos_id: int,
    pad_id: int,
    key=None,
    adapter_names: list[str] | None = None,
    on_step=None,
) -> list:
    """Decode `prompts` as one batch to the end; `on_step` gets each step's token per prompt (None: done)."""
    batch = decoder.batch(model, eos_id=eos_id, pad_id=pad_id, key=key, mixed=adapter_names is not None)
    events = batch.add(prompts, budgets, list(range(len(prompts))), adapter_names)
    rows = [row for _, row, _ in events]
    while True:
        if on_step is not None:
            step: list[int | None] = [None] * len(prompts)
            for i, _, tok in events:
                step[i] = tok
            on_step(step)
        if not len(batch):
            return rows
        events = batch.step()


def test_common_prefix_leaves_every_prompt_a_token_of_its_own() -> None:
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3]]) == 2
    assert common_prefix([[7], [7, 8]]) == 0


def test_rows_get_the_tokens_of_generate_alone_with_their_own_budgets_and_stops(tiny) -> None:
    model, tok, prompts = tiny
    budgets = [12, 3, 20, 1, 16]
    # a token the model does produce, used as the end-of-turn token, so rows stop at different steps
    eos = alone(model, prompts[0], 12, -1, tok.pad_token_id)[0][5]
    expected = [alone(model, p, b, eos, tok.pad_token_id) for p, b in zip(prompts, budgets)]
    assert {f for _, f in expected} == {"stop", "length"}, "the case needs rows that stop and rows that run out"
    steps: list[list[int | None]] = []
    decoder = Decoder()
    rows = run(decoder, model, prompts, budgets, eos_id=eos, pad_id=tok.pad_token_id, key="v1", on_step=steps.append)
    assert [(r.tokens, r.finish_reason) for r in rows] == expected
    assert decoder.prefix_misses == 1  # the system prompt, computed once for the batch
    # the steps stream each row's tokens, None once a row is done
    for i, (tokens, finish) in enumerate(expected):
        streamed = [s[i] for s in steps if s[i] is not None]
        assert streamed == tokens + ([eos] if finish == "stop" else [])


def test_a_cached_prefix_serves_the_next_batches_and_single_requests(tiny) -> None:
    model, tok, prompts = tiny
    decoder = Decoder()
    first = run(decoder, model, prompts[:3], [8] * 3, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, key="v1")
    assert (decoder.prefix_misses, decoder.prefix_hits) == (1, 0)
    again = run(decoder, model, prompts[2:], [8] * 3, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, key="v1")
    single = run(decoder, model, prompts[4:], [8], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, key="v1")
    assert (decoder.prefix_misses, decoder.prefix_hits) == (1, 2)
    assert again[0].tokens == first[2].tokens and single[0].tokens == again[2].tokens
    other = run(decoder, model, prompts[:2], [8] * 2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, key="v2")
    assert decoder.prefix_misses == 2, "another adapter has its own prefix cache"
    decoder.forget("v1")
    run(decoder, model, prompts[:2], [8] * 2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, key="v1")
    assert decoder.prefix_misses == 3
    assert other[0].tokens == first[0].tokens  # same model here: same tokens


def test_mixed_adapters_in_one_batch_and_a_merged_copy_answer_as_each_adapter_alone(tiny) -> None:
    from peft import LoraConfig, get_peft_model

    model, tok, prompts = tiny
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights="gaussian")
    peft = get_peft_model(copy.deepcopy(model), lora, adapter_name="v1")
    peft.add_adapter("v2", lora)
    with torch.no_grad():  # LoRA's B starts at zero: make each adapter change the answers
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft.eval()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    decoder = Decoder()
    names = ["v1", "v2", "v1", "v2", "v1"]
    mixed = run(decoder, peft, prompts, [10] * 5, eos_id=eos, pad_id=pad, adapter_names=names)
    for row, prompt, name in zip(mixed, prompts, names):
        peft.set_adapter(name)
        assert row.tokens == alone(peft, prompt, 10, eos, pad)[0]
    peft.set_adapter("v2")
    assert mixed[0].tokens != alone(peft, prompts[0], 10, eos, pad)[0], "the adapters must answer differently"
    peft.set_adapter("v1")
    merged = copy.deepcopy(peft).merge_and_unload(adapter_names=["v1"])
    on_merged = run(decoder, merged, prompts, [10] * 5, eos_id=eos, pad_id=pad, key=("merged", "v1"))
    assert [r.tokens for r in on_merged] == [alone(peft, p, 10, eos, pad)[0] for p in prompts]


def test_rows_joining_a_running_batch_get_the_tokens_of_generate_alone(tiny) -> None:
    model, tok, prompts = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    longer = chat_prompt(
        tok,
        [
            SYSTEM,
            {
                "role": "user",
                "content": "Tell me, in as many words as you like, everything about the moon and its phases.",
            },
        ],
    )
    joining = [prompts[2], longer, [5, 6, 7]]  # a shorter and a longer prompt, and one sharing nothing
    budgets = {0: 12, 1: 6, 2: 9, 3: 14, 4: 1}
    decoder = Decoder()
    batch = decoder.batch(model, eos_id=eos, pad_id=pad, key="v1")
    got: dict[int, list[int]] = {}
    events = batch.add(prompts[:2], [budgets[0], budgets[1]], [0, 1])
    for step in range(20):
        for owner, row, _ in events:
            got[owner] = row.tokens
        if step == 3:  # rows 2-4 join while rows 0 and 1 are half done
            events = batch.add(joining, [budgets[2], budgets[3], budgets[4]], [2, 3, 4])
            continue
        if not len(batch):
            break
        events = batch.step()
    expected = [prompts[0], prompts[1], *joining]
    assert got == {i: alone(model, p, budgets[i], eos, pad)[0] for i, p in enumerate(expected)}
    assert not len(batch) and batch.cache is None


def _rows_with(samplings, stoppers=None):
    from serving.decoding import Row

    return [Row(sampling=s, stopper=(stoppers or {}).get(i)) for i, s in enumerate(samplings)]


def _decode_rows(model, tok, prompts, budgets, rows):
    batch = Decoder().batch(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, key="v1")
    batch.add(prompts, budgets, list(range(len(prompts))), None, rows)
    while len(batch):
        batch.step()
    return rows


def test_sampling_rows_are_seeded_and_greedy_rows_beside_them_are_unchanged(tiny) -> None:
    """Rows of one batch decode with different settings: greedy rows still get generate's
    tokens; a seeded row gets the same tokens again, another seed other tokens."""
    from tuneloop.seams import Sampling

    model, tok, prompts = tiny
    p = [prompts[1]] * 4
    budgets = [16] * 4
    greedy = alone(model, prompts[1], 16, tok.eos_token_id, tok.pad_token_id)[0]
    hot = Sampling(temperature=1.5, top_p=0.95, top_k=50, seed=7)
    first = _decode_rows(model, tok, p, budgets, _rows_with([None, hot, Sampling(temperature=1.5, seed=8), hot]))
    assert first[0].tokens[: len(greedy)] == greedy
    assert first[1].tokens == first[3].tokens  # the same seed in the same batch
    assert first[1].tokens != first[2].tokens  # another seed
    again = _decode_rows(model, tok, p[:2], budgets[:2], _rows_with([hot, None]))
    assert again[0].tokens == first[1].tokens  # the same seed in another batch, another position
    top1 = _decode_rows(model, tok, p[:1], [16], _rows_with([Sampling(temperature=2.0, top_k=1, seed=3)]))
    assert top1[0].tokens[: len(greedy)] == greedy  # top_k=1 is greedy whatever the temperature


def test_logprobs_and_a_stop_hook_per_row(tiny) -> None:
    from tuneloop.seams import Sampling

    model, tok, prompts = tiny
    want = Sampling(logprobs=True, top_logprobs=3)
    greedy = alone(model, prompts[2], 10, tok.eos_token_id, tok.pad_token_id)[0]
    third = greedy[2]
    rows = _rows_with([want, None], {1: lambda tokens: tokens[-1] == third})
    _decode_rows(model, tok, [prompts[2], prompts[2]], [10, 10], rows)
    with_lp, stopped = rows
    assert [t for t, _, _ in with_lp.logprobs] == with_lp.tokens[: len(with_lp.logprobs)]
    for tok_id, lp, top in with_lp.logprobs:
        assert lp <= 0 and len(top) == 3 and top[0][0] == tok_id  # greedy: the chosen token is the likeliest
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert stopped.tokens == greedy[:3] and stopped.finish_reason == "stop"


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_constrained_rows_answer_json_valid_under_the_schema_beside_free_rows(tiny) -> None:
    """A model that would never write this JSON (random weights) writes it under the constraint;
    a row beside it decodes freely; too small a budget ends with `length`, never `stop`."""
    import json

    import jsonschema
    import xgrammar as xgr

    from serving.decoding import Row
    from serving.engine import JsonConstraint

    model, tok, prompts = tiny
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    free = alone(model, prompts[0], 12, tok.eos_token_id, tok.pad_token_id)[0]
    rows = [Row(constraint=JsonConstraint(compiled)), Row(), Row(constraint=JsonConstraint(compiled))]
    _decode_rows(model, tok, [prompts[0], prompts[0], prompts[1]], [40, 12, 3], rows)
    answer = json.loads(tok.decode(rows[0].tokens, skip_special_tokens=True))
    jsonschema.validate(answer, SCHEMA)
    assert rows[0].finish_reason == "stop"
    assert rows[1].tokens[: len(free)] == free  # the free row beside it is unchanged
    assert rows[2].finish_reason == "length" and len(rows[2].tokens) == 3


def test_extreme_sampling_settings_never_fail_a_row() -> None:
    """What a fuzzer sends (found by the schema fuzz test): a top_p that rounds to nothing, a
    temperature whose inverse overflows. The row gets the likeliest token, never an error."""
    from serving.decoding import Row, choose
    from tuneloop.seams import Sampling

    logits = torch.randn(3, 500)
    extremes = [
        Sampling(temperature=2.0, top_p=5e-324),
        Sampling(temperature=5e-324),
        Sampling(temperature=1e-3, seed=1),
    ]
    assert choose(logits.clone(), [Row(sampling=s) for s in extremes]).tolist() == logits.argmax(-1).tolist()
