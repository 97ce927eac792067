"""Derived versions for llama.cpp on the tiny model: merge → GGUF (llama.cpp's converter) → quantize,
lineage, evaluation through llama.cpp, and the serving engine's tokens against llama.cpp's own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from serving.batching import VersionNotLoaded
from serving.llamacpp import LlamaCppEngine
from tuneloop.generation import chat_prompt
from tuneloop.gguf import GGUF_DIR, GGUF_FILE, DerivationError, GgufModel, derive, read_derivation
from tuneloop.models import artifact_kind, artifact_sha256, load_base, resolve_base, save_adapter_artifact
from tuneloop.seams import EngineSpec, Sampling

QUESTIONS = ["What is 2 plus 2?", "Name a colour.", "Where is Paris?", "hello", "Say something long please."]


@pytest.fixture(scope="module")
def parent(tmp_path_factory, models_dir) -> tuple[Path, object, object]:
    """A LoRA adapter of the tiny base with non-zero deltas, and its merged float model."""
    from peft import LoraConfig, get_peft_model

    base = resolve_base("builtin:tiny-llama", models_dir)
    torch.manual_seed(3)
    model, tok = load_base(base)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.eval()
    art = save_adapter_artifact(peft, tok, base, tmp_path_factory.mktemp("parent") / "artifact")
    return art, peft.merge_and_unload(), tok


@pytest.fixture(scope="module")
def derived(parent, tmp_path_factory) -> dict[str, Path]:
    art, *_ = parent
    root = tmp_path_factory.mktemp("derived")
    return {how: _derive(art, root, how) for how in ("q8_0", "q4_0")}


def _derive(art: Path, root: Path, how: str) -> Path:
    derive(art, "models:/tuneloop-chat/1", how, root / how, root / f"work-{how}")
    return root / how


def test_a_derived_artifact_carries_its_lineage_and_weighs_less(parent, derived) -> None:
    art, *_ = parent
    for how, bits in (("q8_0", 8), ("q4_0", 4)):
        out = derived[how]
        assert artifact_kind(out) == "gguf"
        info = read_derivation(out)
        assert info["derived_from"] == "models:/tuneloop-chat/1" and info["method"] == how and info["bits"] == bits
        assert info["parent_sha256"] == artifact_sha256(art)
        assert info["size_bytes"] == (out / GGUF_DIR / GGUF_FILE).stat().st_size < info["parent_size_bytes"]
        assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "base.json").is_file()
    assert read_derivation(derived["q4_0"])["size_bytes"] < read_derivation(derived["q8_0"])["size_bytes"]


def test_the_gguf_file_holds_the_quantization_it_names(derived) -> None:
    from gguf import GGUFReader

    types = {"q8_0": 7, "q4_0": 2}  # llama_ftype: MOSTLY_Q8_0, MOSTLY_Q4_0
    for how, ftype in types.items():
        reader = GGUFReader(derived[how] / GGUF_DIR / GGUF_FILE)
        field = reader.fields["general.file_type"]
        assert int(field.parts[field.data[0]][0]) == ftype


def test_greedy_tokens_equal_llama_cpps_own_and_the_float_parents(parent, derived) -> None:
    """The batched sequences give llama-cpp-python's own greedy `generate` tokens for every prompt
    (its reference decoder, one sequence at a time); at 8 bits the float parent's logits."""
    from llama_cpp import Llama

    _, merged, tok = parent
    prompts = [chat_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    for how in ("q8_0", "q4_0"):
        path = derived[how] / GGUF_DIR / GGUF_FILE
        ours = GgufModel(derived[how], tok.eos_token_id, n_seq=4, n_ctx_seq=256).generate_ids(prompts, 10)
        reference = Llama(str(path), n_ctx=256, n_threads=1, verbose=False)
        for prompt, (tokens, _stopped) in zip(prompts, ours):
            reference.reset()
            theirs = []
            for t in reference.generate(prompt, temp=0.0, repeat_penalty=1.0):
                if t == tok.eos_token_id or len(theirs) == 10:
                    break
                theirs.append(t)
            assert tokens == theirs, (how, prompt)
    # 8 bits: llama.cpp's next-token logits are the merged float model's, to quantization noise
    seqs = GgufModel(derived["q8_0"], tok.eos_token_id).seqs
    for prompt in prompts:
        theirs = torch.from_numpy(seqs.decode({0: (prompt, 0)})[0])
        seqs.forget(0)
        with torch.no_grad():
            floats = merged(torch.tensor([prompt])).logits[0, -1]
        assert torch.nn.functional.cosine_similarity(theirs, floats, dim=0) > 0.99


def test_perplexity_through_llama_cpp_is_close_to_the_float_parents(parent, derived) -> None:
    import pandas as pd

    from tasks.evaluate import perplexity

    _, merged, tok = parent
    rows = pd.DataFrame(
        {
            "messages": [[{"role": "user", "content": q}] for q in QUESTIONS],
            "reference": ["four", "red", "France", "hi", "ok"],
        }
    )
    floats = perplexity(merged, tok, rows, 64, 4)
    q8 = perplexity(GgufModel(derived["q8_0"], tok.eos_token_id), tok, rows, 64, 4)
    assert abs(q8 - floats) / floats < 0.05


def _run(coro):
    return asyncio.run(coro)


def test_the_engine_batches_requests_with_the_reference_tokens_and_honours_sampling(parent, derived) -> None:
    _, _, tok = parent
    spec = EngineSpec(
        torch_threads=1,
        max_batch_size=3,
        batch_wait_timeout_s=0.05,
        merge_default=False,
        prefix_cache=0,
        max_prompt_tokens=200,
        max_new_tokens=64,
    )
    engine = LlamaCppEngine(derived["q8_0"], tok, spec, "9")
    prompts = [chat_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    expected = GgufModel(derived["q8_0"], tok.eos_token_id).generate_ids(prompts, 8)

    async def many():
        tickets = [engine.submit(p, 8, "9", stream=False, pinned=False) for p in prompts]  # 5 rows, 3 sequences
        return [await t.done for t in tickets]

    rows = _run(many())
    assert [r.tokens for r in rows] == [t for t, _ in expected]
    assert all(r.finish_reason in ("stop", "length") for r in rows)
    stats = engine.stats()
    assert stats.rows == 5 and stats.row_steps > stats.steps  # rows decoded together

    async def sampled(seed):
        s = Sampling(temperature=1.5, top_p=0.9, seed=seed, logprobs=True, top_logprobs=2)
        return await engine.submit(prompts[0], 6, "9", stream=False, pinned=False, sampling=s).done

    a, b = _run(sampled(7)), _run(sampled(7))
    assert a.tokens == b.tokens and len(a.logprobs) == len(a.tokens)  # a seed reproduces, logprobs come back

    async def streamed():
        ticket = engine.submit(prompts[1], 5, "9", stream=True, pinned=False)
        got = [t async for t in engine.stream(ticket)]
        return got, await ticket.done

    got, row = _run(streamed())
    assert got[: len(row.tokens)] == row.tokens

    async def wrong_version():
        engine.submit(prompts[0], 4, "3", stream=False, pinned=True)

    with pytest.raises(VersionNotLoaded):
        _run(wrong_version())
    engine.close()


def test_what_cannot_be_derived_is_refused_with_the_reason(parent, derived, tmp_path) -> None:
    art, *_ = parent
    with pytest.raises(DerivationError, match="Unknown derivation method 'int3'"):
        derive(art, "models:/m/1", "int3", tmp_path / "x", tmp_path / "w")
    with pytest.raises(DerivationError, match="already a derived GGUF version"):
        derive(derived["q8_0"], "models:/m/2", "q4_0", tmp_path / "y", tmp_path / "w2")


def test_a_missing_converter_says_how_to_get_it(parent, tmp_path, monkeypatch) -> None:
    art, *_ = parent
    monkeypatch.setenv("TUNELOOP_LLAMA_CPP_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DerivationError, match="make install"):
        derive(art, "models:/m/1", "q8_0", tmp_path / "x", tmp_path / "w")
    assert json.loads((art / "base.json").read_text())  # the parent is untouched
