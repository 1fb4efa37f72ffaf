"""A tiny PromQL evaluator for the subset xatm's alert rules use, over scrapes taken in a test.

Enough to ask "would this rule's expression return anything at the time of this scrape?":
selectors with ``=``, ``!=``, ``=~`` matchers, ``max``/``min``/``sum`` with ``by``,
``absent()``, ``increase(selector[range])`` (last minus first sample in the window, counter
resets added up, no extrapolation), ``time()``, ``+``/``-`` between a scalar and a vector,
comparisons with a number (filters), ``and``, ``or``. Each :class:`Scrape` is one pull of every
target at one time, with ``up`` for each target added as Prometheus does.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]


@dataclass
class Scrape:
    at: float
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add_target(self, job: str, instance: str, text: str | None) -> None:
        """One target's answer (None: the scrape failed): its samples with job and instance,
        and ``up``."""
        target = {("job", job), ("instance", instance)}
        self.samples.append(("up", frozenset(target), 0.0 if text is None else 1.0))
        if text is None:
            return
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = frozenset({*s.labels.items(), *target})
                self.samples.append((s.name, labels, float(s.value)))


def parse_metrics(text: str, at: float, job: str = "xatm-app", instance: str = "app") -> Scrape:
    scrape = Scrape(at)
    scrape.add_target(job, instance, text)
    return scrape


_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<dur>\[\d+[smh]\])|(?P<str>\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<op>=~|!=|==|>=|<=|[-+(){}<>,=])|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*))"
)


def _tokens(expr: str) -> list[str]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot parse {expr[pos:]!r}")
        out.append(m.group(m.lastgroup or 0))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


class _Eval:
    def __init__(self, expr: str, history: list[Scrape], at: int) -> None:
        self.toks = _tokens(expr)
        self.i = 0
        self.history = history
        self.now = history[at]
        self.at = at

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> str:
        tok = self.toks[self.i]
        if want is not None and tok != want:
            raise ValueError(f"expected {want!r}, got {tok!r} in {' '.join(self.toks)}")
        self.i += 1
        return tok

    # expr := and ('or' and)*
    def expr(self) -> Vector | float:
        left = self.conj()
        while self.peek() == "or":
            self.take()
            right = self.conj()
            assert isinstance(left, dict) and isinstance(right, dict)
            keys = {k for k in left}
            left = {**left, **{k: v for k, v in right.items() if k not in keys}}
        return left

    def conj(self) -> Vector | float:
        left = self.comparison()
        while self.peek() == "and":
            self.take()
            right = self.comparison()
            assert isinstance(left, dict) and isinstance(right, dict)
            keys = {k for k in right}
            left = {k: v for k, v in left.items() if k in keys}
        return left

    def comparison(self) -> Vector | float:
        left = self.additive()
        op = self.peek()
        if op in ("==", "!=", ">", "<", ">=", "<="):
            self.take()
            right = float(self.take())
            test = {
                "==": lambda v: v == right,
                "!=": lambda v: v != right,
                ">": lambda v: v > right,
                "<": lambda v: v < right,
                ">=": lambda v: v >= right,
                "<=": lambda v: v <= right,
            }[op]
            assert isinstance(left, dict), "a comparison of scalars"
            return {k: v for k, v in left.items() if test(v)}
        return left

    def additive(self) -> Vector | float:
        left = self.unary()
        while self.peek() in ("-", "+"):
            sign = -1.0 if self.take() == "-" else 1.0
            right = self.unary()
            if isinstance(left, float) and isinstance(right, dict):
                left = {k: left + sign * v for k, v in right.items()}
            elif isinstance(left, dict) and isinstance(right, float):
                left = {k: v + sign * right for k, v in left.items()}
            elif isinstance(left, float) and isinstance(right, float):
                left = left + sign * right
            else:
                raise ValueError("vector-vector arithmetic is not in the subset")
        return left

    def unary(self) -> Vector | float:
        tok = self.peek()
        assert tok is not None
        if re.fullmatch(r"\d+(\.\d+)?", tok):
            return float(self.take())
        if tok == "(":
            self.take()
            inner = self.expr()
            self.take(")")
            return inner
        if tok == "time":
            self.take()
            self.take("(")
            self.take(")")
            return self.now.at
        if tok in ("max", "min", "sum"):
            return self.aggregate()
        if tok == "absent":
            self.take()
            self.take("(")
            inner = self.expr()
            self.take(")")
            assert isinstance(inner, dict)
            return {} if inner else {frozenset(): 1.0}
        if tok == "increase":
            self.take()
            self.take("(")
            name, matchers = self.selector()
            window = _seconds(self.take())
            self.take(")")
            return self.increase(name, matchers, window)
        name, matchers = self.selector()
        return {k: v for n, k, v in self.now.samples if n == name and _matches(k, matchers)}

    def aggregate(self) -> Vector:
        op = self.take()
        by: list[str] = []
        if self.peek() == "by":
            by = self.labels()
        self.take("(")
        inner = self.expr()
        self.take(")")
        if self.peek() == "by":
            by = self.labels()
        assert isinstance(inner, dict)
        groups: dict[Labels, list[float]] = {}
        for k, v in inner.items():
            groups.setdefault(frozenset((n, x) for n, x in k if n in by), []).append(v)
        fold = {"max": max, "min": min, "sum": sum}[op]
        return {k: float(fold(vs)) for k, vs in groups.items()}

    def labels(self) -> list[str]:
        self.take("by")
        self.take("(")
        names = []
        while self.peek() != ")":
            names.append(self.take())
            if self.peek() == ",":
                self.take()
        self.take(")")
        return names

    def selector(self) -> tuple[str, list[tuple[str, str, str]]]:
        name = self.take()
        matchers: list[tuple[str, str, str]] = []
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                label, op, value = self.take(), self.take(), self.take()
                matchers.append((label, op, value[1:-1]))
                if self.peek() == ",":
                    self.take()
            self.take("}")
        return name, matchers

    def increase(self, name: str, matchers: list[tuple[str, str, str]], window: float) -> Vector:
        series: dict[Labels, list[float]] = {}
        for scrape in self.history[: self.at + 1]:
            if scrape.at <= self.now.at - window:
                continue
            for n, k, v in scrape.samples:
                if n == name and _matches(k, matchers):
                    series.setdefault(k, []).append(v)
        out: Vector = {}
        for k, values in series.items():
            if len(values) < 2:
                continue
            total = 0.0
            for a, b in itertools.pairwise(values):
                total += b - a if b >= a else b  # a reset: counted from 0
            out[k] = total
        return out


def _seconds(duration: str) -> float:
    n, unit = int(duration[1:-2]), duration[-2]
    return n * {"s": 1, "m": 60, "h": 3600}[unit]


def _matches(labels: Labels, matchers: Iterable[tuple[str, str, str]]) -> bool:
    have = dict(labels)
    for label, op, value in matchers:
        got = have.get(label, "")
        if op == "=" and got != value:
            return False
        if op == "!=" and got == value:
            return False
        if op == "=~" and not re.fullmatch(value, got):
            return False
    return True


def evaluate(expr: str, history: list[Scrape], at: int) -> Vector:
    """``expr`` at the time of ``history[at]`` (earlier scrapes feed the range functions)."""
    e = _Eval(expr, history, at)
    result = e.expr()
    if e.peek() is not None:
        raise ValueError(f"trailing {e.toks[e.i :]} in {expr!r}")
    assert isinstance(result, dict), f"{expr!r} is a scalar"
    return result


def rules(path: str) -> Mapping[str, str]:
    """alert name -> its expression, from a Prometheus rules file."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    return {r["alert"]: str(r["expr"]).strip() for g in doc["groups"] for r in g["rules"]}
