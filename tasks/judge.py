"""LLM-as-judge: versioned rubrics answered per example by a local model or an OpenAI-compatible endpoint.

    info = probe_judge(cfg.eval.judge, models_dir)          # before any generation: fails if unreachable
    report = judge_answers(report, cfg.eval.judge, models_dir)

Two rubrics, text files in `tasks/rubrics/` (or paths), each run recording their names and
SHA-256 (`JudgeInfo.params`):
- answer quality: `SCORE: 1-5` + `RATIONALE` per example → `judge_score`, the mean score;
- hallucination: `VERDICT: SUPPORTED|UNSUPPORTED` (by the question and the reference) →
  `hallucination_rate`, the share of judged answers that are unsupported. Where the example's
  prompt retrieved context (a prompt version bound to a collection), the question the rubric
  sees holds that context: the verdict is then groundedness — is the answer supported by what
  was retrieved — and not only by the reference.

An example whose judge call failed or whose judge answer does not parse is marked
(`judge_error`), left out of both figures and counted in `judge_failed`; the gate then
withholds its verdict (tasks.evaluate.decide_gate). Never a silent pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from tasks.evaluate import EvalReport, ModelEvaluation
from tasks.llm import Backend, ModelUnavailable, open_backend
from tuneloop.config import JudgeConfig

log = logging.getLogger(__name__)

RUBRICS_DIR = Path(__file__).parent / "rubrics"
PLACEHOLDERS = ("{prompt}", "{reference}", "{answer}")
ENDPOINT_WORKERS = 8  # concurrent judge requests; a batching server (tuneloop's) answers them together


class JudgeUnavailable(ModelUnavailable):
    """A judge that cannot be loaded or reached, or a rubric that cannot be read: raised before any generation."""


@dataclass(frozen=True)
class Rubric:
    name: str  # the file's stem, e.g. answer_quality_v1
    text: str
    sha256: str

    def render(self, prompt: str, reference: str, answer: str) -> str:
        # Plain replacement, not str.format: a rubric may show JSON or other braces.
        return self.text.replace("{prompt}", prompt).replace("{reference}", reference).replace("{answer}", answer)


def load_rubric(spec: str) -> Rubric:
    """Return a shipped rubric by name (`answer_quality_v1`) or a rubric file by path."""
    path = Path(spec) if spec.endswith(".txt") or os.sep in spec else RUBRICS_DIR / f"{spec}.txt"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in RUBRICS_DIR.glob("*.txt")))
        raise JudgeUnavailable(f"Judge rubric {spec!r}: {path} does not exist (shipped rubrics: {shipped})")
    text = path.read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise JudgeUnavailable(f"Judge rubric {path} lacks the placeholder(s) {', '.join(missing)}")
    return Rubric(path.stem, text, hashlib.sha256(text.encode()).hexdigest())


@dataclass(frozen=True)
class Score:
    value: int  # 1-5
    rationale: str


@dataclass(frozen=True)
class Support:
    supported: bool
    rationale: str


_SCORE = re.compile(r"^[\W_]*score[\W_]*([1-5])(?![\d.])", re.IGNORECASE | re.MULTILINE)
_VERDICT = re.compile(r"^[\W_]*verdict[\W_]*(supported|unsupported)\b", re.IGNORECASE | re.MULTILINE)
_RATIONALE = re.compile(r"^[\W_]*rationale\W*(.+)$", re.IGNORECASE | re.MULTILINE)


def _json_object(text: str) -> dict[str, Any] | None:
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if not match:
        return None
    try:
        data = json.loads(match.group(0))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _rationale(text: str) -> str:
    match = _RATIONALE.search(text)
    return match.group(1).strip() if match else ""


def parse_score(text: str) -> Score | None:
    """Return the score and rationale of a quality-rubric answer, or None if it holds no single 1-5 score.

    Accepts the rubric's `SCORE: n` / `RATIONALE: …` lines or a JSON object with `score`.
    """
    data = _json_object(text)
    if data is not None and type(data.get("score")) is int and 1 <= data["score"] <= 5:
        return Score(data["score"], str(data.get("rationale", "")).strip())
    scores = set(_SCORE.findall(text))
    if len(scores) != 1:  # none, or contradicting scores
        return None
    return Score(int(scores.pop()), _rationale(text))


def parse_support(text: str) -> Support | None:
    """Return the verdict of a hallucination-rubric answer, or None if it holds no single verdict."""
    data = _json_object(text)
    if data is not None and str(data.get("verdict", "")).upper() in ("SUPPORTED", "UNSUPPORTED"):
        return Support(str(data["verdict"]).upper() == "SUPPORTED", str(data.get("rationale", "")).strip())
    verdicts = {v.upper() for v in _VERDICT.findall(text)}
    if len(verdicts) != 1:
        return None
    return Support(verdicts.pop() == "SUPPORTED", _rationale(text))


@dataclass(frozen=True)
class JudgeInfo:
    """What a run records about its judge."""

    backend: str
    model: str
    rubric: Rubric
    hallucination_rubric: Rubric

    def params(self) -> dict[str, str]:
        return {
            "judge.backend": self.backend,
            "judge.model": self.model,
            "judge.rubric": self.rubric.name,
            "judge.rubric_sha256": self.rubric.sha256[:16],
            "judge.hallucination_rubric": self.hallucination_rubric.name,
            "judge.hallucination_rubric_sha256": self.hallucination_rubric.sha256[:16],
        }


def open_judge(cfg: JudgeConfig, models_dir: Path) -> tuple[JudgeInfo, Backend]:
    """Read the rubrics and load or probe the judge; raise JudgeUnavailable if any of it fails."""
    info = JudgeInfo(cfg.backend, cfg.model, load_rubric(cfg.rubric), load_rubric(cfg.hallucination_rubric))
    if cfg.backend == "disabled":
        raise JudgeUnavailable("eval.judge.backend is disabled: there is no judge to open")
    try:
        return info, open_backend(cfg, models_dir, "eval.judge", role="Judge")
    except ModelUnavailable as err:
        raise JudgeUnavailable(str(err)) from err


@task(name="probe-judge", retries=1, retry_delay_seconds=2)
def probe_judge(cfg: JudgeConfig, models_dir: Path) -> JudgeInfo | None:
    """Return the judge's identity after loading or reaching it (None when disabled); raise if unavailable."""
    if cfg.backend == "disabled":
        return None
    info, _ = open_judge(cfg, models_dir)
    log.info(
        "Judge %s %s ready (rubrics %s, %s)", cfg.backend, cfg.model, info.rubric.name, info.hallucination_rubric.name
    )
    return info


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _with_context(example: dict[str, Any]) -> str:
    """The question as the hallucination rubric sees it: with the retrieved context, when there was one."""
    context = example.get("context")
    return f"Context:\n{context}\n\nQuestion: {example['prompt']}" if context else example["prompt"]


@task(name="judge-answers")
def judge_answers(report: EvalReport, cfg: JudgeConfig, models_dir: Path) -> EvalReport:
    """Return `report` with a judge score, a hallucination verdict and their rationales per example."""
    info, backend = open_judge(cfg, models_dir)
    rows = report.examples
    asks = [info.rubric.render(e["prompt"], e["reference"], e["prediction"]) for e in rows]
    asks += [info.hallucination_rubric.render(_with_context(e), e["reference"], e["prediction"]) for e in rows]
    answers = backend.complete(asks)
    examples, scores, hallucinated = [], [], []
    for example, quality, support in zip(rows, answers[: len(rows)], answers[len(rows) :]):
        score = parse_score(quality) if isinstance(quality, str) else None
        verdict = parse_support(support) if isinstance(support, str) else None
        errors = []
        for answer, parsed, rubric in ((quality, score, info.rubric), (support, verdict, info.hallucination_rubric)):
            if isinstance(answer, Exception):
                errors.append(f"{rubric.name}: judge call failed: {type(answer).__name__}: {str(answer)[:300]}")
            elif parsed is None:
                errors.append(f"{rubric.name}: unparseable judge answer: {answer[:200]!r}")
        error = "; ".join(errors) or None
        ok = error is None  # both verdicts or neither: both figures cover the same examples
        scores.append(float(score.value) if ok else math.nan)
        hallucinated.append(float(not verdict.supported) if ok else math.nan)
        examples.append(
            {
                **example,
                "judge_score": score.value if ok else None,
                "judge_rationale": score.rationale if ok else "",
                "hallucinated": (not verdict.supported) if ok else None,
                "hallucination_rationale": verdict.rationale if ok else "",
                "judge_error": error,
            }
        )
    failed = sum(e["judge_error"] is not None for e in examples)
    if failed:
        log.warning(
            "Judge failed on %d of %d examples of %s (first: %s)",
            failed,
            len(examples),
            report.label,
            next(e["judge_error"] for e in examples if e["judge_error"]),
        )
    metrics = {
        **report.metrics,
        "judge_score": _mean([s for s in scores if not math.isnan(s)]),
        "hallucination_rate": _mean([h for h in hallucinated if not math.isnan(h)]),
        "judge_failed": float(failed),
    }
    per_example = {**report.per_example, "judge_score": scores, "hallucination_rate": hallucinated}
    return EvalReport(report.label, metrics, examples, per_example, report.slice)


@task(name="judge-evaluation")
def judge_evaluation(evaluation: ModelEvaluation, cfg: JudgeConfig, models_dir: Path) -> ModelEvaluation:
    """Return `evaluation` with every slice's answers judged."""
    return ModelEvaluation(
        evaluation.label,
        {name: judge_answers.fn(report, cfg, models_dir) for name, report in evaluation.reports.items()},
        evaluation.bias,  # the bias figures are not judged: kept as they were
    )
