"""The gate's policy language: rules over evaluation metrics, parsed safely, evaluated per rule.

    rougeL >= champion.rougeL - 0.005
    toxicity_rate <= 0.01
    p95_latency_ms <= 1.2 * champion.p95_latency_ms

A rule is one comparison (`>=`, `<=`, `>`, `<`) of two arithmetic expressions (`+ - * /`,
parentheses, unary minus) over numbers, the candidate's metrics (bare names) and the
champion's (`champion.<metric>`; a bare `champion` stands for the champion's value of the
metric the rule is about, as in `rougeL >= champion - 0.005`). Rules are parsed by Python's
`ast` and walked node by node: nothing is ever evaluated as code, and anything else (calls,
other attributes, subscripts, `and`/`or`, chained comparisons) is a RuleError.

Config loading parses every rule and checks its metrics (tuneloop.config); the evaluate
stage turns the rules into a verdict, one RuleResult per rule.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

CHAMPION = "champion"
# Metrics are floats computed by different code paths (a mean over examples, a difference in
# a rule): a candidate exactly at a threshold must not fail on the last bit of rounding.
EPSILON = 1e-9

_COMPARISONS = {ast.GtE: ">=", ast.LtE: "<=", ast.Gt: ">", ast.Lt: "<"}
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class RuleError(ValueError):
    """A gate rule that is not in the policy language, or names a metric nobody computes."""


@dataclass(frozen=True)
class Rule:
    text: str
    left: ast.expr
    op: str  # one of >=, <=, >, <
    right: ast.expr
    candidate_metrics: frozenset[str]
    champion_metrics: frozenset[str]

    @property
    def metrics(self) -> frozenset[str]:
        return self.candidate_metrics | self.champion_metrics


@dataclass(frozen=True)
class RuleResult:
    rule: str
    outcome: Literal["pass", "fail", "skipped"]
    detail: str  # the values compared, or why the rule was skipped / could not hold

    def line(self) -> str:
        return f"{self.outcome.upper()}: {self.rule} ({self.detail})"


def _subject(left: ast.expr, right: ast.expr) -> str | None:
    """Return the metric a rule is about: the side that is a bare metric name, if exactly one is."""
    names = [side.id for side in (left, right) if isinstance(side, ast.Name) and side.id != CHAMPION]
    return names[0] if len(names) == 1 else None


def parse_rule(text: str) -> Rule:
    """Parse one rule; raise RuleError saying what is wrong and what is allowed."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        raise RuleError(f"gate rule {text!r} is not an expression: {err.msg}") from None
    if not isinstance(tree, ast.Compare) or len(tree.ops) != 1:
        raise RuleError(f"gate rule {text!r} must be one comparison, e.g. 'rougeL >= champion.rougeL - 0.01'")
    op = _COMPARISONS.get(type(tree.ops[0]))
    if op is None:
        raise RuleError(f"gate rule {text!r}: compare with one of {', '.join(_COMPARISONS.values())}")
    left, right = tree.left, tree.comparators[0]
    subject = _subject(left, right)
    candidate: set[str] = set()
    champion: set[str] = set()

    def check(node: ast.expr) -> None:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return
        if isinstance(node, ast.Name):
            if node.id != CHAMPION:
                candidate.add(node.id)
            elif subject is None:
                raise RuleError(f"gate rule {text!r}: a bare 'champion' needs one metric name on one side "
                                "of the comparison; write champion.<metric>")
            else:
                champion.add(subject)
            return
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == CHAMPION:
            champion.add(node.attr)
            return
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            check(node.left)
            check(node.right)
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            check(node.operand)
            return
        raise RuleError(f"gate rule {text!r}: {ast.unparse(node)!r} is not allowed; use numbers, metric "
                        "names, champion.<metric>, + - * / and parentheses")

    check(left)
    check(right)
    return Rule(text, left, op, right, frozenset(candidate), frozenset(champion))


def check_metrics(rule: Rule, evaluated: list[str], known: list[str]) -> None:
    """Raise RuleError if the rule names a metric that is unknown or not evaluated."""
    unknown = sorted(rule.metrics - set(known))
    if unknown:
        raise RuleError(f"gate rule {rule.text!r}: unknown metric {', '.join(unknown)}; "
                        f"known metrics: {', '.join(known)}")
    missing = sorted(rule.metrics - set(evaluated))
    if missing:
        raise RuleError(f"gate rule {rule.text!r}: metric {', '.join(missing)} is not evaluated with this "
                        f"config (evaluated: {', '.join(evaluated)}); add it to eval.metrics, or for "
                        "judge metrics set eval.judge.backend")


class _Undefined(Exception):
    """A value the rule needs is missing, not a number, or a division by zero."""


def _value(node: ast.expr, subject: str | None, candidate: Mapping[str, float],
           champion: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, (ast.Name, ast.Attribute)):
        if isinstance(node, ast.Name) and node.id != CHAMPION:
            side, name, values = "", node.id, candidate
        else:
            name = node.attr if isinstance(node, ast.Attribute) else subject
            side, values = "champion.", champion
        value = values.get(name)
        if value is None or math.isnan(value):
            raise _Undefined(f"{side}{name} is {'missing' if value is None else 'not a number'}")
        return float(value)
    if isinstance(node, ast.UnaryOp):
        value = _value(node.operand, subject, candidate, champion)
        return -value if isinstance(node.op, ast.USub) else value
    a = _value(node.left, subject, candidate, champion)
    b = _value(node.right, subject, candidate, champion)
    if isinstance(node.op, ast.Div) and b == 0:
        raise _Undefined(f"division by zero in {ast.unparse(node)}")
    return _OPERATORS[type(node.op)](a, b)


def _holds(a: float, op: str, b: float) -> bool:
    return {">=": a - b >= -EPSILON, "<=": b - a >= -EPSILON, ">": a - b > EPSILON, "<": b - a > EPSILON}[op]


def evaluate_rule(rule: Rule, candidate: Mapping[str, float], champion: Mapping[str, float] | None) -> RuleResult:
    """Return whether the rule holds for the candidate (against the champion, if there is one)."""
    if rule.champion_metrics and champion is None:
        return RuleResult(rule.text, "skipped", "no champion: skipped")
    subject = _subject(rule.left, rule.right)
    try:
        a = _value(rule.left, subject, candidate, champion or {})
        b = _value(rule.right, subject, candidate, champion or {})
    except _Undefined as err:
        return RuleResult(rule.text, "fail", f"cannot hold: {err}")
    names = [f"{m}={candidate[m]:.6g}" for m in sorted(rule.candidate_metrics)]
    names += [f"champion.{m}={champion[m]:.6g}" for m in sorted(rule.champion_metrics)] if champion else []
    holds = _holds(a, rule.op, b)
    return RuleResult(rule.text, "pass" if holds else "fail",
                      f"{', '.join(names)}: {a:.6g} {rule.op if holds else 'not ' + rule.op} {b:.6g}")
