from pathlib import Path

from tuneloop.inferencelog import InferenceLog, InferenceRecord, LogWriter


def test_append_and_read_newest_first(tmp_path: Path) -> None:
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    for i in range(5):
        log.append(
            InferenceRecord(
                route="/v1/chat/completions",
                model="m",
                prompt=f"p{i}",
                status=200,
                model_version="1",
                response="r",
                prompt_tokens=3,
                completion_tokens=2,
                latency_ms=1.5,
            )
        )
    log.append(InferenceRecord(route="/v1/chat/completions", model="m", prompt="bad", status=503))
    assert log.count() == 6
    assert [r["prompt"] for r in log.window(limit=4)][1:] == ["p4", "p3", "p2"]
    assert [r["prompt"] for r in log.newest_served(1)] == ["bad"] and log.newest_served(1)[0]["status"] == 503
    assert [r["prompt"] for r in log.first_answers("1", 2)] == ["p0", "p1"]
    log.close()


def _record(prompt: str, **kw) -> InferenceRecord:
    return InferenceRecord(route="/v1/chat/completions", model="m", prompt=prompt, status=200, **kw)


def test_writer_batches_off_the_caller_and_redacts(tmp_path: Path) -> None:
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(log, redact=lambda texts: [t.replace("alice@example.com", "<EMAIL_ADDRESS>") for t in texts])
    for i in range(300):
        writer.submit(_record(f"mail alice@example.com {i}", response="ok alice@example.com"))
    assert writer.flush(10)
    assert log.count() == 300 and writer.written == 300
    rows = log.window(limit=300)
    assert all("alice@" not in r["prompt"] and "<EMAIL_ADDRESS>" in r["response"] for r in rows)
    writer.close()


def test_writer_keeps_rows_while_the_database_fails(tmp_path: Path) -> None:
    """A write that fails (here: the table dropped under the writer) is retried, not dropped."""
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    from tuneloop.inferencelog import inference_log

    inference_log.drop(log.engine)
    writer = LogWriter(log)
    writer.submit(_record("kept"))
    assert not writer.flush(0.5)
    assert writer.failures >= 1
    inference_log.create(log.engine)
    assert writer.flush(10)
    assert [r["prompt"] for r in log.window()] == ["kept"]
    writer.close()


def test_close_drains_the_queue(tmp_path: Path) -> None:
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(log, flush_interval_s=1.0)
    for i in range(10):
        writer.submit(_record(f"p{i}"))
    writer.close()
    assert log.count() == 10


def test_feedback_and_window_filters(tmp_path: Path) -> None:
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    a, b, s = _record("a", arm="champion"), _record("b", arm="challenger"), _record("b", arm="shadow")
    log.append_many([a, b, s])
    log.add_feedback(a.id, 1.0)
    log.add_feedback(a.id, 0.0)
    log.add_feedback(b.id, 1.0, "good")
    assert log.feedback_for([a.id, b.id, s.id]) == {a.id: 0.5, b.id: 1.0}
    assert {r["arm"] for r in log.window(arms=["champion", "challenger"])} == {"champion", "challenger"}
    assert log.get(b.id)["prompt"] == "b" and log.get("nope") is None


def test_older_logs_gain_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute(
        "CREATE TABLE inference_log (id VARCHAR(36) PRIMARY KEY, created_at DATETIME NOT NULL, "
        "route VARCHAR(64) NOT NULL, model VARCHAR(128) NOT NULL, model_version VARCHAR(32), "
        "prompt TEXT NOT NULL, response TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, "
        "latency_ms FLOAT, status INTEGER NOT NULL)"
    )
    con.commit()
    con.close()
    log = InferenceLog(f"sqlite:///{db}")
    log.append(_record("new", adapter="v2", arm="champion"))
    assert log.window()[0]["adapter"] == "v2"


def test_a_reused_request_id_gets_a_new_one_instead_of_blocking_the_log(tmp_path: Path) -> None:
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(log)
    first, again = _record("a"), _record("b")
    again.id = first.id
    writer.submit(first)
    assert writer.flush(10)
    writer.submit(again)
    writer.submit(_record("c"))
    assert writer.flush(10)
    assert sorted(r["prompt"] for r in log.window()) == ["a", "b", "c"]


def test_hostile_text_is_stored_escaped_and_the_rows_after_it_are_written(tmp_path: Path) -> None:
    """A lone surrogate or NUL once stopped the writer for good: every later row went unlogged."""
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(log)
    writer.submit(_record("lone \ud800 surrogate", response="nul \x00 byte", error="err \udfff"))
    writer.submit(_record("after"))
    assert writer.flush(10)
    rows = {r["prompt"]: r for r in log.window()}
    assert set(rows) == {"lone \\ud800 surrogate", "after"}
    assert rows["lone \\ud800 surrogate"]["response"] == "nul \\x00 byte"
    assert writer.stats() == {"written": 2, "pending": 0, "set_aside": 0, "retries": 0}
    writer.close()


def test_a_row_the_database_refuses_is_set_aside_and_counted(tmp_path: Path) -> None:
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(log)
    refused = _record("refused")
    refused.created_at = "not a time"  # SQLAlchemy's DateTime refuses it when binding the row
    writer.submit(_record("before"))
    writer.submit(refused)
    writer.submit(_record("after"))
    assert writer.flush(10)
    assert sorted(r["prompt"] for r in log.window()) == ["after", "before"]
    assert writer.set_aside == 1 and writer.rejected[0]["id"] == refused.id and writer.written == 2
    writer.submit(_record("later"))
    assert writer.flush(10) and log.count() == 3
    writer.close()


def test_a_row_the_redactor_cannot_read_is_set_aside_not_retried_forever(tmp_path: Path) -> None:
    def redact(texts: list[str]) -> list[str]:
        if any("boom" in t for t in texts):
            raise ValueError("the redactor cannot read this")
        return texts

    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(log, redact=redact)
    for prompt in ("a", "boom", "b"):
        writer.submit(_record(prompt))
    assert writer.flush(10)
    assert sorted(r["prompt"] for r in log.window()) == ["a", "b"] and writer.set_aside == 1
    writer.close()
