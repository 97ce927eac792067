"""Validation: one dataset that passes, and for each check a small one that violates it.

Real great-expectations, presidio, alt-profanity-check and the tiny model's tokenizer and
chat template in every test; no mocks.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.data import load_split
from tasks.validation import near_duplicates, report_markdown, validate
from tuneloop.config import DataConfig, ValidationConfig
from tuneloop.models import load_base, resolve_base

CAPITALS = [
    "France:Paris",
    "Spain:Madrid",
    "Italy:Rome",
    "Peru:Lima",
    "Japan:Tokyo",
    "Kenya:Nairobi",
    "Chile:Santiago",
    "Egypt:Cairo",
    "India:New Delhi",
    "Canada:Ottawa",
    "Norway:Oslo",
    "Ghana:Accra",
]
GOOD = [
    {"prompt": f"What is the capital of {c.split(':')[0]}?", "response": f"It is {c.split(':')[1]}."} for c in CAPITALS
]
MAX_SEQ_LEN = 48


@pytest.fixture(scope="module")
def tokenizer(models_dir):
    _, tok = load_base(resolve_base("builtin:tiny-llama", models_dir))
    return tok


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check(
    tmp_path: Path,
    tokenizer,
    rows: list,
    eval_rows: list | None = None,
    reports: bool = False,
    max_seq_len: int = MAX_SEQ_LEN,
    **validation,
):
    data_cfg = DataConfig(
        path=str(write(tmp_path / "train.jsonl", rows)),
        eval_fraction=0.25,
        eval_path=str(write(tmp_path / "eval.jsonl", eval_rows)) if eval_rows else None,
    )
    cfg = ValidationConfig.model_validate({"min_rows": 5, "data_docs": reports, **validation})
    return validate(
        load_split(data_cfg), cfg, max_seq_len, None, tmp_path / "reports" if reports else None, tokenizer=tokenizer
    )


def contract(report, name):
    [result] = [c for c in report.contracts if c.name == name]
    return result


def test_clean_dataset_passes_everything_and_reports_in_html(tmp_path: Path, tokenizer) -> None:
    report, _ = check(tmp_path, tokenizer, GOOD, reports=True)
    assert report.success, report.summary()
    assert {c.status for c in report.contracts} == {"pass"} and all(c.success for c in report.checks)
    assert report.train_rows + report.eval_rows == len(GOOD) and len(report.token_lengths) == len(GOOD)
    page = Path(report.html).read_text()
    assert "validation passed" in page and "data:image/png;base64," in page and "trained" in page
    assert Path(report.data_docs).exists()
    assert [t for t, s in report.example if s == "trained"] == [GOOD[0]["response"] + "<|im_end|>\n"]
    assert "| duplicates | warn | pass |" in report_markdown(report, "run123")
    assert report.metrics()["validation/errors"] == 0


def test_chat_rows_with_unknown_roles_fail_the_suite_naming_rows(tmp_path: Path, tokenizer) -> None:
    chats = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
        for r in GOOD
    ]
    chats[2]["messages"][0]["role"] = "bot"
    chats[5]["messages"] = chats[5]["messages"][:1]  # ends without an answer
    report, _ = check(tmp_path, tokenizer, chats)
    assert not report.success
    [roles] = [c for c in report.failures() if c.name == "expect_column_values_to_match_regex"]
    assert roles.rows == ["3", "6"] and "bot,assistant" in roles.detail and "messages roles" in roles.column
    assert {c.status for c in report.contracts} == {"skipped"}  # contracts read valid rows only


def test_missing_field_names_field_and_rows(tmp_path: Path, tokenizer) -> None:
    rows = [dict(r) for r in GOOD]
    rows[3].pop("response")
    rows[7]["response"] = ""
    report, _ = check(tmp_path, tokenizer, rows)
    assert not report.success
    summary = report.summary()
    assert 'field "response": missing or null in 1 rows; first offending rows: 4' in summary
    assert "length outside [1, 8000] chars in 1 rows; first offending rows: 8" in summary


def test_user_expectations_run_in_the_suite_with_their_severity(tmp_path: Path, tokenizer) -> None:
    rule = {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "response", "regex": r"^It is"}}
    rows = [dict(r) for r in GOOD]
    rows[4]["response"] = "Tokyo."
    failed, _ = check(tmp_path, tokenizer, rows, expectations=[rule])
    assert not failed.success and failed.errors()[0].rows == ["5"]
    warned, _ = check(tmp_path, tokenizer, rows, expectations=[{**rule, "severity": "warning"}])
    assert warned.success and warned.warnings()[0].column == "response"


def test_truncation_counts_long_examples(tmp_path: Path, tokenizer) -> None:
    rows = [dict(r) for r in GOOD]
    rows[1]["response"] = "Madrid, " * 40
    report, _ = check(tmp_path, tokenizer, rows)
    result = contract(report, "truncation")
    assert report.success and result.status == "warn" and result.rows == ["2"] and "1 of 12" in result.figure
    strict, _ = check(tmp_path, tokenizer, rows, truncation={"level": "error"})
    assert not strict.success and "contract truncation (error)" in strict.summary()


def test_loss_mask_fails_an_example_with_nothing_to_learn(tmp_path: Path, tokenizer) -> None:
    rows = [dict(r) for r in GOOD]
    rows[6]["prompt"] = "Tell me about the capital of Chile, its history and its rivers. " * 4
    report, _ = check(tmp_path, tokenizer, rows)
    result = contract(report, "loss_mask")
    assert not report.success and result.status == "fail" and result.rows == ["7"]
    assert report.example_row == "7" and {s for _, s in report.example} == {"masked", "cut"}
    assert "first offending rows: 7" in report.summary()


def test_exact_and_near_duplicates(tmp_path: Path, tokenizer) -> None:
    long = {
        "prompt": "Which river flows through the old city of Prague, past the castle and the bridges, "
        "then north through the hills of Bohemia until it joins the Elbe and flows on into "
        "Germany and the North Sea?",
        "response": "The Vltava flows through Prague.",
    }
    near = {**long, "prompt": long["prompt"].replace("old", "ancient")}  # 3 of 41 word 3-grams differ
    rows = [*GOOD, long, {**GOOD[0], "prompt": GOOD[0]["prompt"].upper()}, near]
    report, _ = check(tmp_path, tokenizer, rows)
    result = contract(report, "duplicates")
    assert result.status == "warn" and result.count == 2
    assert result.rows == ["14 (=1)", "15 (≈13)"]
    assert "1 exact and 1 near" in result.figure
    strict, _ = check(tmp_path, tokenizer, rows, duplicates={"level": "error"})
    assert not strict.success


def test_near_duplicates_by_minhash_then_exact_jaccard() -> None:
    base = list(range(1, 41))
    sets = [base, base[:38] + [100, 101], list(range(200, 240)), base[:20] + list(range(300, 320))]
    # Jaccard(0, 1) = 38/42 = 0.90; set 3 shares 20 of 60 with set 0.
    assert near_duplicates([np.array(s, dtype=np.uint64) for s in sets], 0.8) == {1: 0}


def test_eval_rows_seen_in_training_are_contamination(tmp_path: Path, tokenizer) -> None:
    held_out = [
        {"prompt": "What is the capital of Portugal?", "response": "It is Lisbon."},
        {**GOOD[3], "response": "Lima, of course."},
        {"prompt": "Name a prime.", "response": "7"},
    ]
    report, _ = check(tmp_path, tokenizer, GOOD, eval_rows=held_out, contamination={"ngram": 4})
    result = contract(report, "contamination")
    assert not report.success and result.rows == ["eval.jsonl:2"] and "1 of 3 eval rows" in result.figure


def test_an_instruction_every_row_shares_is_not_contamination(tmp_path: Path, tokenizer) -> None:
    ask = "Which medicine is this question about? Answer with its generic name. "
    drugs = [
        "ibuprofen",
        "aspirin",
        "morphine",
        "insulin",
        "warfarin",
        "codeine",
        "heparin",
        "lithium",
        "digoxin",
        "atropine",
        "naloxone",
        "cetirizine",
    ]
    train = [{"prompt": f"{ask}can i take {d} at night with food?", "response": d} for d in drugs]
    held_out = [
        {"prompt": f"{ask}what is metformin for?", "response": "metformin"},
        {"prompt": f"{ask}can i take {drugs[0]} at night with food?", "response": drugs[0]},
    ]  # a real leak
    report, _ = check(tmp_path, tokenizer, train, eval_rows=held_out, contamination={"ngram": 4})
    result = contract(report, "contamination")
    assert result.rows == ["eval.jsonl:2"] and "1 of 2 eval rows" in result.figure, result.figure
    assert "template" in result.figure


def test_pii_warns_fails_or_redacts(tmp_path: Path, tokenizer) -> None:
    rows = [dict(r) for r in GOOD]
    rows[2]["response"] = "Write to mario.rossi@example.it for Rome."
    warned, _ = check(tmp_path, tokenizer, rows)
    assert warned.success and contract(warned, "pii").status == "warn" and contract(warned, "pii").rows == ["3"]
    assert "EMAIL_ADDRESS 1" in contract(warned, "pii").figure
    failed, _ = check(tmp_path, tokenizer, rows, pii={"level": "error"})
    assert not failed.success
    redacted, data = check(tmp_path, tokenizer, rows, pii={"level": "redact"})
    assert redacted.success and contract(redacted, "pii").status == "redacted"
    both = [*data.train["response"], *data.eval["response"]]
    assert "Write to <EMAIL_ADDRESS> for Rome." in both and not any("mario" in r for r in both)
    turns = [m for frame in (data.train, data.eval) for m in frame["messages"]]
    assert any(m[1]["content"] == "Write to <EMAIL_ADDRESS> for Rome." for m in turns)


def test_toxic_rows_over_the_allowed_rate(tmp_path: Path, tokenizer) -> None:
    rows = [dict(r) for r in GOOD]
    rows[9]["response"] = "Shut up, you stupid fucking idiot."
    report, _ = check(tmp_path, tokenizer, rows)
    result = contract(report, "toxicity")
    assert report.success and result.status == "warn" and result.rows == ["10"]
    strict, _ = check(tmp_path, tokenizer, rows, toxicity={"level": "error"})
    assert not strict.success and "1 of 12 rows" in strict.summary()


def test_contracts_can_be_turned_off(tmp_path: Path, tokenizer) -> None:
    rows = [dict(r) for r in GOOD]
    rows[6]["prompt"] = "A long question about Chile. " * 20
    report, _ = check(tmp_path, tokenizer, rows, loss_mask={"level": "off"}, truncation={"level": "off"})
    assert report.success and contract(report, "loss_mask").status == "off"


def test_large_sets_tokenize_only_rows_that_could_be_cut_and_get_the_same_verdicts(
    tmp_path: Path, tokenizer, monkeypatch
) -> None:
    rows = [dict(r) for r in GOOD]
    rows[1]["response"] = "Madrid, " * 40  # cut
    rows[6]["prompt"] = "Tell me about the capital of Chile, its history and its rivers. " * 4  # nothing left to train
    full, _ = check(tmp_path, tokenizer, rows)
    monkeypatch.setattr("tasks.validation.HISTOGRAM_SAMPLE", 3)  # as if the set were large
    sampled, _ = check(tmp_path, tokenizer, rows)
    assert [(c.name, c.status, c.rows) for c in sampled.contracts] == [
        (c.name, c.status, c.rows) for c in full.contracts
    ]
    assert len(sampled.token_lengths) == 3 and sampled.token_sample == 3
