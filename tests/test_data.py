"""Data stage: loading errors and the great-expectations suite (real GX, no mocks)."""

import json
from pathlib import Path

import pytest

from tasks.data import DataValidationError, read_jsonl_dataset, run_expectations, split_dataset
from tuneloop.config import DataConfig, ValidationConfig

GOOD = [{"prompt": f"What is {i} plus 1?", "response": f"{i + 1}"} for i in range(20)]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def validate(path: Path, **fields):
    cfg = DataConfig(path=path, **fields)
    return run_expectations(read_jsonl_dataset(cfg), ValidationConfig(data_docs=False), cfg)


def test_valid_dataset_passes_every_expectation(tmp_path: Path) -> None:
    report = validate(write(tmp_path / "d.jsonl", GOOD))
    assert report.success, report.summary()
    assert report.rows == 20
    assert {c.name for c in report.checks} >= {
        "expect_column_to_exist", "expect_column_values_to_not_be_null",
        "expect_column_value_lengths_to_be_between", "expect_table_row_count_to_be_between",
    }


def test_missing_field_names_field_and_rows(tmp_path: Path) -> None:
    rows = GOOD[:5] + [{"prompt": "no answer here"}] + GOOD[5:10] + [{"prompt": "nor here"}] + GOOD[10:]
    report = validate(write(tmp_path / "d.jsonl", rows))
    assert not report.success
    [failure] = report.failures()
    assert failure.column == "response" and failure.rows == [6, 12]  # line numbers in the file
    assert 'field "response"' in report.summary() and "6, 12" in report.summary()


def test_column_mapping_reports_the_users_field_name(tmp_path: Path) -> None:
    rows = [{"q": r["prompt"], "a": r["response"]} for r in GOOD]
    assert validate(write(tmp_path / "d.jsonl", rows), prompt_field="q", response_field="a").success
    report = validate(write(tmp_path / "e.jsonl", [{"q": r["prompt"]} for r in GOOD]),
                      prompt_field="q", response_field="a")
    assert [c.column for c in report.failures()] == ["a"]
    assert "missing from every row" in report.summary()


def test_empty_strings_and_too_few_rows(tmp_path: Path) -> None:
    report = validate(write(tmp_path / "d.jsonl", GOOD[:3] + [{"prompt": "", "response": "x"}]))
    names = {c.name for c in report.failures()}
    assert names == {"expect_column_value_lengths_to_be_between", "expect_table_row_count_to_be_between"}
    assert "4 rows, at least 10 required" in report.summary()


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="nope.jsonl does not exist"):
        read_jsonl_dataset(DataConfig(path=tmp_path / "nope.jsonl"))


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [GOOD[0], GOOD[1], "{not json"])
    with pytest.raises(DataValidationError, match="line 3: not valid JSON"):
        read_jsonl_dataset(DataConfig(path=path))


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataValidationError, match="cannot be read"):
        read_jsonl_dataset(DataConfig(path=path))


def test_data_docs_are_built_into_the_given_folder(tmp_path: Path) -> None:
    cfg = DataConfig(path=write(tmp_path / "d.jsonl", GOOD))
    report = run_expectations(read_jsonl_dataset(cfg), ValidationConfig(), cfg, tmp_path / "docs")
    assert report.data_docs and Path(report.data_docs).exists()


def test_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    cfg = DataConfig(path=write(tmp_path / "d.jsonl", GOOD), eval_fraction=0.25)
    data = read_jsonl_dataset(cfg)
    a, b = split_dataset.fn(data, cfg), split_dataset.fn(data, cfg)
    assert list(a.eval.index) == list(b.eval.index)
    assert len(a.eval) == 5 and len(a.train) == 15
    assert not set(a.eval.index) & set(a.train.index)
