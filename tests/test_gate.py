"""Metrics against hand-computed values, perplexity against the model's own loss, the gate."""

import math

import pandas as pd
import pytest
import torch

from tasks.evaluate import EvalReport, decide_gate, perplexity, reference_metrics
from tuneloop.config import ConfigError, GateConfig, load_config


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
    with pytest.raises(ConfigError, match="eval.metrics"):
        load_config(None, ["eval.metrics=[rougeL, nonsense]"])
    with pytest.raises(ConfigError, match="gate.metric"):
        load_config(None, ["eval.metrics=[bleu]"])


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
    from tasks.evaluate import GateVerdict, paired_bootstrap, write_eval_report

    examples = [{"prompt": f"q<{i}>", "reference": "a", "prediction": "b"} for i in range(3)]
    cand = EvalReport("candidate", {"rougeL": 0.2, "bleu": 0.1}, examples, {"rougeL": [0.1, 0.2, 0.3]})
    champ = EvalReport("champion v1", {"rougeL": 0.3, "bleu": 0.2}, examples, {"rougeL": [0.4, 0.2, 0.3]})
    diff = [paired_bootstrap(cand.per_example["rougeL"], champ.per_example["rougeL"], "rougeL")]
    page = write_eval_report.fn(cand, champ, diff, GateVerdict(False, "worse"), tmp_path / "r.html").read_text()
    assert "Gate: rejected" in page and page.count("data:image/png;base64,") == 2
    assert "Worst regressions" in page and "-0.300" in page and "q&lt;0&gt;" in page
    first = write_eval_report.fn(cand, None, [], GateVerdict(True, "first"), tmp_path / "f.html").read_text()
    assert "Gate: passed" in first and first.count("data:image/png") == 1
