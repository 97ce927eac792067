"""Drift statistics on known distributions."""

import numpy as np

from tasks.drift import detect_drift, mmd_permutation_test


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


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


def test_verdicts() -> None:
    rng = np.random.default_rng(3)
    ref = unit(rng.normal(size=(60, 8)))
    drifted = detect_drift.fn(ref, unit(rng.normal(size=(20, 8)) + 2), "req-1", 10, 100, 0.01)
    assert drifted.verdict == "drift" and drifted.newest_request_id == "req-1"
    empty = detect_drift.fn(ref, np.zeros((0, 8)), None, 10, 100, 0.01)
    assert empty.verdict == "no_data" and empty.p_value is None and "0 requests" in empty.reason


def test_report_has_the_verdict_and_pictures(tmp_path) -> None:
    from tasks.drift import write_drift_report

    rng = np.random.default_rng(4)
    ref, cur = unit(rng.normal(size=(50, 8))), unit(rng.normal(size=(12, 8)) + 2)
    result = detect_drift.fn(ref, cur, "r", 10, 100, 0.01)
    path = write_drift_report.fn(ref, cur, [f"prompt <{i}>" for i in range(12)], result, tmp_path / "r.html")
    page = path.read_text()
    assert "Prompt drift: drift" in page and page.count("data:image/png;base64,") == 2
    assert "prompt &lt;" in page  # prompts are escaped

    empty = detect_drift.fn(ref, np.zeros((0, 8)), None, 10, 100, 0.01)
    page = write_drift_report.fn(ref, np.zeros((0, 8)), [], empty, tmp_path / "e.html").read_text()
    assert "no_data" in page and "data:image/png" not in page
