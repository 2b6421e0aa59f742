"""The metrics contract, read from the tables of docs/metrics.md, so that the document, the
tests, the alerting rules and the dashboard cannot drift apart; and the metric names a PromQL
expression uses.
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "metrics.md"

JOBS = ("eagle-coordinator", "eagle-draft", "eagle-worker")
# Names a PromQL expression may use besides the contract's: Prometheus' own per target.
PROMETHEUS_NAMES = {"up"}


@dataclass(frozen=True)
class Metric:
    name: str  # as stored in Prometheus: counters end in _total
    type: str  # counter, gauge or histogram
    labels: tuple[str, ...]
    exemplars: bool
    section: str  # the heading of its table
    exported_by: tuple[str, ...] = ()  # its table's "exported by" column, where there is one

    def series(self) -> str:
        """The name of a series that exists whenever the metric does."""
        return self.name + "_bucket" if self.type == "histogram" else self.name

    def jobs(self) -> tuple[str, ...]:
        """The scrape jobs that must export it."""
        if self.section.startswith("Coordinator"):
            return ("eagle-coordinator",)
        if self.section.startswith("Every process"):
            return JOBS
        # The worker and draft service table says per row which of the two export it.
        jobs = tuple(f"eagle-{w}" for w in self.exported_by)
        if not jobs or not set(jobs) <= set(JOBS):
            raise ValueError(f"{DOC}: {self.name}: exported by {self.exported_by!r}")
        return jobs


def metrics(doc: pathlib.Path = DOC) -> list[Metric]:
    """Every row of every metrics table: `| \\`name\\` | type | labels | meaning |`, with an
    `exported by` column (`worker, draft`) before the meaning in the worker/draft table."""
    out: list[Metric] = []
    section = ""
    header: list[str] = []
    for line in doc.read_text().splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), []
            continue
        if line.startswith("| name |"):
            header = [c.strip() for c in line.strip().strip("|").split("|")]
            continue
        m = re.match(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|([^|]*)\|([^|]*)\|", line)
        if not m:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        exported_by: tuple[str, ...] = ()
        if "exported by" in header:
            exported_by = tuple(w.strip() for w in cells[header.index("exported by")].split(","))
        name, kind, labels = m.group(1), m.group(2).strip(), m.group(3)
        base = kind.split(",")[0].split("(")[0].strip()
        if base not in ("counter", "gauge", "histogram"):
            raise ValueError(f"{doc}: {name}: unknown type {kind!r}")
        # Label names are backquoted; their values follow in parentheses or after a colon:
        # "`finish_reason` (`stop`, ...), `code` (...)", "`op`: worker `prefill`, ...".
        outside = re.sub(r"\([^)]*\)", "", labels).split(":")[0]
        label_names = tuple(re.findall(r"`([a-z_][a-z0-9_]*)`", outside))
        out.append(Metric(name, base, label_names, "exemplars" in kind, section, exported_by))
    if not out:
        raise ValueError(f"{doc}: no metric tables found")
    names = [m.name for m in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"{doc}: metrics listed twice: {sorted(dup)}")
    return out


def by_name(ms: list[Metric]) -> dict[str, Metric]:
    return {m.name: m for m in ms}


# PromQL words that look like metric names but are functions, keywords or aggregations.
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "le", "inf", "nan",
}


def names_in(expr: str) -> set[str]:
    """The metric names an expression selects (identifiers not followed by '(' and not label
    names inside braces or grouping clauses)."""
    # Drop string literals, then label matchers and grouping lists.
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    found = set()
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS or word.startswith("$"):
            continue
        found.add(word)
    return found


def base_name(series: str, ms: dict[str, Metric]) -> str | None:
    """The contract metric a series name belongs to (histogram suffixes stripped), or None."""
    if series in ms:
        return series
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix):
            base = series[: -len(suffix)]
            if base in ms and ms[base].type == "histogram":
                return base
    return None
