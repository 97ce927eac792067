"""Output guardrails on real presidio and the real toxicity classifier: whole answers and streams."""

import re

import pytest
from pydantic import ValidationError

from serving.guardrails import OutputGuard
from tuneloop.config import GuardrailsConfig, OutputPolicy, load_config

CONTACT = "Sure! You can reach support at help.desk@example.com or on 555 123 4567 any day of the week."
RUDE = "Paris is the capital. You are a stupid idiot and I hate you."


def pieces(text: str, size: int = 3) -> list[str]:
    """The text cut as a tokenizer might: a leading space and a few characters at a time."""
    return re.findall(rf"\s*\S{{1,{size}}}", text) + ([""] if not text else [])


def streamed(guard: OutputGuard, text: str, size: int = 3) -> tuple[list[str], object]:
    stream, sent = guard.stream(), []
    for p in pieces(text, size):
        sent.append(stream.feed(p))
        if stream.blocked:
            break
    else:
        sent.append(stream.finish())
    return sent, stream


@pytest.fixture(scope="module")
def default() -> OutputGuard:
    return OutputGuard(OutputPolicy())


def test_defaults_redact_pii_and_block_toxicity(default: OutputGuard) -> None:
    checked = default.check(CONTACT)
    assert checked.text == ("Sure! You can reach support at <EMAIL_ADDRESS> or on <PHONE_NUMBER> any day of the week.")
    assert checked.actions == ["pii_redacted"] and checked.entities == ["EMAIL_ADDRESS", "PHONE_NUMBER"]
    assert checked.changed and not checked.blocked
    assert checked.filter_results()["pii"] == {
        "filtered": True,
        "action": "redact",
        "entities": ["EMAIL_ADDRESS", "PHONE_NUMBER"],
    }

    rude = default.check(RUDE)
    assert rude.blocked == "toxicity" and rude.text == "I can't help with that." and rude.toxicity > 0.8
    assert rude.filter_results()["toxicity"]["filtered"] is True


@pytest.mark.parametrize(
    "answer",
    [
        "The capital of France is Paris.",
        "1234 + 5678 = 6912",
        "The answer is 12345678.",
        "William Shakespeare wrote Hamlet in London around 1600.",
        "Take 2 tablets every 4-6 hours, at most 8 in 24 hours.",
        "",
    ],
)
def test_ordinary_answers_pass_untouched(default: OutputGuard, answer: str) -> None:
    checked = default.check(answer)
    assert (checked.text, checked.actions, checked.filter_results()) == (answer, [], None)
    sent, stream = streamed(default, answer)
    assert "".join(sent) == answer and not stream.actions


@pytest.mark.parametrize("size", [1, 3, 7])
def test_a_stream_never_lets_a_digit_of_a_phone_or_a_letter_of_an_email_out(default: OutputGuard, size: int) -> None:
    sent, _ = streamed(default, CONTACT, size)
    assert "".join(sent) == default.check(CONTACT).text
    for piece in sent:
        assert not re.search(r"\d|help|desk|example", piece), piece
    # and it streamed: the text left in more than one piece before the end
    assert sum(bool(p) for p in sent[:-1]) >= 3


def test_a_stream_stops_at_the_first_toxic_sentence_before_its_bad_word(default: OutputGuard) -> None:
    sent, stream = streamed(default, RUDE + " More text that is never written.")
    visible = "".join(sent)
    assert stream.blocked == "toxicity" and stream.actions == ["toxicity_blocked"]
    assert "stupid" not in visible and "idiot" not in visible and "never" not in visible
    assert RUDE.startswith(visible)  # what left before the block is the clean start of the answer


def test_block_pii_refuses_the_whole_answer_and_its_stream() -> None:
    guard = OutputGuard(OutputPolicy(pii="block", toxicity="off", refusal="Not shared."))
    checked = guard.check(CONTACT)
    assert (checked.text, checked.blocked, checked.actions) == ("Not shared.", "pii", ["pii_blocked"])
    sent, stream = streamed(guard, CONTACT)
    assert stream.blocked == "pii" and "@" not in "".join(sent) and "help" not in "".join(sent)


def test_flag_returns_the_answer_and_marks_it() -> None:
    guard = OutputGuard(OutputPolicy(pii="off", toxicity="flag", toxicity_threshold=0.6))
    checked = guard.check(RUDE)
    assert checked.text == RUDE and checked.actions == ["toxicity_flagged"] and not checked.changed
    results = checked.filter_results()
    assert results["toxicity"]["flagged"] and not results["toxicity"]["filtered"]
    sent, stream = streamed(guard, RUDE)
    assert "".join(sent) == RUDE and stream.actions == ["toxicity_flagged"]


def test_off_is_a_pass_through_stream() -> None:
    guard = OutputGuard(OutputPolicy(pii="off", toxicity="off", stream_holdback_chars=0))
    assert not guard.active
    sent, _ = streamed(guard, CONTACT)
    assert sent[: len(pieces(CONTACT))] == pieces(CONTACT)  # nothing held back


def test_streamed_and_whole_answers_get_the_same_verdict(default: OutputGuard) -> None:
    texts = [
        CONTACT,
        RUDE,
        "Card 4111 1111 1111 1111 and SSN 219-09-9999.",
        "Write to a@b.co. Then call (555) 123-4567!",
        "Ünïcödé ✓ 東京 is far. 🙂 Fine.",
    ]
    for text in texts:
        whole = default.check(text)
        sent, stream = streamed(default, text)
        assert stream.blocked == whole.blocked, text
        if not whole.blocked:
            assert "".join(sent) == whole.text, text


def test_policies_are_validated() -> None:
    with pytest.raises(ValidationError, match="unknown PII entities"):
        OutputPolicy(pii_entities=["PASSPORT"])
    with pytest.raises(ValidationError):
        OutputPolicy(toxicity="warn")
    with pytest.raises(ValidationError):
        GuardrailsConfig(embeddings=OutputPolicy())
    cfg = load_config(None, ["serve.guardrails.completions.pii=off", "serve.guardrails.chat.toxicity=flag"])
    assert cfg.serve.guardrails.completions.pii == "off" and cfg.serve.guardrails.chat.toxicity == "flag"
