"""Erasure and retention of what the loop keeps about the people who call the model.

    forget(cfg, key_id="team-a")           # one key's requests, everywhere they live
    forget(cfg, request_ids=["3f1c…"])     # one request
    expire(cfg)                            # rows past privacy.retention_days (each monitoring run)

A logged request lives in the inference log (its row, its feedback, its prompt's embedding)
and may have been copied into a retraining file (a JSONL row per approved request) and into
reports (the drift report quotes drifted prompts) under the state dir, including the copies
logged to MLflow's local artifact store. `forget` deletes the log rows through their owner
(tuneloop.inferencelog), drops the retraining rows that hold an erased prompt, replaces the
erased prompts in report files with "[erased]", and returns what it removed where. Copies
outside the state dir (a remote artifact store, a dataset a person exported) are not reached:
SECURITY.md says so.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task

from tuneloop.config import TuneloopConfig
from tuneloop.inferencelog import InferenceLog
from tuneloop.state import inference_db_url, state_paths

log = logging.getLogger(__name__)

ERASED = "[erased]"
MIN_QUOTED = 8  # shorter prompts ("hi") are not searched for inside reports: they would match other text
REPORT_SUFFIXES = (".html", ".md", ".txt", ".json")


@dataclass
class Erasure:
    requests: int = 0
    feedback: int = 0
    embeddings: int = 0
    retraining_rows: dict[str, int] = field(default_factory=dict)  # file -> rows dropped
    reports: dict[str, int] = field(default_factory=dict)  # file -> quotes replaced

    def lines(self) -> list[tuple[str, str]]:
        out = [
            ("inference log: requests", str(self.requests)),
            ("inference log: feedback", str(self.feedback)),
            ("inference log: prompt embeddings", str(self.embeddings)),
        ]
        out += [(f"retraining file {path}", f"{n} rows") for path, n in sorted(self.retraining_rows.items())]
        out += [(f"report {path}", f"{n} quotes") for path, n in sorted(self.reports.items())]
        return out


def forget(cfg: TuneloopConfig, key_id: str | None = None, request_ids: list[str] | None = None) -> Erasure:
    """Erase one key's requests (`key_id`) and/or these requests (`request_ids`) everywhere."""
    if key_id is None and not request_ids:
        raise ValueError("Say whose data to erase: a key id or request ids")
    ids = [r.split("-", 1)[1] if r.startswith(("chatcmpl-", "cmpl-")) else r for r in request_ids or []]
    store = InferenceLog(inference_db_url(cfg))
    try:
        removed = store.erase(ids, key_id)
    finally:
        store.close()
    return _scrub(cfg, removed)


@task(name="enforce-retention")
def expire(cfg: TuneloopConfig, now: dt.datetime | None = None) -> Erasure:
    """Delete what is older than `privacy.retention_days` (nothing when it is None)."""
    days = cfg.privacy.retention_days
    if days is None:
        return Erasure()
    before = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=days)
    store = InferenceLog(inference_db_url(cfg))
    try:
        removed = store.expire(before)
    finally:
        store.close()
    out = _scrub(cfg, removed)
    if out.requests or out.feedback:
        log.info("Retention (%d days): deleted %d requests, %d feedback rows", days, out.requests, out.feedback)
    return out


def _scrub(cfg: TuneloopConfig, removed: dict) -> Erasure:
    out = Erasure(removed["requests"], removed["feedback"], removed["embeddings"])
    prompts = {p for p in removed["prompts"] if p}
    if not prompts:
        return out
    paths = state_paths(cfg)
    for path in sorted(paths.retraining_data.glob("*.jsonl")) if paths.retraining_data.is_dir() else []:
        dropped = _drop_rows(path, prompts)
        if dropped:
            out.retraining_rows[str(path)] = dropped
    quoted = sorted((p for p in prompts if len(p) >= MIN_QUOTED), key=len, reverse=True)
    for root in (paths.reports, paths.mlflow_artifacts):
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            if path.is_file() and path.suffix in REPORT_SUFFIXES:
                n = _replace_quotes(path, quoted)
                if n:
                    out.reports[str(path)] = n
    return out


def _drop_rows(path: Path, prompts: set[str]) -> int:
    """Rewrite a JSONL file without the rows whose message contents hold an erased prompt."""
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            kept.append(line)
            continue
        contents = {m.get("content") for m in row.get("messages", []) if isinstance(m, dict)}
        contents |= {row.get("prompt"), row.get("response")}
        if contents & prompts:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.erasing")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(path)
    return dropped


def _replace_quotes(path: Path, prompts: list[str]) -> int:
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError):
        return 0
    n = 0
    for prompt in prompts:
        for form in {prompt, html.escape(prompt), json.dumps(prompt)[1:-1]}:
            if form in text:
                n += text.count(form)
                text = text.replace(form, ERASED)
    if n:
        tmp = path.with_name(f".{path.name}.erasing")
        tmp.write_text(text)
        tmp.replace(path)
    return n
