"""Validation stage: a great-expectations suite, then LLM data contracts, in one report.

    tuneloop validate data.jsonl                       # the same checks from the CLI

The suite (real GX, with Data Docs) checks the table: columns, nulls, lengths, roles,
uniqueness and any expectation the config adds. The contracts check what only shows once
the model's tokenizer and chat template are applied, and what a table suite cannot see:

- truncation: examples longer than `train.max_seq_len` tokens;
- loss mask: examples with no trained (answer) token left after truncation;
- duplicates: exact (normalised text) and near (MinHash over word n-grams, then exact Jaccard);
- contamination: eval rows whose n-grams appear in the training rows;
- PII (presidio; error, redact or warn) and toxicity (alt-profanity-check).

Each has a level (error / warn / off); an error-level violation or a critical expectation
that fails makes `DatasetReport.success` false, and the training flow stops before any
training. Row numbers are the rows' numbers in their file (tasks/data.py).
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from tasks.data import MESSAGES, PROMPT, RESPONSE, ROLES, SplitDataset
from tuneloop.config import ValidationConfig
from tuneloop.models import BaseRef
from tuneloop.reports import Table

log = logging.getLogger(__name__)

SUITE_NAME = "tuneloop-instruction-data"
SHOWN_ROWS = 5  # offending rows named per check
Status = str  # "pass", "warn", "fail", "redacted", "off", "skipped"


@dataclass
class CheckResult:
    """One great-expectations expectation's outcome."""

    name: str
    column: str | None
    success: bool
    rows: list[str] = field(default_factory=list)  # first offending rows
    detail: str = ""
    severity: str = "critical"  # "warning": recorded, does not fail validation

    def describe(self) -> str:
        where = f' field "{self.column}"' if self.column else ""
        rows = f"; first offending rows: {', '.join(self.rows)}" if self.rows else ""
        return f"{self.name}{where}{': ' + self.detail if self.detail else ''}{rows}"


@dataclass
class ContractResult:
    """One LLM data contract's outcome: its figure, the rows behind it, and the verdict."""

    name: str
    level: str
    status: Status
    figure: str
    count: int = 0  # offending rows
    rows: list[str] = field(default_factory=list)

    def describe(self) -> str:
        rows = f"; first offending rows: {', '.join(self.rows)}" if self.rows else ""
        return f"contract {self.name} ({self.level}): {self.figure}{rows}"


@dataclass
class DatasetReport:
    source: str
    eval_source: str | None
    shape: str
    train_rows: int
    eval_rows: int
    digest: str
    checks: list[CheckResult]
    contracts: list[ContractResult]
    max_seq_len: int
    token_lengths: list[int] = field(default_factory=list)  # of every row, or of a seeded sample
    token_sample: int = 0
    example_row: str | None = None
    example: list[tuple[str, str]] = field(default_factory=list)  # (text, masked|trained|cut)
    data_docs: str | None = None
    html: str | None = None

    @property
    def rows(self) -> int:
        return self.train_rows + self.eval_rows

    @property
    def success(self) -> bool:
        return not self.errors()

    def errors(self) -> list[CheckResult | ContractResult]:
        return [c for c in self.checks if not c.success and c.severity == "critical"] + [
            c for c in self.contracts if c.status == "fail"
        ]

    def warnings(self) -> list[CheckResult | ContractResult]:
        return [c for c in self.checks if not c.success and c.severity != "critical"] + [
            c for c in self.contracts if c.status in ("warn", "redacted")
        ]

    def failures(self) -> list[CheckResult]:
        """The expectations that failed (critical ones fail validation)."""
        return [c for c in self.checks if not c.success]

    def summary(self) -> str:
        status = "passed" if self.success else "FAILED"
        where = f" (eval rows from {self.eval_source})" if self.eval_source else ""
        lines = [
            (f"Dataset {self.source}: {self.train_rows} train + {self.eval_rows} eval rows{where}, validation {status}")
        ]
        lines += [f"  ERROR {c.describe()}" for c in self.errors()]
        lines += [f"  warning {c.describe()}" for c in self.warnings()]
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        """Figures for MLflow, named the same in every run so the compare view lines them up."""
        out = {
            "validation/train_rows": self.train_rows,
            "validation/eval_rows": self.eval_rows,
            "validation/errors": len(self.errors()),
            "validation/warnings": len(self.warnings()),
        }
        out |= {f"validation/{c.name}_rows": c.count for c in self.contracts if c.status != "off"}
        if self.token_lengths:
            out["validation/tokens_p50"] = float(np.median(self.token_lengths))
            out["validation/tokens_max"] = float(max(self.token_lengths))
        return out


# ---------------------------------------------------------------- great-expectations suite


def _expectation(gx, spec_type: str, kwargs: dict[str, Any], severity: str):
    cls = getattr(gx.expectations, "".join(part.title() for part in spec_type.split("_")))
    return cls(**kwargs, severity=severity)


def _build_suite(gx, cfg: ValidationConfig, data: SplitDataset):
    E = gx.expectations
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    suite.add_expectation(E.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows))
    if data.shape == "messages":
        suite.add_expectation(E.ExpectColumnToExist(column=MESSAGES))
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=MESSAGES))
        allowed = "|".join(re.escape(r) for r in cfg.roles)
        # Allowed roles only, and a conversation ends with the answer it teaches.
        suite.add_expectation(
            E.ExpectColumnValuesToMatchRegex(
                column=ROLES, regex=f"^(?:(?:{allowed}),)*assistant$", meta={"roles": cfg.roles}
            )
        )
    else:
        for column in (PROMPT, RESPONSE):
            suite.add_expectation(E.ExpectColumnToExist(column=column))
            suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=column))
    limits = {PROMPT: cfg.max_prompt_chars, RESPONSE: cfg.max_response_chars}
    for column, limit in limits.items():
        suite.add_expectation(E.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1, max_value=limit))
    if cfg.unique != "off":
        suite.add_expectation(E.ExpectColumnValuesToBeUnique(column="conversation", severity=cfg.unique))
    by_user_name = {name: column for column, name in data.fields.items()}
    for spec in cfg.expectations:
        kwargs = dict(spec.kwargs)
        if "column" in kwargs:
            kwargs["column"] = by_user_name.get(kwargs["column"], kwargs["column"])
        suite.add_expectation(_expectation(gx, spec.type, kwargs, spec.severity))
    return suite


def _suite_frame(data: SplitDataset) -> pd.DataFrame:
    """Both splits in one frame the suite reads: texts, roles, and the conversation as JSON."""
    parts = []
    for split, frame in (("train", data.train), ("eval", data.eval)):
        part = frame.drop(columns=[MESSAGES]).copy()
        part["conversation"] = [json.dumps(m) if m is not None else None for m in frame[MESSAGES]]
        if data.shape == "messages":
            part[MESSAGES] = part["conversation"]
        part.index = pd.Index([data.label(split, r) for r in frame.index], name="row")
        parts.append(part)
    return pd.concat(parts)


def _detail(kind: str, result: dict[str, Any], kwargs: dict[str, Any], cfg: ValidationConfig, success: bool) -> str:
    if success:
        return ""
    count = result.get("unexpected_count", "?")
    if kind == "expect_column_to_exist":
        return "missing from every row"
    if kind == "expect_column_values_to_not_be_null":
        return f"missing or null in {count} rows"
    if kind == "expect_column_value_lengths_to_be_between":
        return f"length outside [{kwargs['min_value']}, {kwargs['max_value']}] chars in {count} rows"
    if kind == "expect_table_row_count_to_be_between":
        return f"{result.get('observed_value')} rows, at least {cfg.min_rows} required"
    if kind == "expect_column_values_to_match_regex" and kwargs.get("column") == ROLES:
        seen = sorted({str(v) for v in result.get("partial_unexpected_list") or []})[:3]
        return (
            f"{count} conversations with roles outside {cfg.roles} or not ending with an assistant turn "
            f"(found: {'; '.join(seen)})"
        )
    if kind == "expect_column_values_to_be_unique":
        return f"{count} rows repeat another row verbatim"
    return f"{count} unexpected values" if "unexpected_count" in result else str(result.get("observed_value", ""))


def run_expectations(
    data: SplitDataset, cfg: ValidationConfig, docs_dir: Path | None = None
) -> tuple[list[CheckResult], str | None]:
    """Run the GX suite over both splits; return each expectation's result and the Data Docs index."""
    import great_expectations as gx

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
    suite = ctx.suites.add(_build_suite(gx, cfg, data))
    validation = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="instruction-data", data=definition, suite=suite)
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name="tuneloop",
            validation_definitions=[validation],
            actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": SHOWN_ROWS},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": _suite_frame(data)})
    names = {**data.fields, "conversation": "conversation", ROLES: f"{data.fields.get(MESSAGES, MESSAGES)} roles"}
    checks = []
    for run in result.run_results.values():
        for r in run.results:
            config = r.expectation_config
            column = config.kwargs.get("column")
            rows = [
                str(i["row"]) if isinstance(i, dict) else str(i)
                for i in (r.result.get("partial_unexpected_index_list") or [])[:SHOWN_ROWS]
            ]
            checks.append(
                CheckResult(
                    config.type,
                    names.get(column, column),
                    bool(r.success),
                    rows,
                    _detail(config.type, r.result, config.kwargs, cfg, bool(r.success)),
                    str(getattr(config.severity, "value", config.severity) or "critical"),
                )
            )
    # A missing column also fails the checks on its values: report it once.
    missing = {c.column for c in checks if c.name == "expect_column_to_exist" and not c.success}
    checks = [c for c in checks if c.name == "expect_column_to_exist" or c.column not in missing]
    docs = str(Path(docs_dir) / "index.html") if actions else None
    return checks, docs


# ---------------------------------------------------------------- LLM data contracts

_WORD = re.compile(r"\w+")


def _verdict(level: str, violated: bool) -> Status:
    return {"error": "fail", "warn": "warn"}.get(level, "off") if violated else "pass"


def _allowed(count: int, total: int, max_fraction: float) -> bool:
    return count <= max_fraction * total


def _last_answer(turns: list[dict[str, str]]) -> int:
    return max((j for j, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))


class _Rows:
    """All structurally valid rows of both splits, in order, with their labels and words.

    Words are ids (one per distinct lower-cased word, from pandas' hash table) in one flat
    array with each row's start: n-grams, MinHash and overlaps are then array operations.
    """

    def __init__(self, data: SplitDataset) -> None:
        self.split: list[str] = []
        self.labels: list[str] = []
        self.conversations: list[list[dict[str, str]]] = []
        for name, frame in (("train", data.train), ("eval", data.eval)):
            for row, turns in zip(frame.index, frame[MESSAGES]):
                if turns is not None:
                    self.split.append(name)
                    self.labels.append(data.label(name, row))
                    self.conversations.append(turns)
        per_turn = [[_WORD.findall(t["content"].lower()) for t in turns] for turns in self.conversations]
        words = [list(itertools.chain.from_iterable(turns)) for turns in per_turn]
        # Words of the turns before each row's last answer: what evaluation asks (a prefix of the row).
        self.question_lengths = np.array(
            [sum(len(w) for w in turns[: _last_answer(conv)]) for turns, conv in zip(per_turn, self.conversations)],
            dtype=np.int64,
        )
        self.lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(words), dtype=object, count=int(self.lengths.sum()))
        self.words = (pd.factorize(flat)[0].astype(np.uint64) + np.uint64(1)) if len(flat) else np.zeros(0, np.uint64)
        self.is_eval = np.array([s == "eval" for s in self.split], dtype=bool)

    def __len__(self) -> int:
        return len(self.labels)

    def question(self, i: int) -> bytes:
        """Row i's turns before its last answer, as word ids (equal for the same words)."""
        return self.words[self.starts[i] : self.starts[i] + self.question_lengths[i]].tobytes()

    def first(self, indices: list[int] | np.ndarray) -> list[str]:
        return [self.labels[i] for i in list(indices)[:SHOWN_ROWS]]

    def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (hashes, owning row) of every word n-gram; a row shorter than n is one n-gram."""
        hashes, owners, _ = self.ngram_spans(n)
        return hashes, owners

    def ngram_spans(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (hashes, owning row, first word) of every word n-gram; a row shorter than n is one n-gram.

        Polynomial hashes modulo 2^64 of word ids: equal n-grams hash equally, in every run.
        """
        P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier (2^64 / golden ratio)
        ends = self.starts + self.lengths
        owner_of_word = np.repeat(np.arange(len(self.lengths)), self.lengths)
        with np.errstate(over="ignore"):
            m = max(len(self.words) - n + 1, 0)
            h = np.zeros(m, dtype=np.uint64)
            for j in range(n):
                h = h * P + self.words[j : j + m]
            owner = owner_of_word[:m]
            keep = np.arange(m) + n <= ends[owner]
            hashes, owners, firsts = h[keep], owner[keep], np.arange(m, dtype=np.int64)[keep]
            short = np.flatnonzero(self.lengths < n)  # whole row as one n-gram (empty rows: a constant)
            if len(short):
                whole = np.zeros(len(short), dtype=np.uint64)
                for j in range(int(self.lengths[short].max())):
                    present = self.lengths[short] > j
                    values = (
                        self.words[np.minimum(self.starts[short] + j, max(len(self.words) - 1, 0))]
                        if len(self.words)
                        else np.zeros(len(short), np.uint64)
                    )
                    whole = np.where(present, whole * P + values, whole)
                whole = whole * P + self.lengths[short].astype(np.uint64)  # "a b" differs from "a b <pad>"
                hashes, owners = np.concatenate([hashes, whole]), np.concatenate([owners, short])
                firsts = np.concatenate([firsts, self.starts[short]])
                order = np.argsort(owners, kind="stable")
                hashes, owners, firsts = hashes[order], owners[order], firsts[order]
        return hashes, owners, firsts


def _groups(owners: np.ndarray, rows: int) -> np.ndarray:
    """Start of each row's run in an owner-sorted array (every row owns at least one element)."""
    return np.searchsorted(owners, np.arange(rows))


def minhash_signatures(hashes: np.ndarray, starts: np.ndarray, k: int = 64, seed: int = 0) -> np.ndarray:
    """Return a (rows, k) MinHash signature matrix of row-grouped element hashes."""
    rng = np.random.default_rng(seed)
    mult = rng.integers(1, 2**62, size=k, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd: a bijection
    add = rng.integers(0, 2**62, size=k, dtype=np.uint64)
    signatures = np.empty((len(starts), k), dtype=np.uint64)

    def column(j: int) -> None:
        with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
            h = hashes * mult[j] + add[j]
            h ^= h >> np.uint64(31)
            signatures[:, j] = np.minimum.reduceat(h, starts)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # numpy releases the GIL
        list(pool.map(column, range(k)))
    return signatures


def near_duplicates(
    sets: list[np.ndarray], threshold: float, bands: int = 16, rows_per_band: int = 4
) -> dict[int, int]:
    """Return {row: earlier row it nearly duplicates} by MinHash LSH, each pair checked exactly.

    16 bands of 4 hashes: a pair with Jaccard 0.8 becomes a candidate with probability 0.9998.
    """
    if len(sets) < 2:
        return {}
    lengths = np.array([len(s) for s in sets])
    signatures = minhash_signatures(
        np.concatenate(sets).astype(np.uint64), np.concatenate([[0], np.cumsum(lengths)[:-1]]), bands * rows_per_band
    )
    parent = list(range(len(sets)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    checked: set[tuple[int, int]] = set()
    as_set: dict[int, frozenset[int]] = {}

    def members_of(i: int) -> frozenset[int]:
        if i not in as_set:
            as_set[i] = frozenset(sets[i].tolist())
        return as_set[i]

    for b in range(bands):
        band = np.ascontiguousarray(signatures[:, b * rows_per_band : (b + 1) * rows_per_band])
        keys = band.view(np.dtype((np.void, band.dtype.itemsize * rows_per_band))).ravel()
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse] > 1)
        groups: dict[int, list[int]] = {}
        for i in shared.tolist():
            groups.setdefault(int(inverse[i]), []).append(i)
        for members in groups.values():
            head = members[0]
            for other in members[1:]:  # each member against the first: a star, not all pairs
                if (head, other) in checked or root(head) == root(other):
                    continue
                checked.add((head, other))
                a, b_ = members_of(head), members_of(other)
                if len(a & b_) / len(a | b_) >= threshold:
                    parent[root(other)] = root(head)
    clusters: dict[int, list[int]] = {}
    for i in range(len(sets)):
        clusters.setdefault(root(i), []).append(i)
    return {i: members[0] for members in clusters.values() for i in members[1:]}  # members ascend


def _duplicates(rows: _Rows, cfg) -> ContractResult:
    # Exact: the same words in the same order (case, spacing and punctuation aside).
    first_seen: dict[bytes, int] = {}
    exact: dict[int, int] = {}
    for i, (a, n) in enumerate(zip(rows.starts.tolist(), rows.lengths.tolist())):
        key = rows.words[a : a + n].tobytes()
        if key in first_seen:
            exact[i] = first_seen[key]
        else:
            first_seen[key] = i
    unique = [i for i in range(len(rows)) if i not in exact]
    hashes, owners = rows.ngrams(cfg.ngram)
    bounds = np.append(_groups(owners, len(rows)), len(owners))
    near = near_duplicates([hashes[bounds[i] : bounds[i + 1]] for i in unique], cfg.near_threshold)
    near = {unique[i]: unique[j] for i, j in near.items()}
    dupes = sorted({**exact, **near}.items())
    violated = not _allowed(len(dupes), len(rows), cfg.max_fraction)
    shown = [
        f"{rows.labels[i]} (≈{rows.labels[j]})" if i in near else f"{rows.labels[i]} (={rows.labels[j]})"
        for i, j in dupes[:SHOWN_ROWS]
    ]
    figure = (
        f"{len(exact)} exact and {len(near)} near duplicate rows (Jaccard ≥ {cfg.near_threshold} "
        f"over word {cfg.ngram}-grams) of {len(rows)}"
    )
    return ContractResult("duplicates", cfg.level, _verdict(cfg.level, violated), figure, len(dupes), shown)


TEMPLATE_SHARE = 0.5  # an n-gram in more than this share of the training rows is template, not content


def _template_ngrams(hashes: np.ndarray, owners: np.ndarray, rows: int) -> np.ndarray:
    """The n-grams that more than TEMPLATE_SHARE of `rows` rows contain: a shared instruction or form."""
    if rows < 10 or not len(hashes):
        return hashes[:0]
    order = np.lexsort((owners, hashes))
    h, o = hashes[order], owners[order]
    first = np.ones(len(h), dtype=bool)
    first[1:] = (h[1:] != h[:-1]) | (o[1:] != o[:-1])  # each (n-gram, row) pair once
    distinct, counts = np.unique(h[first], return_counts=True)
    return distinct[counts > TEMPLATE_SHARE * rows]


def _contamination(rows: _Rows, cfg) -> ContractResult:
    """Eval rows that share at least `threshold` of their word n-grams with the training rows, or
    whose question (every turn before the answer) a training row asks word for word.

    A template most training rows share (an instruction before each question) is no leak: the
    n-grams that touch its words are left out on both sides.
    """
    hashes, owners, firsts = rows.ngram_spans(cfg.ngram)
    template = _template_ngrams(
        hashes[~rows.is_eval[owners]], owners[~rows.is_eval[owners]], int((~rows.is_eval).sum())
    )
    if len(template):
        ends = np.minimum(firsts + cfg.ngram, rows.starts[owners] + rows.lengths[owners])
        marks = np.zeros(len(rows.words) + 1, dtype=np.int64)  # +1 / -1 at each template n-gram's span
        is_template = np.isin(hashes, template)
        np.add.at(marks, firsts[is_template], 1)
        np.add.at(marks, ends[is_template], -1)
        covered = np.concatenate([[0], np.cumsum(np.cumsum(marks)[:-1] > 0)])  # template words before i
        content = covered[ends] - covered[firsts] == 0
        hashes, owners = hashes[content], owners[content]
    in_eval = rows.is_eval[owners]
    train = np.sort(hashes[~in_eval])  # sorting beats numpy 2's hash-based unique/isin here by ~10x
    probe = hashes[in_eval]
    at = np.minimum(np.searchsorted(train, probe), max(len(train) - 1, 0))
    seen = train[at] == probe if len(train) else np.zeros(len(probe), dtype=bool)
    eval_rows = np.flatnonzero(rows.is_eval)
    per_row = np.bincount(owners[in_eval], minlength=len(rows))[eval_rows]
    shared = np.bincount(owners[in_eval], weights=seen, minlength=len(rows))[eval_rows]
    overlap = np.divide(shared, per_row, out=np.zeros(len(eval_rows)), where=per_row > 0) >= cfg.threshold
    asked = {rows.question(i) for i in np.flatnonzero(~rows.is_eval)}
    same_question = np.array([rows.question(i) in asked for i in eval_rows], dtype=bool)
    hits = eval_rows[overlap | same_question]
    figure = (
        f"{len(hits)} of {len(eval_rows)} eval rows share ≥ {cfg.threshold:.0%} of their word "
        f"{cfg.ngram}-grams with the training rows or ask a training row's question"
        + (
            f" (n-grams touching a template, {len(template)} n-grams most training rows share, left out)"
            if len(template)
            else ""
        )
    )
    return ContractResult(
        "contamination", cfg.level, _verdict(cfg.level, len(hits) > 0), figure, len(hits), rows.first(hits)
    )


def _pii(rows: _Rows, cfg) -> tuple[ContractResult, dict[int, list[dict[str, str]]]]:
    """Return the PII contract and, at level redact, the redacted conversations by row."""
    from tuneloop.safety import PiiScanner

    scanner = PiiScanner(cfg.entities)
    found = scanner.find(["\n".join(t["content"] for t in turns) for turns in rows.conversations])
    per_row = {i: set(entities) for i, entities in enumerate(found) if entities}
    counts = Counter(e for entities in per_row.values() for e in entities)
    kinds = ", ".join(f"{e} {n}" for e, n in counts.most_common()) or "none"
    figure = f"{len(per_row)} of {len(rows)} rows contain PII ({kinds})"
    offending = sorted(per_row)
    redacted: dict[int, list[dict[str, str]]] = {}
    if cfg.level == "redact" and per_row:
        for i in offending:
            turns = rows.conversations[i]
            new = scanner.redact([t["content"] for t in turns])
            redacted[i] = [{"role": t["role"], "content": c} for t, c in zip(turns, new)]
        return ContractResult(
            "pii", cfg.level, "redacted", figure + ": redacted before training", len(offending), rows.first(offending)
        ), redacted
    level = "warn" if cfg.level == "redact" else cfg.level
    violated = not _allowed(len(offending), len(rows), cfg.max_fraction)
    return ContractResult(
        "pii", cfg.level, _verdict(level, violated), figure, len(offending), rows.first(offending)
    ), redacted


def _toxicity(rows: _Rows, cfg) -> ContractResult:
    from tuneloop.safety import toxicity_probabilities

    probs = np.asarray(toxicity_probabilities([" ".join(t["content"] for t in turns) for turns in rows.conversations]))
    toxic = np.flatnonzero(probs >= cfg.threshold)
    rate = len(toxic) / max(len(rows), 1)
    violated = rate > cfg.max_fraction
    figure = (
        f"{len(toxic)} of {len(rows)} rows ({rate:.1%}) toxic (p ≥ {cfg.threshold}), at most {cfg.max_fraction:.1%}"
    )
    return ContractResult("toxicity", cfg.level, _verdict(cfg.level, violated), figure, len(toxic), rows.first(toxic))


HISTOGRAM_SAMPLE = 10_000  # rows whose exact token length the report's histogram shows


def _token_counts(
    renderer: Any, rows: _Rows, max_seq_len: int, min_trained: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return per row its token count and trained tokens after truncation, and the rows whose
    counts are exact for the histogram.

    Tokenizing is the cost of validation at scale (~100k short rows/10 s on 2 cores). With a
    byte-level tokenizer a row of at most max_seq_len UTF-8 bytes cannot be cut, and its
    assistant turns, end-of-turn marker included, all train: such rows are tokenized only
    when in the seeded histogram sample; their count stays an upper bound (bytes), their
    trained count `min_trained`, which is all the contracts read from them.
    """
    n = len(rows)
    sample = (
        np.arange(n)
        if n <= HISTOGRAM_SAMPLE
        else np.sort(np.random.default_rng(0).choice(n, HISTOGRAM_SAMPLE, replace=False))
    )
    if renderer.byte_level and min_trained <= 1:
        bound = renderer.bytes_bound(rows.conversations)
        exact = np.union1d(np.flatnonzero(bound > max_seq_len), sample)
        lengths, trained = bound.copy(), np.full(n, max(min_trained, 1), dtype=np.int64)
    else:
        exact = np.arange(n)
        lengths, trained = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    counted, counted_trained = renderer.measure(rows.conversations, max_seq_len, rows=exact)
    lengths[exact], trained[exact] = counted, counted_trained
    return lengths, trained, sample


def _off(name: str) -> ContractResult:
    return ContractResult(name, "off", "off", "not checked (level off)")


def run_contracts(
    data: SplitDataset, cfg: ValidationConfig, max_seq_len: int, tokenizer: Any
) -> tuple[list[ContractResult], SplitDataset, dict[str, Any]]:
    """Run every contract; return the results, the data (redacted where configured), and
    the token lengths and rendered example for the report."""
    from tuneloop.chat import ChatRenderer

    rows = _Rows(data)
    results: list[ContractResult] = []
    extras: dict[str, Any] = {"token_lengths": [], "example": [], "example_row": None}
    if not len(rows):
        return (
            [
                ContractResult(n, "off", "skipped", "no valid rows")
                for n in ("truncation", "loss_mask", "duplicates", "contamination", "pii", "toxicity")
            ],
            data,
            extras,
        )
    renderer = ChatRenderer(tokenizer)
    # Tokenizing runs in Rust without the GIL: it overlaps with the text contracts below.
    with ThreadPoolExecutor(max_workers=1) as pool:
        counting = pool.submit(_token_counts, renderer, rows, max_seq_len, cfg.loss_mask.min_tokens)
        text_results, data = _text_contracts(data, rows, cfg)
        lengths, trained, sample = counting.result()
    extras["token_lengths"] = lengths[sample].tolist()
    extras["token_sample"] = len(sample)
    t = cfg.truncation
    if t.level != "off":
        long = np.flatnonzero(lengths > max_seq_len)
        longest = f"longest {int(lengths.max())}" if len(long) else "none longer"
        figure = (
            f"{len(long)} of {len(rows)} examples longer than max_seq_len={max_seq_len} tokens "
            f"({longest}); their ends are cut"
        )
        results.append(
            ContractResult(
                "truncation",
                t.level,
                _verdict(t.level, not _allowed(len(long), len(rows), t.max_fraction)),
                figure,
                len(long),
                rows.first(long),
            )
        )
    else:
        results.append(_off("truncation"))
    m = cfg.loss_mask
    empty = np.flatnonzero(trained < m.min_tokens)
    if m.level != "off":
        median = f"median {int(np.median(trained[sample]))} trained tokens per example"
        figure = (
            f"{len(empty)} of {len(rows)} examples have fewer than {m.min_tokens} trained token(s) after "
            f"truncation ({median})"
        )
        results.append(
            ContractResult(
                "loss_mask", m.level, _verdict(m.level, len(empty) > 0), figure, len(empty), rows.first(empty)
            )
        )
    else:
        results.append(_off("loss_mask"))
    shown = int(empty[0]) if len(empty) else 0  # the example people should look at
    extras["example_row"] = rows.labels[shown]
    extras["example"] = renderer.segments(rows.conversations[shown], max_seq_len)
    return results + text_results, data, extras


def _text_contracts(
    data: SplitDataset, rows: _Rows, cfg: ValidationConfig
) -> tuple[list[ContractResult], SplitDataset]:
    """Run the contracts that read the texts, not the tokens; redact when configured."""
    results = [_duplicates(rows, cfg.duplicates) if cfg.duplicates.level != "off" else _off("duplicates")]
    has_eval = "eval" in rows.split
    results.append(
        _contamination(rows, cfg.contamination)
        if cfg.contamination.level != "off" and has_eval
        else _off("contamination")
    )
    if cfg.pii.level != "off":
        pii, redacted = _pii(rows, cfg.pii)
        results.append(pii)
        data = _apply_redactions(data, rows, redacted) if redacted else data
    else:
        results.append(_off("pii"))
    results.append(_toxicity(rows, cfg.toxicity) if cfg.toxicity.level != "off" else _off("toxicity"))
    return results, data  # token counts are of the rows as read (a redaction barely changes them)


def _apply_redactions(data: SplitDataset, rows: _Rows, redacted: dict[int, list[dict[str, str]]]) -> SplitDataset:
    by_label = {(rows.split[i], rows.labels[i]): turns for i, turns in redacted.items()}
    frames = {}
    for split, frame in (("train", data.train), ("eval", data.eval)):
        frame = frame.copy()
        for row in frame.index:
            turns = by_label.get((split, data.label(split, row)))
            if turns is not None:
                frame.at[row, MESSAGES] = turns
                frame.at[row, PROMPT] = next((t["content"] for t in reversed(turns) if t["role"] == "user"), None)
                frame.at[row, RESPONSE] = next(
                    (t["content"] for t in reversed(turns) if t["role"] == "assistant"), None
                )
        frames[split] = frame
    return replace(data, train=frames["train"], eval=frames["eval"])


# ---------------------------------------------------------------- the task and its report


@task(name="validate-dataset")
def validate_dataset(
    data: SplitDataset, cfg: ValidationConfig, max_seq_len: int, base: BaseRef, reports_dir: Path
) -> tuple[DatasetReport, SplitDataset]:
    """Validate both splits (suite, then contracts); write the HTML report; return it with the
    data to train on (PII redacted when configured). The caller decides what a failure stops."""
    return validate(data, cfg, max_seq_len, base, reports_dir)


def validate(
    data: SplitDataset,
    cfg: ValidationConfig,
    max_seq_len: int,
    base: BaseRef | None,
    reports_dir: Path | None,
    tokenizer: Any = None,
) -> tuple[DatasetReport, SplitDataset]:
    """Run the suite and the contracts; write the report into `reports_dir` when given."""
    docs_dir = reports_dir / "data-docs" if reports_dir is not None else None
    checks, docs = run_expectations(data, cfg, docs_dir)
    critical = [c for c in checks if not c.success and c.severity == "critical"]
    extras: dict[str, Any] = {}
    if critical:  # contracts read structurally valid rows: fix the table first
        contracts = [
            ContractResult(n, "off", "skipped", "not run: the expectations above failed")
            for n in ("truncation", "loss_mask", "duplicates", "contamination", "pii", "toxicity")
        ]
    else:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base.location, revision=base.revision)
        contracts, data, extras = run_contracts(data, cfg, max_seq_len, tokenizer)
    report = DatasetReport(
        data.source,
        data.eval_source,
        data.shape,
        len(data.train),
        len(data.eval),
        data.digest,
        checks,
        contracts,
        max_seq_len,
        data_docs=docs,
        **extras,
    )
    if reports_dir is not None:
        report.html = str(write_dataset_report(report, reports_dir / "dataset_report.html"))
    return report, data


_STATUS_COLOURS = {
    "pass": "#2e7d32",
    "warn": "#ef6c00",
    "fail": "#c62828",
    "redacted": "#1565c0",
    "off": "#757575",
    "skipped": "#757575",
}


def write_dataset_report(report: DatasetReport, out: Path) -> Path:
    """Write a self-contained HTML report: verdicts, offending rows, token lengths, a masked example."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from tuneloop.reports import png_base64

    images = []
    if report.token_lengths:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.hist(report.token_lengths, bins=min(50, max(5, len(set(report.token_lengths)))), color="#5c6bc0")
        ax.axvline(report.max_seq_len, color="#c62828", linestyle="--", label=f"max_seq_len={report.max_seq_len}")
        of = f"{report.token_sample:,} sampled rows" if report.token_sample < report.rows else "all rows"
        ax.set_xlabel(f"tokens per example (chat template applied; {of})")
        ax.set_ylabel("examples")
        ax.legend()
        images.append(png_base64(fig))
        plt.close(fig)
    esc = html.escape
    check_rows = "".join(
        f"<tr><td>{esc(c.name)}</td><td>{esc(c.column or '')}</td>"
        f"<td style='color:{_STATUS_COLOURS['pass' if c.success else 'fail' if c.severity == 'critical' else 'warn']}'>"
        f"{'pass' if c.success else 'FAIL' if c.severity == 'critical' else 'warn'}</td>"
        f"<td>{esc(c.detail)}</td><td>{esc(', '.join(c.rows))}</td></tr>"
        for c in report.checks
    )
    contract_rows = "".join(
        f"<tr><td>{esc(c.name)}</td><td>{esc(c.level)}</td>"
        f"<td style='color:{_STATUS_COLOURS.get(c.status, '#000')}'>{esc(c.status)}</td>"
        f"<td>{esc(c.figure)}</td><td>{esc(', '.join(c.rows))}</td></tr>"
        for c in report.contracts
    )
    styles = {
        "masked": "color:#888",
        "trained": "background:#c8e6c9",
        "cut": "background:#ffcdd2;text-decoration:line-through",
    }
    example = "".join(f"<span style='{styles[s]}'>{esc(t)}</span>" for t, s in report.example)
    verdict = "passed" if report.success else "FAILED"
    docs = f"<p>great-expectations Data Docs: <code>{esc(report.data_docs)}</code></p>" if report.data_docs else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Dataset report {esc(report.digest)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td,th{{border:1px solid #ddd;padding:4px 8px;
vertical-align:top}}table{{border-collapse:collapse}}
pre{{white-space:pre-wrap;border:1px solid #ddd;padding:1em}}</style>
</head><body><h1>Dataset report: validation {verdict}</h1>
<p>{esc(report.source)}{" + eval " + esc(report.eval_source) if report.eval_source else ""} ({esc(report.shape)}):
{report.train_rows} train rows, {report.eval_rows} eval rows, digest <code>{esc(report.digest)}</code></p>
<h2>LLM data contracts</h2><table><tr><th>contract</th><th>level</th><th>verdict</th><th>figure</th>
<th>first offending rows</th></tr>{contract_rows}</table>
<h2>great-expectations suite</h2><table><tr><th>expectation</th><th>field</th><th>verdict</th><th>detail</th>
<th>first offending rows</th></tr>{check_rows}</table>{docs}
<h2>Token lengths</h2>{"".join(f'<img src="data:image/png;base64,{i}">' for i in images)}
<h2>Row {esc(report.example_row or "")} as the trainer sees it</h2>
<p><span style="{styles["trained"]}">trained</span> (answer tokens in the loss) ·
<span style="{styles["masked"]}">masked</span> (prompt and template) ·
<span style="{styles["cut"]}">cut</span> (past max_seq_len)</p><pre>{example}</pre>
</body></html>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def report_markdown(report: DatasetReport, run_id: str | None = None) -> str:
    """Return the report as markdown for a Prefect artifact."""
    verdict = "passed" if report.success else "**FAILED**"
    lines = [
        f"## Dataset validation {verdict}",
        "",
        (f"`{report.source}`: {report.train_rows} train + {report.eval_rows} eval rows, digest `{report.digest}`"),
        "",
        Table(
            ["contract", "level", "verdict", "figure", "rows"],
            [[c.name, c.level, c.status, c.figure, ", ".join(c.rows)] for c in report.contracts],
        ).markdown(),
    ]
    failed = [c for c in report.checks if not c.success]
    if failed:
        lines += [
            "",
            Table(
                ["expectation", "field", "severity", "detail", "rows"],
                [[c.name, c.column or "", c.severity, c.detail, ", ".join(c.rows)] for c in failed],
            ).markdown(),
        ]
    else:
        lines += ["", f"All {len(report.checks)} great-expectations expectations passed."]
    where = f"artifact `validation/dataset_report.html` of MLflow run `{run_id}`" if run_id else f"`{report.html}`"
    lines += ["", f"HTML report (token lengths, masked example): {where}"]
    if report.data_docs:
        lines.append(f"Data Docs: `{report.data_docs}`")
    return "\n".join(lines)
