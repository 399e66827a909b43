"""Prometheus' text exposition format (version 0.0.4): metric families, a labelled counter and
histogram, and rendering.

Written here rather than taken from prometheus_client: importing that library brings
http.server, urllib, wsgiref and email along (60 ms of CPU at every node start, a fifth of the
node's imports, and memory in every process), for the few dozen lines a node's /metrics needs.
The format: https://prometheus.io/docs/instrumenting/exposition_formats/ -- a `# HELP` and a
`# TYPE` line per family, then one line per sample; counters' samples end in `_total`,
histograms' in `_bucket` (cumulative, with `le`, the last `+Inf`), `_count` and `_sum`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Family:
    """One metric family and its samples: (name suffix, label values, value)."""

    name: str
    help: str
    type: str  # counter, gauge or histogram
    labels: tuple[str, ...] = ()
    samples: list[tuple[str, tuple[str, ...], float]] = field(default_factory=list)

    def add(self, values: Sequence[str], value: float, suffix: str = "") -> None:
        """A sample with these label values; a counter's gets `_total`."""
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.labels)} labels, {len(values)} values")
        if self.type == "counter" and not suffix:
            suffix = "_total"
        self.samples.append((suffix, tuple(values), value))


def gauge(name: str, help: str, labels: Sequence[str] = (),
          value: float | None = None) -> Family:
    """A gauge family; with `value`, its one unlabelled sample."""
    return _family(name, help, "gauge", labels, value)


def counter(name: str, help: str, labels: Sequence[str] = (),
            value: float | None = None) -> Family:
    """A counter family (`name` without `_total`); with `value`, its one unlabelled sample."""
    return _family(name, help, "counter", labels, value)


def _family(name: str, help: str, kind: str, labels: Sequence[str],
            value: float | None) -> Family:
    fam = Family(name, help, kind, tuple(labels))
    if value is not None:
        fam.add((), value)
    return fam


class Counter:
    """A counter per combination of label values, counted here."""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._values: dict[tuple[str, ...], float] = {}

    def labels(self, *values: str) -> _CounterChild:
        return _CounterChild(self, self._key(values))

    def _key(self, values: Sequence[str]) -> tuple[str, ...]:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: {len(self.label_names)} labels, {len(values)} values")
        return tuple(str(v) for v in values)

    def inc(self, key: tuple[str, ...], amount: float) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up ({amount})")
        self._values[key] = self._values.get(key, 0.0) + amount

    def collect(self) -> Family:
        fam = counter(self.name, self.help, self.label_names)
        for key, value in sorted(self._values.items()):
            fam.add(key, value)
        return fam


@dataclass(frozen=True, slots=True)
class _CounterChild:
    parent: Counter
    key: tuple[str, ...]

    def inc(self, amount: float = 1.0) -> None:
        self.parent.inc(self.key, amount)


class Histogram:
    """Observations counted into cumulative buckets (upper bounds, `+Inf` added), with their
    count and sum, per combination of label values."""

    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._series: dict[tuple[str, ...], list[float]] = {}  # counts per bucket, then sum

    def labels(self, *values: str) -> _HistogramChild:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: {len(self.label_names)} labels, {len(values)} values")
        return _HistogramChild(self, tuple(str(v) for v in values))

    def observe(self, value: float, key: tuple[str, ...] = ()) -> None:
        """Count `value` (unlabelled, or under `key` through `labels`)."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [0.0] * (len(self.bounds) + 1)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                series[i] += 1  # its own bucket only: cumulated when collected
                break
        series[-1] += value

    def collect(self) -> Family:
        fam = Family(self.name, self.help, "histogram", (*self.label_names, "le"))
        series = self._series or ({(): [0.0] * (len(self.bounds) + 1)}
                                  if not self.label_names else {})
        for key, counts in sorted(series.items()):
            running = 0.0
            for bound, n in zip(self.bounds, counts, strict=False):
                running += n
                fam.samples.append(("_bucket", (*key, _number(bound)), running))
            fam.samples.append(("_count", (*key, ""), running))
            fam.samples.append(("_sum", (*key, ""), counts[-1]))
        return fam


@dataclass(frozen=True, slots=True)
class _HistogramChild:
    parent: Histogram
    key: tuple[str, ...]

    def observe(self, value: float) -> None:
        self.parent.observe(value, self.key)


def render(families: Iterable[Family]) -> bytes:
    """The families in the text format. A histogram's `_count` and `_sum` carry no `le`."""
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for suffix, values, value in fam.samples:
            pairs = [f'{k}="{_escape_label(v)}"' for k, v in zip(fam.labels, values, strict=True)
                     if not (k == "le" and suffix != "_bucket")]
            labels = "{" + ",".join(pairs) + "}" if pairs else ""
            lines.append(f"{fam.name}{suffix}{labels} {_number(value)}")
    return ("\n".join(lines) + "\n").encode()


def _number(value: float) -> str:
    """As Prometheus' Go code writes a float: +Inf, -Inf, NaN, else repr."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
