"""Every monitoring signal on known data: drifted vs not, empty windows, malformed log rows."""

import datetime as dt

import numpy as np
import pytest
from sqlalchemy import text

from tasks.drift import (
    LoggedRequest,
    MalformedRow,
    Reference,
    Window,
    compute_signals,
    cost_signal,
    distinct,
    drift_verdict,
    error_rate_signal,
    feedback_signal,
    guardrail_signal,
    latency_signal,
    mmd_permutation_test,
    new_vocabulary_signal,
    parse_row,
    prompt_embedding_signal,
    prompt_length_signal,
    prompt_version_signal,
    psi,
    read_launch_window,
    read_window,
    refusal_signal,
    response_length_signal,
    toxicity_signal,
)
from tuneloop.config import DEFAULT_REFUSAL_PATTERNS, MonitorConfig, MonitorThresholds
from tuneloop.inferencelog import InferenceLog, InferenceRecord

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LIMITS = MonitorThresholds()

TRIVIA = [f"who won the {y} world cup final in {c}" for y in range(1950, 2010, 4) for c in ("football", "cricket")]
HEALTH = [
    f"what are the side effects of {d} when taken with {e} every day for chronic pain relief in adults"
    for d in ("ibuprofen", "aspirin", "metformin", "warfarin", "lisinopril", "omeprazole")
    for e in ("alcohol", "grapefruit", "coffee", "antacids")
]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def request(
    i: int,
    prompt: str = "q",
    status: int = 200,
    response: str | None = "an answer",
    version: str = "1",
    latency: float | None = 100.0,
    minutes: float | None = None,
) -> LoggedRequest:
    return LoggedRequest(
        f"r{i:04d}",
        T0 + dt.timedelta(minutes=i if minutes is None else minutes),
        status,
        prompt,
        response,
        version,
        5,
        7,
        latency,
        None,
    )


# --------------------------------------------------------------------------- prompt embeddings


def test_same_distribution_is_not_drift() -> None:
    rng = np.random.default_rng(1)
    ref, cur = unit(rng.normal(size=(100, 16))), unit(rng.normal(size=(30, 16)))
    _, p = mmd_permutation_test(ref, cur, permutations=200)
    assert p > 0.05


def test_shifted_distribution_is_drift() -> None:
    rng = np.random.default_rng(2)
    ref = unit(rng.normal(size=(100, 16)))
    cur = unit(rng.normal(size=(30, 16)) + 1.5)
    stat, p = mmd_permutation_test(ref, cur, permutations=200)
    assert stat > 0 and p < 0.01
    assert p >= 1 / 201  # a permutation p-value is never 0


def test_the_exact_and_the_random_feature_tests_agree() -> None:
    """Large windows take the random-feature path: same verdicts, a close statistic."""
    rng = np.random.default_rng(3)
    ref, same, shifted = (unit(rng.normal(size=(300, 24)) + s) for s in (0, 0, 0.25))
    for cur, drifted in ((same, False), (shifted, True)):
        exact = mmd_permutation_test(ref, cur, 200)
        rff = mmd_permutation_test(ref, cur, 200, max_exact=10, features=4096)
        assert (exact[1] < 0.01) == (rff[1] < 0.01) == drifted
    assert rff[0] == pytest.approx(exact[0], rel=0.25)


def test_unbiased_mmd_matches_the_textbook_formula() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(9, 3)) + 0.5
    stat, _ = mmd_permutation_test(x, y, 10)
    z = np.concatenate([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    k = np.exp(-d2 / np.median(d2[np.triu_indices(21, 1)]))
    kxx, kyy, kxy = k[:12, :12], k[12:, 12:], k[:12, 12:]
    expected = (kxx.sum() - 12) / (12 * 11) + (kyy.sum() - 9) / (9 * 8) - 2 * kxy.mean()
    assert stat == pytest.approx(expected, rel=1e-4)


def test_embedding_signal_verdicts_and_no_data() -> None:
    rng = np.random.default_rng(5)
    ref = unit(rng.normal(size=(60, 8)))
    drifted = prompt_embedding_signal(ref, unit(rng.normal(size=(20, 8)) + 2), 10, 100, 0.01)
    assert drifted.verdict == "alert" and drifted.p_value < 0.01 and drifted.threshold == 0.01
    same = prompt_embedding_signal(ref, unit(rng.normal(size=(20, 8))), 10, 100, 0.01)
    assert same.verdict == "ok" and same.p_value >= 0.01
    empty = prompt_embedding_signal(ref, np.zeros((0, 8)), 10, 100, 0.01)
    assert empty.verdict == "no_data" and empty.p_value is None and "0 requests" in empty.detail


# --------------------------------------------------------------------------- prompt text


def test_prompt_length_drift() -> None:
    assert prompt_length_signal(TRIVIA, HEALTH, 10, 0.01).verdict == "alert"
    assert prompt_length_signal(TRIVIA, TRIVIA[::2], 10, 0.01).verdict == "ok"
    assert prompt_length_signal(TRIVIA, [], 10, 0.01).verdict == "no_data"


def test_psi_is_zero_for_the_same_sample_and_large_for_a_shift() -> None:
    a = np.arange(100, dtype=float)
    assert psi(a, a) == pytest.approx(0, abs=1e-9)
    assert psi(a, a + 60) > 1


def test_new_vocabulary_rate() -> None:
    drifted = new_vocabulary_signal(TRIVIA, HEALTH, 10, 0.01)
    assert drifted.verdict == "alert" and drifted.statistic > 0.5
    same = new_vocabulary_signal(TRIVIA, TRIVIA[1::2], 10, 0.01)
    assert same.verdict == "ok"
    assert new_vocabulary_signal(TRIVIA[:10], HEALTH, 10, 0.01).verdict == "no_data"  # reference too small to split


# --------------------------------------------------------------------------- outputs


def test_response_length_drift() -> None:
    short = [f"It is {i}." for i in range(30)]
    long = [f"The answer, explained at length, is {i} because of many reasons that follow here." for i in range(30)]
    assert response_length_signal(short, long, 10, 0.01).verdict == "alert"
    assert response_length_signal(short, short[::-1], 10, 0.01).verdict == "ok"
    assert response_length_signal(short, [], 10, 0.01).verdict == "no_data"


def test_refusal_rate() -> None:
    answers = ["Paris."] * 15 + ["I'm sorry, I cannot help with that."] * 5
    alert = refusal_signal(answers, DEFAULT_REFUSAL_PATTERNS, 0.2, 10, baseline=["Paris."] * 10)
    assert alert.verdict == "alert" and alert.statistic == pytest.approx(0.25) and alert.metrics["baseline_rate"] == 0
    assert refusal_signal(answers[:15] + answers[-2:], DEFAULT_REFUSAL_PATTERNS, 0.2, 10).verdict == "ok"
    assert refusal_signal([], DEFAULT_REFUSAL_PATTERNS, 0.2, 10).verdict == "no_data"


def test_toxicity_rate_with_the_packaged_classifier() -> None:
    clean = [f"The capital of country number {i} is a quiet city." for i in range(20)]
    toxic = clean[:10] + ["you are a stupid idiot and I hate you, shut up you moron"] * 10
    assert toxicity_signal(clean, LIMITS, 10).verdict == "ok"
    alert = toxicity_signal(toxic, LIMITS, 10)
    assert alert.verdict == "alert" and alert.statistic >= 0.4
    assert toxicity_signal([], LIMITS, 10).verdict == "no_data"


# --------------------------------------------------------------------------- operations and quality


def test_latency_against_the_slo() -> None:
    fast = [request(i, latency=100 + i) for i in range(40)]
    slow = fast[:30] + [request(40 + i, latency=9000) for i in range(10)]
    ok = latency_signal(fast, LIMITS, 10)
    assert ok.verdict == "ok" and ok.metrics["p50_ms"] == pytest.approx(119.5)
    alert = latency_signal(slow, LIMITS, 10)
    assert alert.verdict == "alert" and "p95" in alert.detail and alert.statistic > LIMITS.latency_p95_ms
    failed_only = [request(i, status=503, latency=None) for i in range(20)]
    assert latency_signal(failed_only, LIMITS, 10).verdict == "no_data"


def test_error_rate_counts_server_errors_only() -> None:
    rows = [request(i) for i in range(18)] + [request(18, status=503), request(19, status=422)]
    ok = error_rate_signal(rows, 0.1, 10)
    assert ok.verdict == "ok" and ok.statistic == pytest.approx(0.05) and ok.metrics["client_error_rate"] == 0.05
    assert error_rate_signal(rows, 0.01, 10).verdict == "alert"
    assert error_rate_signal([], 0.01, 10).verdict == "no_data"


def test_tokens_and_cost_per_version() -> None:
    rows = [request(i, version="1") for i in range(3)] + [request(3, version="2")]
    unpriced = cost_signal(rows, {})
    assert unpriced.statistic == 48 and unpriced.metrics == {"tokens_v1": 36, "tokens_v2": 12, "tokens": 48}
    priced = cost_signal(rows, {"2": 1.0, "*": 0.5})
    assert priced.metrics["cost_v1"] == pytest.approx(0.018) and priced.metrics["cost_v2"] == pytest.approx(0.012)
    assert priced.statistic == pytest.approx(0.030)
    assert cost_signal([], {}).verdict == "no_data"


def test_feedback_trend_per_version() -> None:
    rows = [request(i, version="1") for i in range(20)] + [request(20 + i, version="2") for i in range(20)]
    steady = {r.id: 0.8 for r in rows}
    falling = {**steady, **{r.id: 1.0 - i / 20 for i, r in enumerate(rows[20:])}}
    ok = feedback_signal(rows, steady, LIMITS, 0.01)
    assert ok.verdict == "ok" and ok.metrics["mean_v1"] == pytest.approx(0.8)
    alert = feedback_signal(rows, falling, LIMITS, 0.01)
    assert alert.verdict == "alert" and "v2 falling" in alert.detail and alert.metrics["slope_per_hour_v2"] < 0
    low = feedback_signal(rows, steady, LIMITS.model_copy(update={"min_feedback_score": 0.9}), 0.01)
    assert low.verdict == "alert" and "below 0.9" in low.detail
    assert feedback_signal(rows, {rows[0].id: 1.0}, LIMITS, 0.01).verdict == "no_data"


# --------------------------------------------------------------------------- the window as a whole


def test_an_empty_window_is_no_data_on_every_signal() -> None:
    cfg = MonitorConfig()
    rng = np.random.default_rng(6)
    reference = Reference(TRIVIA, unit(rng.normal(size=(len(TRIVIA), 8))), "test")
    window = Window([])
    signals = compute_signals.fn(reference, window, np.zeros((0, 8)), [], {}, cfg)
    assert {s.verdict for s in signals} == {"no_data"}
    drift = drift_verdict(signals, cfg.retrain_signals, len(TRIVIA), window)
    assert drift.verdict == "no_data" and drift.p_value is None and drift.newest_request_id is None


def test_the_drift_verdict_follows_the_retraining_signals() -> None:
    cfg = MonitorConfig()
    rng = np.random.default_rng(7)
    ref = unit(rng.normal(size=(60, 8)))
    window = Window([request(i, prompt=p) for i, p in enumerate(HEALTH)])
    signals = compute_signals.fn(
        Reference(TRIVIA, ref, "test"), window, unit(rng.normal(size=(24, 8)) + 2), [], {}, cfg
    )
    assert [s.name for s in signals] == [
        "prompt_embedding",
        "prompt_length",
        "new_vocabulary",
        "response_length",
        "refusal_rate",
        "toxicity_rate",
        "guardrail_rate",
        "latency",
        "error_rate",
        "cost",
        "feedback",
        "prompt_versions",
        "retrieval",
        "collections",
    ]
    drift = drift_verdict(signals, ["prompt_embedding"], 60, window)
    assert drift.verdict == "drift" and drift.p_value < 0.01 and drift.newest_request_id == "r0023"
    length_only = drift_verdict(signals, ["response_length"], 60, window)
    assert length_only.verdict == "no_data"  # no baseline answers: nothing to judge


def test_repeated_prompts_count_once() -> None:
    """A window that repeats its questions still shows the drift it has (traffic repeats, training data does not)."""
    cfg = MonitorConfig()
    rng = np.random.default_rng(8)
    centres = unit(rng.normal(size=(2, 16)))
    ref = unit(centres[0] + 0.3 * rng.normal(size=(80, 16)))
    fresh = unit(centres[0] + 0.3 * rng.normal(size=(20, 16)))
    new = unit(centres[1] + 0.3 * rng.normal(size=(12, 16)))
    pool = np.concatenate([fresh, new])
    picks = rng.choice(len(pool), 400)  # 400 requests, 32 distinct prompts asked again and again
    window = Window([request(i, prompt=f"prompt {k}") for i, k in enumerate(picks)])
    reference = Reference([f"ref {i}" for i in range(80)], ref, "test")
    signal = compute_signals.fn(reference, window, pool[picks], [], {}, cfg)[0]
    assert signal.verdict == "alert" and "32 distinct prompts of 400 outside the reference" in signal.detail
    prompts, rows = distinct(["a", "b", "a", "c"], np.eye(4), exclude={"c"})
    assert prompts == ["a", "b"] and rows.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]


def test_training_prompts_asked_again_are_not_evidence() -> None:
    """A window that replays reference prompts among new topics still shows the new topics."""
    cfg = MonitorConfig()
    rng = np.random.default_rng(9)
    centres = unit(rng.normal(size=(2, 16)))
    ref = unit(centres[0] + 0.3 * rng.normal(size=(80, 16)))
    new = unit(centres[1] + 0.3 * rng.normal(size=(12, 16)))
    cur = np.concatenate([ref[:60], new])  # 60 training prompts asked again, 12 new ones
    names = [f"ref {i}" for i in range(80)]
    window = Window([request(i, prompt=p) for i, p in enumerate(names[:60] + [f"new {i}" for i in range(12)])])
    signal = compute_signals.fn(Reference(names, ref, "test"), window, cur, [], {}, cfg)[0]
    assert signal.verdict == "alert" and "12 distinct prompts of 72" in signal.detail
    replay = Window([request(i, prompt=p) for i, p in enumerate(names[:60])])
    assert compute_signals.fn(Reference(names, ref, "test"), replay, ref[:60], [], {}, cfg)[0].verdict == "no_data"


# --------------------------------------------------------------------------- reading the log


def test_malformed_rows_are_skipped_and_counted(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = InferenceLog(url)
    log.append_many(
        [
            InferenceRecord(
                route="/v1/chat/completions",
                model="m",
                prompt=f"p{i}",
                status=200,
                response="a",
                latency_ms=5.0,
                model_version="1",
                created_at=T0 + dt.timedelta(seconds=i),
            )
            for i in range(6)
        ]
    )
    with log.engine.begin() as conn:  # rows another writer (or a bug) left behind
        for rid, created, status, prompt, latency in [
            ("bad-time", "yesterday", 200, "p", 1.0),
            ("bad-status", "2026-01-01 00:00:10", "ok", "p", 1.0),
            ("no-prompt", "2026-01-01 00:00:11", 200, "", 1.0),
            ("bad-latency", "2026-01-01 00:00:12", 200, "p", "x"),
            ("neg-latency", "2026-01-01 00:00:13", 200, "p", -3.0),
        ]:
            conn.execute(
                text(
                    "INSERT INTO inference_log (id, created_at, route, model, prompt, status, latency_ms) "
                    "VALUES (:i, :c, 'r', 'm', :p, :s, :l)"
                ),
                {"i": rid, "c": created, "p": prompt, "s": status, "l": latency},
            )
    log.close()
    window = read_window.fn(url, 100)
    assert [r.prompt for r in window.requests] == [f"p{i}" for i in range(6)]  # oldest first
    assert window.skipped_total == 5
    assert window.skipped == {
        "created_at not a timestamp": 1,
        "status not a number": 1,
        "prompt empty or not text": 1,
        "latency_ms not a number": 1,
        "latency_ms negative or not finite": 1,
    }
    assert window.window_id.endswith("-" + window.requests[-1].id)
    newest = read_window.fn(url, 8)  # the 5 bad rows are the newest: they use up 5 of the 8 places
    assert [r.prompt for r in newest.requests] == ["p3", "p4", "p5"] and newest.skipped_total == 5
    launch = read_launch_window.fn(url, "1", 3, ["r-none"])
    assert [r.prompt for r in launch] == ["p0", "p1", "p2"]


def test_an_empty_log_reads_as_an_empty_window(tmp_path) -> None:
    window = read_window.fn(f"sqlite:///{tmp_path / 'log.db'}", 50)
    assert window.requests == [] and window.window_id is None and window.skipped_total == 0


def test_parse_row_names_what_is_wrong() -> None:
    good = {"id": "a", "created_at": "2026-01-01 00:00:00", "status": 200, "prompt": "hi", "prompt_tokens": "3"}
    assert parse_row(good).prompt_tokens == 3 and parse_row(good).created_at.tzinfo is not None
    with pytest.raises(MalformedRow, match="prompt_tokens not a count"):
        parse_row({**good, "prompt_tokens": 2.5})
    with pytest.raises(MalformedRow, match="id missing"):
        parse_row({**good, "id": None})
    assert parse_row({**good, "status": 500, "prompt": ""}).status == 500  # a failed request may have no prompt


def test_guardrail_signal_alerts_on_the_version_whose_answers_get_blocked() -> None:
    import dataclasses

    def acted(i: int, version: str, action: str | None) -> LoggedRequest:
        return dataclasses.replace(request(i, version=version), guardrail=action)

    rows = [acted(i, "1", "pii_redacted" if i % 5 == 0 else None) for i in range(20)]
    rows += [acted(20 + i, "2", "toxicity_blocked" if i % 4 == 0 else None) for i in range(20)]
    signal = guardrail_signal(rows, 0.05, 10)
    assert signal.verdict == "alert" and signal.statistic == pytest.approx(5 / 40)
    assert signal.metrics["blocked_v1"] == 0 and signal.metrics["redacted_v1"] == pytest.approx(0.2)
    assert signal.metrics["blocked_v2"] == pytest.approx(0.25) and "v2 above it" in signal.detail
    assert guardrail_signal(rows[:20], 0.05, 10).verdict == "ok"
    assert guardrail_signal(rows[:3], 0.05, 10).verdict == "no_data"
    # a row written before the column existed, or with something odd in it, counts as nothing done
    assert parse_row({"id": "x", "status": 200, "prompt": "p", "created_at": T0, "guardrail": 7}).guardrail is None


def test_every_figure_is_reported_per_prompt_version() -> None:
    import dataclasses

    rows = [
        dataclasses.replace(request(i, response="I'm sorry, I cannot." if i < 2 else "Paris"), prompt_version="s/1")
        for i in range(10)
    ]
    rows += [dataclasses.replace(request(10 + i, status=503, response=None), prompt_version="s/2") for i in range(2)]
    rows += [request(20)]  # the completions route: no prompt
    signal = prompt_version_signal(rows, {"r0000": 1.0, "r0001": 0.0}, DEFAULT_REFUSAL_PATTERNS, 5)
    assert signal.verdict == "ok" and signal.statistic == 3
    assert signal.metrics["refusal_rate_s_1"] == pytest.approx(0.2) and signal.metrics["feedback_s_1"] == 0.5
    assert signal.metrics["error_rate_s_2"] == 1.0 and signal.metrics["requests_none"] == 1
    assert "s/2: 2 requests (few)" in signal.detail
    assert prompt_version_signal([], {}, [], 5).verdict == "no_data"


def test_retrieval_signal_counts_questions_the_collection_cannot_answer() -> None:
    import dataclasses
    import json

    from tasks.drift import collections_signal, retrieval_signal

    def retrieved(i: int, best: float, prompt: str = "rag/1") -> LoggedRequest:
        hits = json.dumps([{"id": f"c{i}", "source": "a.md", "position": 0, "score": best}])
        return dataclasses.replace(parse_row({**vars(request(i)), "retrieved": hits}), prompt_version=prompt)

    limits = MonitorThresholds()  # best chunk under 0.3: unanswerable; alert above 25%
    rows = [retrieved(i, 0.7) for i in range(15)] + [retrieved(15 + i, 0.1) for i in range(5)]
    rows += [request(40 + i) for i in range(5)]  # requests of a route that does not retrieve
    signal = retrieval_signal(rows, limits, 10)
    assert signal.verdict == "ok" and signal.statistic == pytest.approx(0.25) and "of 20 retrieving" in signal.detail
    worse = rows + [retrieved(60 + i, 0.05, "rag/2") for i in range(10)]
    signal = retrieval_signal(worse, limits, 10)
    assert signal.verdict == "alert" and signal.metrics["unanswerable_rag/2"] == 1
    assert retrieval_signal(rows[:5], limits, 10).verdict == "no_data"
    # Queries drifting from the collection: best scores fall, few yet under the threshold
    rng = np.random.default_rng(0)
    launch = [retrieved(100 + i, float(rng.uniform(0.55, 0.8))) for i in range(30)]
    same = [retrieved(200 + i, float(rng.uniform(0.55, 0.8))) for i in range(30)]
    drifted = [retrieved(300 + i, float(rng.uniform(0.32, 0.6))) for i in range(30)]
    held = retrieval_signal(same, limits, 10, launch)
    assert held.verdict == "ok" and held.p_value is not None and held.p_value > 0.01
    moved = retrieval_signal(drifted, limits, 10, launch)
    assert moved.statistic == 0 and moved.verdict == "alert" and moved.p_value < 0.01
    assert "the questions moved away from the documents" in moved.detail
    assert "too few to test a shift" in retrieval_signal(drifted, limits, 10, launch[:3]).detail
    assert parse_row({**vars(request(1)), "retrieved": "not json"}).retrieved is None
    stale = collections_signal(
        {"handbook": {"added": 1, "updated": 2, "removed": 0}, "faq": dict.fromkeys(("added", "updated", "removed"), 0)}
    )
    assert (
        stale.verdict == "alert" and "handbook: 1 chunks new, 2 changed" in stale.detail and "faq" not in stale.detail
    )
    assert collections_signal(None).verdict == "no_data"
    down = collections_signal("collection server db:5432/team: connection refused")
    assert (
        down.verdict == "alert"
        and down.detail == "collections not checked: collection server db:5432/team: connection refused"
    )
