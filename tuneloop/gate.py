"""The gate's policy language: rules over evaluation metrics per slice, and paired intervals.

    token_f1[trivia] >= champion.token_f1[trivia] - 0.02     # no forgetting on the trivia slice
    ci_low(token_f1[new] - champion) > 0                      # better than the champion, with confidence
    token_f1[old] >= champion - 0.02                          # ... and no worse on every earlier slice
    toxicity_rate[all] <= 0.1
    p95_latency_ms <= 1.2 * champion.p95_latency_ms

A rule is one comparison (`>=`, `<=`, `>`, `<`) of two arithmetic expressions (`+ - * /`,
parentheses, unary minus) over numbers and metric terms:
- `metric[slice]`: the candidate's figure on a slice; a bare `metric` is on its own slice (`new`);
- `champion.metric[slice]`: the champion's on the same examples (the base model while no version
  is champion); a bare `champion` is the champion's value of the metric the rule is about;
- `ci_low(m[s] - champion)` / `ci_high(...)`: a bound of the paired 95% interval of the candidate's
  gain over the champion on that slice (metrics scored per example: rougeL, exact_match, token_f1,
  the safety and judge rates).
A slice is a name (`trivia`), `new` (the slice of the candidate's own training data), `old`
(every other slice evaluated) or `all`; a rule over `old` or `all` holds when it holds on each of
those slices, and gives one result per slice. Metrics measured per group rather than per slice
(the bias figures: `bias_gap[gender]`) name a category where others name a slice, and `all` is
every category measured.

Rules are parsed by Python's `ast` and walked node by node: nothing is ever evaluated as code,
and anything else (other calls or attributes, `and`/`or`, chained comparisons) is a RuleError.
Config loading parses every rule and checks its metrics and named slices (tuneloop.config); the
evaluate stage turns the rules into a verdict, one RuleResult per rule and slice.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

CHAMPION = "champion"
NEW, OLD, ALL = "new", "old", "all"
SELECTORS = (NEW, OLD, ALL)
BOUNDS = {"ci_low": 0, "ci_high": 1}
# Metrics are floats computed by different code paths (a mean over examples, a difference in
# a rule): a candidate exactly at a threshold must not fail on the last bit of rounding.
EPSILON = 1e-9

_COMPARISONS = {ast.GtE: ">=", ast.LtE: "<=", ast.Gt: ">", ast.Lt: "<"}
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

Key = tuple[str, str]  # (metric, slice)


class RuleError(ValueError):
    """A gate rule that is not in the policy language, or names a metric or slice nobody computes."""


@dataclass(frozen=True)
class Term:
    """A metric reference in a rule: whose figure, which metric, on which slice (name or selector)."""

    side: Literal["candidate", "champion"]
    metric: str
    slice: str


@dataclass(frozen=True)
class Rule:
    text: str
    left: ast.expr
    op: str  # one of >=, <=, >, <
    right: ast.expr
    terms: frozenset[Term]
    intervals: frozenset[tuple[str, str]]  # (metric, slice) whose paired interval the rule reads

    @property
    def metrics(self) -> frozenset[str]:
        return self.candidate_metrics | self.champion_metrics

    @property
    def candidate_metrics(self) -> frozenset[str]:
        return frozenset(t.metric for t in self.terms if t.side == "candidate") | {m for m, _ in self.intervals}

    @property
    def champion_metrics(self) -> frozenset[str]:  # an interval is of the gain over the champion
        return frozenset(t.metric for t in self.terms if t.side == CHAMPION) | {m for m, _ in self.intervals}

    @property
    def slices(self) -> frozenset[str]:
        """Every slice the rule names (selectors included)."""
        return frozenset(t.slice for t in self.terms) | frozenset(s for _, s in self.intervals)


@dataclass(frozen=True)
class RuleResult:
    rule: str  # the rule as written, or one slice of it ("token_f1[trivia] >= …" for a rule over `old`)
    outcome: Literal["pass", "fail", "skipped"]
    detail: str  # the values compared, or why the rule was skipped / could not hold
    slice: str | None = None

    def line(self) -> str:
        return f"{self.outcome.upper()}: {self.rule} ({self.detail})"


@dataclass(frozen=True)
class Figures:
    """What rules read: the candidate's and the champion's figures per (metric, slice), and the paired
    interval (low, high) of candidate − champion per (metric, slice)."""

    candidate: Mapping[Key, float]
    champion: Mapping[Key, float] | None
    new: str  # the candidate's own slice ("" where there are no slices, e.g. a canary window)
    slices: Sequence[str] = ()
    intervals: Mapping[Key, tuple[float, float]] = field(default_factory=dict)
    categories: Sequence[str] = ()  # the groups measured, for metrics keyed by group (`all` of those)
    category_metrics: frozenset[str] = frozenset()

    @classmethod
    def flat(cls, candidate: Mapping[str, float], champion: Mapping[str, float] | None) -> Figures:
        """Figures without slices (one scope), e.g. the two arms of a canary."""
        return cls(
            {(k, ""): v for k, v in candidate.items()},
            {(k, ""): v for k, v in champion.items()} if champion is not None else None,
            "",
            [""],
        )


# --------------------------------------------------------------------------- parsing


def _metric_term(node: ast.expr) -> tuple[str, str, str] | None:
    """(side, metric, slice) of a metric term, or None if the node is not one."""
    slice_name = NEW
    if isinstance(node, ast.Subscript):
        if not isinstance(node.slice, ast.Name):
            raise RuleError(f"{ast.unparse(node)!r}: a slice is a name, e.g. token_f1[trivia] or token_f1[old]")
        slice_name, node = node.slice.id, node.value
    if isinstance(node, ast.Name) and node.id != CHAMPION and node.id not in BOUNDS:
        return "candidate", node.id, slice_name
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == CHAMPION:
        return CHAMPION, node.attr, slice_name
    return None


def _subject(left: ast.expr, right: ast.expr) -> tuple[str, str] | None:
    """The (metric, slice) a rule is about: the side that is a bare candidate term, if exactly one is."""
    found = []
    for side in (left, right):
        try:
            term = _metric_term(side)
        except RuleError:
            term = None
        if term is not None and term[0] == "candidate":
            found.append(term[1:])
    return found[0] if len(found) == 1 else None


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
    terms: set[Term] = set()
    intervals: set[tuple[str, str]] = set()

    def champion_of(sub: tuple[str, str] | None) -> Term:
        if sub is None:
            raise RuleError(
                f"gate rule {text!r}: a bare 'champion' needs one metric term on one side of the "
                "comparison (or inside ci_low/ci_high); write champion.<metric>"
            )
        return Term(CHAMPION, *sub)

    def interval(node: ast.Call) -> None:
        name = node.func.id  # type: ignore[attr-defined]
        diff = node.args[0] if len(node.args) == 1 and not node.keywords else None
        if not (isinstance(diff, ast.BinOp) and isinstance(diff.op, ast.Sub)):
            raise RuleError(
                f"gate rule {text!r}: {name}() takes one paired difference, e.g. {name}(token_f1[new] - champion)"
            )
        mine, theirs = _metric_term(diff.left), diff.right
        if mine is None or mine[0] != "candidate":
            raise RuleError(f"gate rule {text!r}: {name}(): the left side must be the candidate's metric[slice]")
        other = (
            (CHAMPION, *mine[1:]) if isinstance(theirs, ast.Name) and theirs.id == CHAMPION else _metric_term(theirs)
        )
        if other != (CHAMPION, *mine[1:]):
            raise RuleError(
                f"gate rule {text!r}: {name}() compares a metric with the champion's same metric on "
                f"the same slice: {name}({mine[1]}[{mine[2]}] - champion)"
            )
        intervals.add(mine[1:])

    def check(node: ast.expr) -> None:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return
        if isinstance(node, ast.Name) and node.id == CHAMPION:
            terms.add(champion_of(subject))
            return
        term = _metric_term(node)
        if term is not None:
            terms.add(Term(*term))
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BOUNDS:
            interval(node)
            return
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            check(node.left)
            check(node.right)
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            check(node.operand)
            return
        raise RuleError(
            f"gate rule {text!r}: {ast.unparse(node)!r} is not allowed; use numbers, metric[slice], "
            "champion.<metric>[slice], ci_low(...) / ci_high(...), + - * / and parentheses"
        )

    try:
        check(left)
        check(right)
    except RuleError as err:
        raise RuleError(str(err) if str(err).startswith("gate rule") else f"gate rule {text!r}: {err}") from None
    rule = Rule(text, left, op, right, frozenset(terms), frozenset(intervals))
    multi = {s for s in rule.slices if s in (OLD, ALL)}
    if len(multi) > 1:
        raise RuleError(f"gate rule {text!r}: use one of [old] and [all] per rule, not both")
    return rule


def check_metrics(
    rule: Rule,
    evaluated: Sequence[str],
    known: Sequence[str],
    slices: Sequence[str] | None = None,
    per_example: Sequence[str] | None = None,
) -> None:
    """Raise RuleError if the rule names a metric that is unknown or not evaluated, a slice that is not
    evaluated (`slices`: the named slices known to be evaluated; None: rules may not name slices), or an
    interval of a metric that has no per-example values."""
    unknown = sorted(rule.metrics - set(known))
    if unknown:
        raise RuleError(
            f"gate rule {rule.text!r}: unknown metric {', '.join(unknown)}; known metrics: {', '.join(known)}"
        )
    missing = sorted(rule.metrics - set(evaluated))
    if missing:
        raise RuleError(
            f"gate rule {rule.text!r}: metric {', '.join(missing)} is not evaluated with this "
            f"config (evaluated: {', '.join(evaluated)}); add it to eval.metrics, or for "
            "judge metrics set eval.judge.backend"
        )
    named = sorted(s for s in rule.slices if s not in SELECTORS)
    if slices is None and (named or rule.slices - {NEW} or rule.intervals):
        raise RuleError(f"gate rule {rule.text!r}: these rules compare one window, without slices or intervals")
    if slices is not None:
        absent = [s for s in named if s not in slices]
        if absent:
            raise RuleError(
                f"gate rule {rule.text!r}: slice {', '.join(absent)} is not evaluated with this config "
                f"(evaluated: {', '.join(slices) or 'only the data’s own slice'}); add it to "
                "eval.slices, or name it with new / old / all"
            )
    if per_example is not None:
        flat = sorted(m for m, _ in rule.intervals if m not in per_example)
        if flat:
            raise RuleError(
                f"gate rule {rule.text!r}: {', '.join(flat)} has no per-example values, so no paired "
                f"interval; intervals exist for {', '.join(per_example)}"
            )


def check_categories(
    rule: Rule, category_metrics: Sequence[str], categories: Sequence[str], measured: Sequence[str]
) -> None:
    """Raise RuleError if the rule mixes metrics per group with metrics per slice, names a slice
    selector other than `all` for a group metric, or a category that is not measured."""
    grouped = rule.metrics & set(category_metrics)
    if not grouped:
        named = sorted(s for s in rule.slices if s in categories)
        if named:
            raise RuleError(
                f"gate rule {rule.text!r}: {', '.join(named)} is a bias category, not a slice; "
                f"only {', '.join(category_metrics)} are measured per category"
            )
        return
    if grouped != rule.metrics:
        raise RuleError(
            f"gate rule {rule.text!r}: {', '.join(sorted(grouped))} are per bias category and "
            f"{', '.join(sorted(rule.metrics - grouped))} per slice: write one rule for each"
        )
    wrong = sorted(s for s in rule.slices if s not in categories and s != ALL)
    if wrong:
        raise RuleError(
            f"gate rule {rule.text!r}: {', '.join(sorted(grouped))} is per bias category: name one of "
            f"{', '.join(categories)} or all, e.g. bias_gap[gender] (not {', '.join(wrong)})"
        )
    absent = sorted(s for s in rule.slices if s in categories and s not in measured)
    if absent:
        raise RuleError(
            f"gate rule {rule.text!r}: category {', '.join(absent)} is not measured "
            f"(eval.bias.categories: {', '.join(measured) or 'none'})"
        )


# --------------------------------------------------------------------------- evaluation


class _Undefined(Exception):
    """A value the rule needs is missing, not a number, or a division by zero."""


def _instances(rule: Rule, figures: Figures) -> list[str | None]:
    """The slices (or categories) a rule over `old` / `all` stands for (None: the rule names no such selector)."""
    if ALL in rule.slices:
        by_group = bool(rule.metrics) and rule.metrics <= figures.category_metrics
        return list(figures.categories if by_group else figures.slices)
    if OLD in rule.slices:
        return [s for s in figures.slices if s != figures.new]
    return [None]


class _Reader:
    def __init__(self, figures: Figures, each: str | None, subject: tuple[str, str] | None) -> None:
        self.f, self.each, self.subject = figures, each, subject
        self.used: dict[str, float] = {}

    def slice(self, name: str) -> str:
        if name == NEW:
            return self.f.new
        return self.each if name in (OLD, ALL) else name

    def label(self, side: str, metric: str, slice_name: str) -> str:
        where = f"[{slice_name}]" if slice_name else ""
        return f"{'champion.' if side == CHAMPION else ''}{metric}{where}"

    def term(self, side: str, metric: str, slice_name: str) -> float:
        key = (metric, self.slice(slice_name))
        values = self.f.candidate if side == "candidate" else self.f.champion
        label = self.label(side, *key)
        if values is None:
            raise _Undefined(f"{label}: no champion figures")
        value = values.get(key)
        if value is None or math.isnan(value):
            raise _Undefined(f"{label} is {'missing' if value is None else 'not a number'}")
        self.used[label] = float(value)
        return float(value)

    def value(self, node: ast.expr) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id == CHAMPION:
            return self.term(CHAMPION, *self.subject)  # type: ignore[misc]
        if isinstance(node, ast.Call):
            diff = node.args[0]
            _, metric, slice_name = _metric_term(diff.left)  # type: ignore[misc,attr-defined]
            key = (metric, self.slice(slice_name))
            bounds = self.f.intervals.get(key)
            label = f"{node.func.id}({self.label('candidate', *key)} - champion)"  # type: ignore[attr-defined]
            if bounds is None or any(math.isnan(b) for b in bounds):
                raise _Undefined(f"{label}: no paired interval")
            value = float(bounds[BOUNDS[node.func.id]])  # type: ignore[attr-defined]
            self.used[label] = value
            self.used[f"paired 95% interval of {self.label('candidate', *key)} - champion"] = bounds  # type: ignore
            return value
        term = _metric_term(node)
        if term is not None:
            return self.term(*term)
        if isinstance(node, ast.UnaryOp):
            value = self.value(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        a, b = self.value(node.left), self.value(node.right)  # type: ignore[attr-defined]
        if isinstance(node.op, ast.Div) and b == 0:  # type: ignore[attr-defined]
            raise _Undefined(f"division by zero in {ast.unparse(node)}")
        return _OPERATORS[type(node.op)](a, b)  # type: ignore[attr-defined]


def _holds(a: float, op: str, b: float) -> bool:
    return {">=": a - b >= -EPSILON, "<=": b - a >= -EPSILON, ">": a - b > EPSILON, "<": b - a > EPSILON}[op]


def _fmt(label: str, value: object) -> str:
    if isinstance(value, tuple):
        return f"{label}=[{value[0]:.4g}, {value[1]:.4g}]"
    return f"{label}={value:.6g}"


def evaluate_rule(rule: Rule, figures: Figures, missing: Literal["fail", "skip"] = "fail") -> list[RuleResult]:
    """Return whether the rule holds for the candidate (against the champion), one result per slice
    it stands for. A value the rule needs that is missing makes it fail (or, `missing="skip"`, skipped)."""
    subject = _subject(rule.left, rule.right)
    instances = _instances(rule, figures)
    if not instances:
        scope = "earlier" if OLD in rule.slices else "evaluated"
        return [RuleResult(rule.text, "pass", f"no {scope} slice: nothing to compare")]
    results = []
    for each in instances:
        text = (
            rule.text if each is None else rule.text.replace(f"[{OLD}]", f"[{each}]").replace(f"[{ALL}]", f"[{each}]")
        )
        reader = _Reader(figures, each, subject)
        try:
            a, b = reader.value(rule.left), reader.value(rule.right)
        except _Undefined as err:
            outcome = "skipped" if missing == "skip" else "fail"
            detail = f"{err}: skipped" if missing == "skip" else f"cannot hold: {err}"
            results.append(RuleResult(text, outcome, detail, each))
            continue
        holds = _holds(a, rule.op, b)
        names = ", ".join(_fmt(k, v) for k, v in reader.used.items())
        results.append(
            RuleResult(
                text,
                "pass" if holds else "fail",
                f"{names}: {a:.6g} {rule.op if holds else 'not ' + rule.op} {b:.6g}",
                each,
            )
        )
    return results
