"""Data stage: every input form and both shapes into one internal form; loading errors."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.data import DataValidationError, load_split, read_dataset
from tuneloop.config import DataConfig

GOOD = [{"prompt": f"What is {i} plus 1?", "response": f"{i + 1}"} for i in range(20)]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["response"]},
        ]
    }
    for r in GOOD
]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_file_form_reads_to_the_same_internal_form(tmp_path: Path) -> None:
    import datasets

    frame = pd.DataFrame(GOOD)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "d_disk"))
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(tmp_path / "dd"))
    forms = [
        write(tmp_path / "d.jsonl", GOOD),
        tmp_path / "d.csv",
        tmp_path / "d.parquet",
        tmp_path / "d_disk",
        tmp_path / "dd",
    ]
    loaded = [read_dataset(p, DataConfig()) for p in forms]
    reference = list(loaded[0].frame["messages"])
    assert reference[0] == [{"role": "user", "content": "What is 0 plus 1?"}, {"role": "assistant", "content": "1"}]
    for data in loaded:
        assert data.shape == "prompt_response"
        assert list(data.frame["messages"]) == reference, data.source
        assert list(data.frame["prompt"]) == [r["prompt"] for r in GOOD]
    assert list(loaded[1].frame.index[:2]) == [2, 3]  # CSV rows are file lines: line 1 is the header
    assert list(loaded[2].frame.index[:2]) == [1, 2]


def test_chat_shape_from_jsonl_and_parquet(tmp_path: Path) -> None:
    jsonl = read_dataset(write(tmp_path / "c.jsonl", CHATS), DataConfig())
    pd.DataFrame(CHATS).to_parquet(tmp_path / "c.parquet")
    parquet = read_dataset(tmp_path / "c.parquet", DataConfig())
    for data in (jsonl, parquet):
        assert data.shape == "messages"
        assert data.frame["roles"].iloc[0] == "system,user,assistant"
        assert data.frame["prompt"].iloc[3] == "What is 3 plus 1?" and data.frame["response"].iloc[3] == "4"
        assert list(data.frame["messages"]) == [c["messages"] for c in CHATS]


def test_malformed_turns_are_marked_for_the_suite(tmp_path: Path) -> None:
    rows = [*CHATS[:2], {"messages": "not turns"}, {"messages": [{"role": "user"}]}]
    frame = read_dataset(write(tmp_path / "c.jsonl", rows), DataConfig()).frame
    assert frame["messages"].iloc[2] is None and frame["roles"].iloc[2].startswith("<invalid")
    assert frame["roles"].iloc[3] == "<invalid: a turn without role and content>"


def test_column_mapping(tmp_path: Path) -> None:
    rows = [{"q": r["prompt"], "a": r["response"]} for r in GOOD]
    data = read_dataset(write(tmp_path / "d.jsonl", rows), DataConfig(prompt_field="q", response_field="a"))
    assert data.fields == {"prompt": "q", "response": "a"} and data.frame["response"].iloc[0] == "1"


def test_separate_eval_file_and_seeded_split(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", GOOD)
    a = load_split(DataConfig(path=str(path), eval_fraction=0.25))
    b = load_split(DataConfig(path=str(path), eval_fraction=0.25))
    assert list(a.eval.index) == list(b.eval.index) and a.digest == b.digest
    assert len(a.eval) == 5 and len(a.train) == 15 and not set(a.eval.index) & set(a.train.index)
    held = load_split(DataConfig(path=str(path), eval_path=str(write(tmp_path / "e.jsonl", GOOD[:3]))))
    assert len(held.train) == 20 and len(held.eval) == 3 and held.label("eval", 2) == "e.jsonl:2"
    with pytest.raises(DataValidationError, match="eval set .* messages shape|Eval set .*messages shape"):
        load_split(DataConfig(path=str(path), eval_path=str(write(tmp_path / "c.jsonl", CHATS))))


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="nope.jsonl does not exist"):
        read_dataset(tmp_path / "nope.jsonl", DataConfig())


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [GOOD[0], GOOD[1], "{not json"])
    with pytest.raises(DataValidationError, match="line 3: not valid JSON"):
        read_dataset(path, DataConfig())


def test_unreadable_and_unknown_files(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataValidationError, match="cannot be read"):
        read_dataset(path, DataConfig())
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataValidationError, match="unknown file type '.xlsx'"):
        read_dataset(tmp_path / "d.xlsx", DataConfig())
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataValidationError, match="broken.parquet cannot be read as parquet"):
        read_dataset(tmp_path / "broken.parquet", DataConfig())


def test_missing_split_of_a_saved_dataset_dict(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(GOOD)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataValidationError, match=r"no split 'train'; it has \['test'\]"):
        read_dataset(tmp_path / "dd", DataConfig())


def test_hub_id_without_a_hub_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub; CI neither
    with pytest.raises(DataValidationError, match="tuneloop-nobody/none cannot be read from the hub"):
        read_dataset("tuneloop-nobody/none", DataConfig())
