"""Model cards: rendered for an adapter, full weights and a derived version; promotion recorded in place."""

import datetime as dt

import pytest

from tasks.evaluate import EvalReport, GateVerdict, ModelEvaluation, PairedDifference
from tasks.modelcard import DESCRIPTION_LIMIT, ModelCard, promoted_section, with_promotion
from tasks.validation import DatasetReport
from tuneloop.config import load_config

LINEAGE = {
    "tuneloop.base_model": "builtin:tiny-llama",
    "tuneloop.base_sha256": "ab" * 32,
    "tuneloop.method": "lora",
    "tuneloop.train.steps": "5",
    "tuneloop.train.final_loss": "1.25",
    "tuneloop.train.started_from": "base",
    "tuneloop.trigger": "manual",
    "tuneloop.compared_with": "base tiny-llama",
    "tuneloop.validation_warnings": "2",
}


def card(kind: str = "adapter", lineage: dict | None = None, examples: int = 40) -> ModelCard:
    cfg = load_config(None, ["registry.intended_use=Answer arithmetic word problems for the demo."])
    reports = {
        "arithmetic": EvalReport(
            "candidate",
            {"token_f1": 0.61, "rougeL": 0.6, "toxicity_rate": 0.0, "pii_leak_rate": 0.0},
            [{}] * examples,
            {},
            "arithmetic@1",
        )
    }
    bias = {"gender": EvalReport("candidate", {"bias_gap": 0.21, "stereotype_score": 0.125}, [{}] * 12, {}, "")}
    comparison = [
        PairedDifference("token_f1", 0.43, 0.378, 0.485, "arithmetic"),
        PairedDifference("bias_gap", 0.01, -0.02, 0.04, "gender"),
    ]
    verdict = GateVerdict("passed", "passed: 3 of 3 rule checks held", [])
    report = DatasetReport("data/arith.jsonl", None, "prompt_response", 360, 40, "d1g3st", [], [], 256)
    return ModelCard.build(
        cfg,
        "3",
        kind,
        12_500_000,
        {**LINEAGE, **(lineage or {})},
        ModelEvaluation("candidate", reports, bias),
        comparison,
        verdict,
        report,
    )


@pytest.mark.parametrize(
    "kind, lineage, words",
    [
        ("adapter", {}, "LoRA adapter on `builtin:tiny-llama`"),
        ("full", {"tuneloop.method": "full"}, "fully fine-tuned weights"),
        ("adapter", {"tuneloop.derived_from": "2", "tuneloop.derivation": "int8"}, "derived from v2 (int8)"),
    ],
)
def test_a_card_renders_for_each_kind_of_version(kind, lineage, words) -> None:
    c = card(kind, lineage)
    text = c.description
    assert text.startswith("# tuneloop-chat v3") and words in text
    assert "**Gate: passed**" in text and "Answer arithmetic word problems" in text
    assert "| arithmetic | token_f1 | 0.61 | +0.430 [+0.378, +0.485] |" in text
    assert "- arithmetic: toxicity_rate 0, pii_leak_rate 0" in text
    assert "| gender | 0.21 | +0.010 [-0.020, +0.040] | 0.125 |" in text  # bias per category, paired
    assert "fewer than 100 examples" in text and "2 validation warnings" in text
    assert "## Promotion" in text and "Not promoted" in text
    assert "## Every figure" in c.markdown and "## Every figure" not in text  # details: the artifact only


def test_the_description_fits_the_registry_and_promotion_replaces_its_section() -> None:
    c = card()
    c.summary += [f"- line {i} " + "x" * 80 for i in range(100)]
    assert len(c.description) <= DESCRIPTION_LIMIT and "full card is model_card.md" in c.description
    section = promoted_section(
        "ops (key ops)", "hot-load + canary", "canary held", dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    )
    updated = with_promotion(card().description, section)
    assert updated.count("## Promotion") == 1 and "Not promoted" not in updated
    assert "Promoted to champion 2026-12-04 00:00 UTC by **ops (key ops)** (hot-load + canary)" in updated
    assert with_promotion("", section) == section
