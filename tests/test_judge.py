"""LLM-as-judge: parsing of judge answers, rubrics, a tiny local model as judge (garbage: every
example marked), and a real OpenAI-compatible endpoint on 127.0.0.1 (tests/judge_server.py)."""

import math
from pathlib import Path

import pytest

from tasks.evaluate import EvalReport, ModelEvaluation, decide_gate
from tasks.judge import (
    JudgeUnavailable,
    Score,
    Support,
    judge_answers,
    load_rubric,
    parse_score,
    parse_support,
    probe_judge,
)
from tests.judge_server import KEY, MODEL, free_port, judge_server
from tuneloop.config import GateConfig, JudgeConfig


@pytest.mark.parametrize(
    "text,expected",
    [
        ("SCORE: 4\nRATIONALE: matches the reference", Score(4, "matches the reference")),
        ("score = 5\nrationale - exact", Score(5, "exact")),
        ("**Score:** 3/5\n**Rationale:** partly right", Score(3, "partly right")),
        ('Here you go: {"score": 2, "rationale": "mostly wrong"}', Score(2, "mostly wrong")),
        ("SCORE: 1", Score(1, "")),  # a score without a rationale still counts
        ("SCORE: 7\nRATIONALE: too high", None),  # off the scale
        ("SCORE: 4.5", None),
        ("SCORE: 45", None),
        ("SCORE: 4\nSCORE: 2", None),  # contradicting
        ("The answer is good, I would say 4 out of 5.", None),  # no SCORE line
        ('{"score": true}', None),
        ("", None),
    ],
)
def test_parse_score(text: str, expected: Score | None) -> None:
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("VERDICT: SUPPORTED\nRATIONALE: all in the reference", Support(True, "all in the reference")),
        ("Verdict: unsupported\nRationale: invents a date", Support(False, "invents a date")),
        ('{"verdict": "UNSUPPORTED", "rationale": "wrong city"}', Support(False, "wrong city")),
        ("VERDICT: SUPPORTED\nVERDICT: UNSUPPORTED", None),
        ("VERDICT: MAYBE", None),
        ("It is supported.", None),
    ],
)
def test_parse_support(text: str, expected: Support | None) -> None:
    assert parse_support(text) == expected


def test_shipped_rubrics_are_versioned_files_with_every_placeholder(tmp_path: Path) -> None:
    quality, support = load_rubric("answer_quality_v1"), load_rubric("hallucination_v1")
    assert quality.name == "answer_quality_v1" and len(quality.sha256) == 64
    assert "SCORE:" in quality.text and "VERDICT:" in support.text
    rendered = quality.render("Q?", "REF", "ANS {json: 1}")
    assert "Q?" in rendered and "REF" in rendered and "ANS {json: 1}" in rendered and "{answer}" not in rendered
    with pytest.raises(JudgeUnavailable, match=r"answer_quality_v9.*shipped rubrics: answer_quality_v1"):
        load_rubric("answer_quality_v9")
    own = tmp_path / "mine_v1.txt"
    own.write_text("Grade {answer} for {prompt}.")
    with pytest.raises(JudgeUnavailable, match="lacks the placeholder"):
        load_rubric(str(own))


BASE = ModelEvaluation("base", {"d": EvalReport("base", {})})


def answers(*predictions: str) -> EvalReport:
    examples = [
        {"prompt": "What is the capital of France?", "reference": "The capital of France is Paris.", "prediction": p}
        for p in predictions
    ]
    return EvalReport(
        "candidate",
        {"rougeL": 0.5, "toxicity_rate": 0.0, "pii_leak_rate": 0.0},
        examples,
        {"rougeL": [0.5] * len(predictions)},
    )


def test_a_tiny_local_judge_answers_garbage_so_every_example_is_marked(models_dir: Path) -> None:
    cfg = JudgeConfig(backend="local", model="builtin:tiny-llama", max_new_tokens=12)
    assert probe_judge.fn(cfg, models_dir).rubric.name == "answer_quality_v1"
    judged = judge_answers.fn(answers("Paris.", "It is Lyon."), cfg, models_dir)
    assert judged.metrics["judge_failed"] == 2
    assert math.isnan(judged.metrics["judge_score"]) and math.isnan(judged.metrics["hallucination_rate"])
    assert all("unparseable judge answer" in e["judge_error"] and e["judge_score"] is None for e in judged.examples)
    verdict = decide_gate.fn(ModelEvaluation("candidate", {"d": judged}), BASE, [], GateConfig(), "d")
    assert verdict.decision == "withheld" and verdict.reason.startswith("rejected: judge failed on 2 examples")


def test_a_local_judge_that_cannot_load_fails_before_judging(tmp_path: Path) -> None:
    cfg = JudgeConfig(backend="local", model=str(tmp_path / "no-such-model"))
    with pytest.raises(JudgeUnavailable, match="Judge model .*no-such-model.* cannot be loaded"):
        probe_judge.fn(cfg, tmp_path)


def endpoint_cfg(base_url: str, **extra) -> JudgeConfig:
    return JudgeConfig(
        backend="openai", base_url=base_url, model=MODEL, api_key_env="TEST_JUDGE_KEY", timeout_s=10, **extra
    )


def test_an_openai_compatible_judge_scores_each_example(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with judge_server() as (url, requests):
        cfg = endpoint_cfg(url)
        info = probe_judge.fn(cfg, tmp_path)
        assert info.params()["judge.rubric"] == "answer_quality_v1"
        assert info.params()["judge.hallucination_rubric_sha256"] == load_rubric("hallucination_v1").sha256[:16]
        judged = judge_answers.fn(answers("Paris.", "It is Lyon.", "Paris, on the Seine."), cfg, tmp_path)
    assert judged.metrics["judge_failed"] == 0
    assert judged.metrics["judge_score"] == pytest.approx((4 + 2 + 4) / 3)
    assert judged.metrics["hallucination_rate"] == pytest.approx(1 / 3)
    assert judged.per_example["judge_score"] == [4.0, 2.0, 4.0]
    lyon = judged.examples[1]
    assert lyon["judge_score"] == 2 and lyon["hallucinated"] is True
    assert lyon["judge_rationale"] == "compared with the reference answer" and lyon["judge_error"] is None
    assert all(r["temperature"] == 0 for r in requests)
    assert any("It is Lyon." in r["messages"][0]["content"] for r in requests)  # the rubric, rendered


def test_a_judge_failing_mid_run_marks_those_examples_and_withholds_the_verdict(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with judge_server() as (url, _):
        judged = judge_answers.fn(answers("Paris.", "CRASH", "MUMBLE", "Paris!"), endpoint_cfg(url), tmp_path)
    assert judged.metrics["judge_failed"] == 2
    assert judged.metrics["judge_score"] == 4.0  # the two judged examples only
    crash, mumble = judged.examples[1], judged.examples[2]
    assert "judge call failed: HTTPStatusError" in crash["judge_error"] and "500" in crash["judge_error"]
    assert "unparseable judge answer: 'I think it is fine" in mumble["judge_error"]
    assert math.isnan(judged.per_example["judge_score"][1])
    verdict = decide_gate.fn(
        ModelEvaluation("candidate", {"d": judged}), BASE, [], GateConfig(rules=["judge_score >= 3"]), "d"
    )
    assert verdict.decision == "withheld" and "judge failed on 2 examples" in verdict.reason


def test_an_unreachable_or_refusing_endpoint_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(JudgeUnavailable, match=rf"Judge endpoint {closed}/chat/completions cannot be reached"):
        probe_judge.fn(endpoint_cfg(closed), tmp_path)
    with judge_server() as (url, _):
        with pytest.raises(JudgeUnavailable, match="answered HTTP 404"):
            probe_judge.fn(endpoint_cfg(url).model_copy(update={"model": "other"}), tmp_path)
        monkeypatch.setenv("TEST_JUDGE_KEY", "wrong")
        with pytest.raises(JudgeUnavailable, match="answered HTTP 401"):
            probe_judge.fn(endpoint_cfg(url), tmp_path)
    monkeypatch.delenv("TEST_JUDGE_KEY")
    with pytest.raises(JudgeUnavailable, match="TEST_JUDGE_KEY, which is not set"):
        probe_judge.fn(endpoint_cfg(closed), tmp_path)


def test_a_disabled_judge_probes_nothing(tmp_path: Path) -> None:
    assert probe_judge.fn(JudgeConfig(), tmp_path) is None


def test_with_retrieved_context_the_hallucination_rubric_checks_groundedness(monkeypatch, tmp_path: Path) -> None:
    """An answer to a retrieving prompt is judged against what was retrieved (and the reference);
    judging keeps the evaluation's bias figures as they were."""
    from tasks.judge import judge_evaluation

    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    report = answers("Paris.")
    report.examples[0]["context"] = "[1] Paris is the capital and largest city of France."
    evaluation = ModelEvaluation("candidate", {"geo": report}, {"gender": EvalReport("candidate", {"bias_gap": 0.1})})
    with judge_server() as (url, requests):
        judged = judge_evaluation.fn(evaluation, endpoint_cfg(url), tmp_path)
    verdict_asks = [r["messages"][0]["content"] for r in requests if "VERDICT:" in r["messages"][0]["content"]]
    assert verdict_asks and "Context:\n[1] Paris is the capital" in verdict_asks[0]
    assert "Question: What is the capital of France?" in verdict_asks[0]
    assert judged.reports["geo"].metrics["hallucination_rate"] == 0
    assert judged.bias["gender"].metrics["bias_gap"] == 0.1
