from tasks.evaluate import EvalReport, decide_gate, rouge_l
from tuneloop.config import GateConfig


def report(value: float) -> EvalReport:
    return EvalReport("x", {"rougeL": value})


def test_first_candidate_wins_without_champion() -> None:
    verdict = decide_gate.fn(report(0.1), None, GateConfig())
    assert verdict.passed and "no champion" in verdict.reason


def test_better_worse_and_borderline() -> None:
    cfg = GateConfig(tolerance=0.01)
    assert decide_gate.fn(report(0.30), report(0.25), cfg).passed
    assert decide_gate.fn(report(0.24), report(0.25), cfg).passed  # exactly at the margin
    failed = decide_gate.fn(report(0.2399), report(0.25), cfg)
    assert not failed.passed and "0.2399 < champion 0.2500" in failed.reason


def test_rouge_l_by_hand() -> None:
    # LCS("the cat sat", "the cat ran") = 2 tokens: P = R = 2/3, F = 2/3.
    assert abs(rouge_l(["the cat sat"], ["the cat ran"]) - 2 / 3) < 1e-9
    assert rouge_l(["a b"], ["a b"]) == 1.0
    assert rouge_l([], []) == 0.0
