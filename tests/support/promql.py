"""Just enough PromQL reading to check dashboards and alert rules against a real scrape.

Not a parser: it finds the metric names an expression reads, the label names its selectors
match on, and the label lists of its aggregations together with the metrics each one
aggregates. That is what can go stale when a metric is renamed or relabelled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Grafana's interval variables, replaced by a duration so the expression is plain PromQL.
_GRAFANA_VARIABLE = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__\w+\}")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RANGE = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"(?P<metric>[a-zA-Z_:][\w:]*)?\s*\{(?P<matchers>[^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?P<kind>by|without)\s*\((?P<labels>[^)]*)\)\s*")
_MODIFIER = re.compile(r"\b(?:on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][\w:]*")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset", "inf", "nan"}
)


@dataclass(frozen=True)
class Aggregation:
    kind: str  # by or without
    labels: frozenset[str]
    metrics: frozenset[str]  # the metrics inside the aggregated expression


@dataclass
class Reading:
    metrics: set[str] = field(default_factory=set)
    # metric name -> label names its selectors match on
    matchers: dict[str, set[str]] = field(default_factory=dict)
    aggregations: list[Aggregation] = field(default_factory=list)


def plain(expr: str) -> str:
    """The expression with Grafana's interval variables replaced by a fixed duration."""
    return _GRAFANA_VARIABLE.sub("5m", expr)


def metric_names(expr: str) -> set[str]:
    """Identifiers that name series: not functions (followed by ``(``), keywords, label names
    inside selectors or groupings, strings or durations."""
    text = _RANGE.sub(" ", _STRING.sub('""', plain(expr)))
    text = _GROUPING.sub(" ", _MODIFIER.sub(" ", text))
    text = re.sub(r"\{[^}]*\}", " ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def _argument(text: str, start: int) -> str:
    """The parenthesised group opening at ``text[start]`` (without its parentheses)."""
    assert text[start] == "(", text[start:]
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index]
    raise ValueError(f"unbalanced parentheses in {text!r}")


def read(expr: str) -> Reading:
    text = _STRING.sub('""', plain(expr))
    reading = Reading(metrics=metric_names(expr))
    original = plain(expr)
    for selector in _SELECTOR.finditer(original):
        metric = selector.group("metric")
        if metric is None or metric in _KEYWORDS:
            continue
        labels = set(_MATCHER.findall(_STRING.sub('""', selector.group("matchers"))))
        reading.matchers.setdefault(metric, set()).update(labels)
    for grouping in _GROUPING.finditer(text):
        after = grouping.end()
        if after < len(text) and text[after] == "(":
            argument = _argument(text, after)  # sum by (x) (expr)
        else:
            # expr-first form, ``sum(expr) by (x)``: the group just before the keyword.
            head = text[: grouping.start()].rstrip()
            if not head.endswith(")"):
                raise ValueError(f"cannot tell what {grouping.group()!r} groups in {expr!r}")
            depth, index = 0, len(head) - 1
            while index >= 0:
                depth += {")": 1, "(": -1}.get(head[index], 0)
                if depth == 0:
                    break
                index -= 1
            argument = _argument(head, index)
        labels = frozenset(label.strip() for label in grouping.group("labels").split(","))
        reading.aggregations.append(
            Aggregation(
                kind=grouping.group("kind"),
                labels=labels - {""},
                metrics=frozenset(metric_names(argument)),
            )
        )
    return reading
