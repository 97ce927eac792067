"""Erasure and retention: one key's data goes from the log, its feedback and embeddings, the
retraining files and the reports; old rows go after privacy.retention_days."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
from typer.testing import CliRunner

from tasks.privacy import ERASED, expire, forget
from tests.conftest import make_config
from tuneloop.inferencelog import InferenceLog, InferenceRecord
from tuneloop.state import inference_db_url, state_paths


def _row(prompt: str, key: str, **kw) -> InferenceRecord:
    return InferenceRecord(route="/v1/chat/completions", model="m", prompt=prompt, status=200, key_id=key, **kw)


def _setup(tmp_path, models_dir):
    cfg = make_config(tmp_path / "home", models_dir)
    paths = state_paths(cfg).ensure()
    log = InferenceLog(inference_db_url(cfg))
    alice = [_row("Alice's question about her dosage", "alice"), _row("hi", "alice")]
    bob = [_row("Bob asks about the weather in Lyon", "bob")]
    for r in alice + bob:
        log.append(r)
    log.add_feedback(alice[0].id, 1.0, "great")
    log.add_feedback(bob[0].id, 0.0)
    log.add_embeddings([alice[0].id, bob[0].id], "e@128", np.ones((2, 4), dtype=np.float32))
    paths.retraining_data.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": "ok"}]}
        for r in alice + bob
    ]
    (paths.retraining_data / "ep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths.reports.mkdir(parents=True, exist_ok=True)
    (paths.reports / "drift-1.html").write_text(
        "<td>Alice&#x27;s question about her dosage</td><td>Bob asks about the weather in Lyon</td><td>hi there</td>"
    )
    return cfg, log, alice, bob


def test_forget_a_key_erases_its_data_everywhere_and_says_where(tmp_path, models_dir) -> None:
    cfg, log, alice, bob = _setup(tmp_path, models_dir)
    erased = forget(cfg, key_id="alice")
    assert (erased.requests, erased.feedback, erased.embeddings) == (2, 1, 1)
    assert [r["key_id"] for r in log.window()] == ["bob"]
    assert log.feedback_for([alice[0].id, bob[0].id]) == {bob[0].id: 0.0}
    assert log.missing_embeddings([alice[0].id, bob[0].id], "e@128") == [alice[0].id]
    paths = state_paths(cfg)
    kept = [json.loads(x) for x in (paths.retraining_data / "ep.jsonl").read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in kept] == [bob[0].prompt]
    assert erased.retraining_rows == {str(paths.retraining_data / "ep.jsonl"): 2}
    report = (paths.reports / "drift-1.html").read_text()
    assert "Alice" not in report and ERASED in report and "Lyon" in report
    assert "hi there" in report  # a short prompt ("hi") is not hunted inside other text
    assert ("inference log: requests", "2") in erased.lines()


def test_forget_one_request_by_its_response_id(tmp_path, models_dir) -> None:
    cfg, log, alice, _ = _setup(tmp_path, models_dir)
    erased = forget(cfg, request_ids=[f"chatcmpl-{alice[1].id}"])
    assert erased.requests == 1 and log.get(alice[1].id) is None and log.get(alice[0].id) is not None


def test_retention_deletes_only_what_is_older(tmp_path, models_dir) -> None:
    cfg, log, *_ = _setup(tmp_path, models_dir)
    old = _row("an old request from last year", "carol")
    old.created_at = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    log.append(old)
    erased = expire.fn(cfg)
    assert erased.requests == 1 and log.get(old.id) is None and log.count() == 3
    never = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"retention_days": None})})
    assert expire.fn(never).requests == 0


def test_cli_forget_prints_what_it_removed(tmp_path, models_dir) -> None:
    from tuneloop.cli import app

    cfg, *_ = _setup(tmp_path, models_dir)
    out = CliRunner().invoke(app, ["privacy", "forget", "--key", "bob", "--set", f"home={cfg.home}"])
    assert out.exit_code == 0, out.output
    assert "inference log: requests" in out.output and "retraining file" in out.output
    assert CliRunner().invoke(app, ["privacy", "forget"]).exit_code == 2
