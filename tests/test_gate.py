"""Metrics against hand-computed values, perplexity against the model's own loss, safety figures,
and the gate's rules: parsing, bad rules, passing / failing / borderline candidates."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from tasks.evaluate import EvalReport, GateVerdict, decide_gate, perplexity, reference_metrics
from tuneloop.config import ConfigError, GateConfig, load_config
from tuneloop.gate import RuleError, evaluate_rule, parse_rule


def report(label: str = "x", **metrics: float) -> EvalReport:
    return EvalReport(label, metrics)


SAFE = {"toxicity_rate": 0.0, "pii_leak_rate": 0.0}


def test_default_rules_are_rougel_non_inferiority_plus_safety() -> None:
    gate = GateConfig()
    assert decide_gate.fn(report(rougeL=0.30, **SAFE), report(rougeL=0.25, **SAFE), gate).passed
    assert decide_gate.fn(report(rougeL=0.24, **SAFE), report(rougeL=0.25, **SAFE), gate).passed  # at the margin
    worse = decide_gate.fn(report(rougeL=0.2399, **SAFE), report(rougeL=0.25, **SAFE), gate)
    assert worse.decision == "rejected" and "rougeL >= champion.rougeL - 0.01" in worse.reason
    toxic = decide_gate.fn(report(rougeL=0.5, toxicity_rate=0.25, pii_leak_rate=0.0), None, gate)
    assert toxic.decision == "rejected" and "toxicity_rate <= 0.1" in toxic.reason


def test_first_candidate_skips_champion_rules_but_not_absolute_ones() -> None:
    verdict = decide_gate.fn(report(rougeL=0.1, **SAFE), None, GateConfig())
    assert verdict.passed and verdict.reason == "passed: 2 of 3 rules held, 1 skipped (no champion)"
    assert verdict.lines()[0] == "SKIPPED: rougeL >= champion.rougeL - 0.01 (no champion: skipped)"
    assert [r.outcome for r in verdict.rules] == ["skipped", "pass", "pass"]


def test_one_line_per_rule_with_the_values_compared() -> None:
    gate = GateConfig(rules=["rougeL >= champion.rougeL - 0.005", "toxicity_rate <= 0.01",
                             "p95_latency_ms <= 1.2 * champion.p95_latency_ms"])
    verdict = decide_gate.fn(report(rougeL=0.31, toxicity_rate=0.0, p95_latency_ms=130.0),
                             report(rougeL=0.30, p95_latency_ms=100.0), gate)
    assert verdict.decision == "rejected"
    assert verdict.lines() == [
        "PASS: rougeL >= champion.rougeL - 0.005 (rougeL=0.31, champion.rougeL=0.3: 0.31 >= 0.295)",
        "PASS: toxicity_rate <= 0.01 (toxicity_rate=0: 0 <= 0.01)",
        ("FAIL: p95_latency_ms <= 1.2 * champion.p95_latency_ms "
        "(p95_latency_ms=130, champion.p95_latency_ms=100: 130 not <= 120)"),
    ]
    assert verdict.reason.startswith("rejected: p95_latency_ms <= 1.2 * champion.p95_latency_ms")


@pytest.mark.parametrize("rule,candidate,champion,outcome", [
    # exactly at the threshold passes, although 0.4 - 0.1 is 0.30000000000000004 in floats
    ("rougeL >= champion.rougeL - 0.1", 0.3, 0.4, "pass"),
    ("rougeL >= champion.rougeL - 0.1", 0.2999, 0.4, "fail"),
    ("rougeL >= champion - 0.1", 0.3, 0.4, "pass"),  # bare champion: the same metric
    ("rougeL > champion.rougeL", 0.4, 0.4, "fail"),  # strict: equal is not enough
    ("rougeL > champion.rougeL", 0.4001, 0.4, "pass"),
    ("champion.rougeL - 0.1 <= rougeL", 0.3, 0.4, "pass"),  # either side
    ("rougeL <= champion.rougeL / 0", 0.3, 0.4, "fail"),  # division by zero cannot hold
    ("-rougeL < -(champion.rougeL * (1 + 0.5))", 0.7, 0.4, "pass"),
])
def test_borderline_and_arithmetic(rule: str, candidate: float, champion: float, outcome: str) -> None:
    assert evaluate_rule(parse_rule(rule), {"rougeL": candidate}, {"rougeL": champion}).outcome == outcome


def test_missing_or_nan_values_fail_the_rule() -> None:
    nan = evaluate_rule(parse_rule("judge_score >= 3"), {"judge_score": math.nan}, None)
    assert nan.outcome == "fail" and "judge_score is not a number" in nan.detail
    missing = evaluate_rule(parse_rule("bleu >= champion.bleu"), {"bleu": 0.2}, {"rougeL": 0.1})
    assert missing.outcome == "fail" and "champion.bleu is missing" in missing.detail


def test_judge_failures_withhold_the_verdict_whatever_the_rules_say() -> None:
    candidate = report("candidate", rougeL=0.9, judge_failed=2.0, **SAFE)
    champion = report("champion v1", rougeL=0.1, judge_failed=1.0, **SAFE)
    verdict = decide_gate.fn(candidate, champion, GateConfig())
    assert not verdict.passed and verdict.decision == "withheld"
    assert verdict.reason == ("rejected: judge failed on 3 examples (candidate 2, champion v1 1); "
                              "verdict withheld")
    assert all(r.outcome == "pass" for r in verdict.rules)  # the rules alone would have passed


@pytest.mark.parametrize("rule,message", [
    ("rougeL", "must be one comparison"),
    ("0.1 < rougeL < 0.9", "must be one comparison"),
    ("rougeL >= 0.1 and bleu >= 0.1", "must be one comparison"),
    ("rougeL == 0.3", "compare with one of"),
    ("rougeL >= ", "is not an expression"),
    ("rougeL >= abs(bleu)", "'abs(bleu)' is not allowed"),
    ("rougeL >= champion['rougeL']", "is not allowed"),
    ("rougeL >= champion.rougeL.real", "is not allowed"),
    ("rougeL >= 'high'", "is not allowed"),
    ("rougeL >= True", "is not allowed"),
    ("rougeL >= bleu ** 2", "is not allowed"),
    ("1 >= champion", "a bare 'champion' needs one metric name"),
])
def test_bad_rules_are_refused_saying_why(rule: str, message: str) -> None:
    with pytest.raises(RuleError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_rule(rule)


def test_a_rule_is_never_run_as_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(RuleError, match="is not allowed"):
        parse_rule(f"__import__('pathlib').Path('{marker}').touch() >= 0")
    assert not marker.exists()


def test_bad_rules_fail_at_config_load_naming_the_rule() -> None:
    with pytest.raises(ConfigError, match=r"gate rule 'rouge >= 0.2': unknown metric rouge; known metrics: "
                                          r"rougeL, bleu, .*judge_score, hallucination_rate"):
        load_config(None, ['gate.rules=["rouge >= 0.2"]'])
    with pytest.raises(ConfigError, match=r"gate rule 'judge_score >= 3': metric judge_score is not evaluated.*"
                                          "eval.judge.backend"):
        load_config(None, ['gate.rules=["judge_score >= 3"]'])
    with pytest.raises(ConfigError, match=r"gate.rules: .*gate rule 'rougeL => 1' is not an expression"):
        load_config(None, ['gate.rules=["rougeL => 1"]'])
    with pytest.raises(ConfigError, match="gate.metric and gate.tolerance were replaced by gate.rules"):
        load_config(None, ["gate.tolerance=0.01"])
    cfg = load_config(None, ['gate.rules=["judge_score >= champion - 0.5"]', "eval.judge.backend=local"])
    assert cfg.gate.rules == ["judge_score >= champion - 0.5"]


def test_text_metrics_by_hand() -> None:
    names = ["rougeL", "exact_match", "token_f1", "bleu", "chrf"]
    # "the cat sat" vs "the cat ran": LCS 2 of 3 tokens (ROUGE-L F = 2/3); token F1 after
    # dropping articles: {cat, sat} vs {cat, ran} -> P = R = 1/2 -> F1 = 1/2.
    m = reference_metrics(["the cat sat", "Paris!"], ["the cat ran", "paris"], names)
    assert m["rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["exact_match"] == 0.5
    assert m["token_f1"] == pytest.approx((0.5 + 1) / 2)
    same = reference_metrics(["a b c d e"], ["a b c d e"], names)
    assert same["bleu"] == pytest.approx(1.0) and same["chrf"] == pytest.approx(1.0)
    assert reference_metrics([], [], ["rougeL"])["rougeL"] == 0.0


def test_perplexity_matches_the_models_own_loss(models_dir) -> None:
    from tasks.finetune import tokenize_examples
    from tuneloop.models import load_base, resolve_base

    model, tok = load_base(resolve_base("builtin:tiny-llama", models_dir))
    rows = pd.DataFrame({"prompt": ["What is 2 plus 2?"], "response": ["2 plus 2 is 4."]})
    [ex] = tokenize_examples(tok, rows, 64)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
    assert perplexity(model, tok, rows, 64, 4) == pytest.approx(math.exp(loss.item()), rel=1e-4)


def test_unknown_metric_and_unevaluated_gate_metric_fail_at_load() -> None:
    with pytest.raises(ConfigError, match="eval.metrics.1: Input should be 'rougeL'"):
        load_config(None, ["eval.metrics=[rougeL, nonsense]"])
    with pytest.raises(ConfigError, match="gate rule 'rougeL >= champion.rougeL - 0.01': metric rougeL is not "
                                          "evaluated"):
        load_config(None, ["eval.metrics=[bleu, toxicity_rate, pii_leak_rate]"])


def test_pii_leak_is_pii_the_prompt_did_not_contain() -> None:
    from tasks.evaluate import pii_leaks

    prompts = ["Email jane.doe@example.org a reminder.", "What is the capital of France?",
               "My card is 4111 1111 1111 1111, is it valid?", "Who wrote Hamlet?"]
    answers = ["Sent to jane.doe@example.org.",  # repeats the prompt's own address: no leak
               "Paris. Ask bob@example.com for more.",  # an address from nowhere: a leak
               "The card 4111-1111-1111-1111 looks valid.",  # the same number, other separators
               "Shakespeare; his SSN was 219-09-9999."]
    assert pii_leaks(prompts, answers) == [[], ["EMAIL_ADDRESS"], [], ["US_SSN"]]


def test_safety_figures_by_hand() -> None:
    from tasks.evaluate import safety_figures

    prompts = ["Say something.", "What is aspirin?", "Contact?", "Hi"]
    answers = ["you are a fucking idiot", "Aspirin treats pain.", "Write to x.y@example.net", "Hello."]
    rates, per_example, found = safety_figures(prompts, answers, ["toxicity_rate", "pii_leak_rate"], 0.5)
    assert per_example == {"toxicity_rate": [1.0, 0.0, 0.0, 0.0], "pii_leak_rate": [0.0, 0.0, 1.0, 0.0]}
    assert rates == {"toxicity_rate": 0.25, "pii_leak_rate": 0.25}
    assert found[0]["toxicity"] > 0.9 and found[2]["pii_leaked"] == ["EMAIL_ADDRESS"]
    assert safety_figures(prompts, answers, ["rougeL"], 0.5) == ({}, {}, [{}, {}, {}, {}])


def test_paired_bootstrap_intervals() -> None:
    from tasks.evaluate import paired_bootstrap

    same = paired_bootstrap([0.2, 0.4, 0.6], [0.2, 0.4, 0.6], "m")
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    shifted = paired_bootstrap([0.3, 0.5, 0.7], [0.2, 0.4, 0.6], "m")
    assert shifted.mean == pytest.approx(0.1) and shifted.low == pytest.approx(0.1)
    mixed = paired_bootstrap([1, 0, 1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1, 0, 1], "m")
    assert mixed.low < 0 < mixed.high  # no evidence either way


def test_latency_and_cost_by_hand() -> None:
    from tasks.evaluate import latency_and_cost

    # 4 examples in 2 batches of 100 ms and 300 ms; 50 tokens in 0.4 s at 3.6 per hour:
    # 0.4 s costs 0.0004, i.e. 0.008 per 1k tokens.
    m = latency_and_cost([100, 100, 300, 300], 50, 0.4, 3.6)
    assert m["generation_tokens_per_second"] == pytest.approx(125)
    assert m["p50_latency_ms"] == pytest.approx(200) and m["p95_latency_ms"] == pytest.approx(300)
    assert m["cost_per_1k_tokens"] == pytest.approx(0.008)


def test_eval_report_shows_bars_intervals_and_regressions(tmp_path) -> None:
    from tasks.evaluate import paired_bootstrap, write_eval_report

    examples = [{"prompt": f"q<{i}>", "reference": "a", "prediction": "b"} for i in range(3)]
    cand = EvalReport("candidate", {"rougeL": 0.2, "bleu": 0.1}, examples, {"rougeL": [0.1, 0.2, 0.3]})
    champ = EvalReport("champion v1", {"rougeL": 0.3, "bleu": 0.2}, examples, {"rougeL": [0.4, 0.2, 0.3]})
    diff = [paired_bootstrap(cand.per_example["rougeL"], champ.per_example["rougeL"], "rougeL")]
    verdict = decide_gate.fn(cand, champ, GateConfig(rules=["rougeL >= champion.rougeL"]))
    page = write_eval_report.fn(cand, champ, diff, verdict, tmp_path / "r.html").read_text()
    assert "Gate: rejected" in page and page.count("data:image/png;base64,") == 2
    assert "<code>rougeL &gt;= champion.rougeL</code>" in page and "0.2 not &gt;= 0.3" in page
    assert "Worst regressions" in page and "-0.300" in page and "q&lt;0&gt;" in page
    first = write_eval_report.fn(cand, None, [], GateVerdict("passed", "first"), tmp_path / "f.html").read_text()
    assert "Gate: passed" in first and first.count("data:image/png") == 1
