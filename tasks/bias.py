"""Counterfactual text: the same words about another group (gender, nationality, religion, age).

    counterfactual("John said he would call his mother.", "gender")
    # -> "Mary said she would call her father."
    augment_rows(frame, ["gender"])   # training rows plus a swapped copy of each row a swap changes

Word pairs and their sources are in `tasks/bias/terms.yaml`; a pair swaps both ways, by whole
word, keeping case; given names swap only where capitalized. The augmented training set is the
counterfactual data augmentation of Lu et al. (2018): every example also seen about the other
group, so a model cannot learn an answer from the group alone (`data.counterfactual_augment`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

TERMS_FILE = Path(__file__).parent / "bias" / "terms.yaml"
CATEGORIES = ("gender", "nationality", "religion", "age")
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
