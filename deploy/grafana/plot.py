#!/usr/bin/env python3
"""Draws the main panels of the eagle-serve Grafana dashboard as one PNG, from a Prometheus over
a time range, for a report or when no Grafana is at hand.

The panels and their queries are read from dashboards/eagle-serve.json (by title), so the
picture shows what the dashboard shows: time to first token, inter-token latency and
end-to-end latency (p50, p90, p99), tokens/s, acceptance per position and tokens per target
pass.

    python3 deploy/grafana/plot.py --prometheus http://127.0.0.1:9090 --last 30m
    python3 deploy/grafana/plot.py --start 2026-01-01T10:00:00Z --end 2026-01-01T11:00:00Z

Needs matplotlib (pinned in deploy/grafana/requirements.txt:
scripts/pip-pinned.sh deploy/grafana/requirements.txt); nothing else beyond Python's standard
library.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import pathlib
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
DASHBOARD = HERE / "dashboards" / "eagle-serve.json"
OUT = HERE / "dashboard.png"

# (dashboard panel title, y-axis label, how values are shown): drawn left to right, top down.
PANELS = [
    ("Time to first token", "seconds", "s"),
    ("Inter-token latency", "milliseconds", "ms"),
    ("End-to-end request latency", "seconds", "s"),
    ("Tokens/s", "tokens per second", "plain"),
    ("Acceptance per position", "share of verify passes", "percent"),
    ("Tokens per target pass", "tokens", "plain"),
]


def parse_time(s: str, now: float) -> float:
    """Unix seconds from `now`, a Unix time, RFC 3339, or `-30m` / `-2h` / `-1d` before now."""
    if s == "now":
        return now
    m = re.fullmatch(r"-(\d+(?:\.\d+)?)([smhd])", s)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(s)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {s!r} (now, -30m, Unix seconds or RFC 3339)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def parse_duration(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {s!r} (e.g. 15s, 1m)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def prom_duration(seconds: float) -> str:
    return f"{int(math.ceil(seconds))}s"


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    url = f"{base.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except ValueError:
            raise SystemExit(f"plot.py: {url}: HTTP {e.code}") from None
    except OSError as e:
        raise SystemExit(f"plot.py: cannot reach Prometheus at {base}: {e}") from None
    if body.get("status") != "success":
        raise SystemExit(f"plot.py: {expr}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label."""
    out = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "")
    return out.strip() or json.dumps(labels)


def panel_queries(dashboard: dict, title: str) -> list[tuple[str, str]]:
    """(expr, legendFormat) of the dashboard panel with this title."""
    for p in dashboard["panels"]:
        if p.get("title") == title and p.get("type") != "row":
            return [(t["expr"], t.get("legendFormat", "")) for t in p.get("targets", [])]
    raise SystemExit(f"plot.py: the dashboard has no panel {title!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Draw the main panels of the eagle-serve dashboard (latency percentiles, tokens/s, "
                    "acceptance per position, tokens per pass) from Prometheus into a PNG.")
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL (default: %(default)s)")
    ap.add_argument("--start", help="range start: now, -30m (write --start=-30m), Unix seconds or RFC 3339 (default: --last before --end)")
    ap.add_argument("--end", default="now", help="range end, as --start (default: now)")
    ap.add_argument("--last", default="1h", type=parse_duration, help="range length when --start is not given (default: 1h)")
    ap.add_argument("--step", type=parse_duration, help="resolution (default: the range / 300, at least 5s)")
    ap.add_argument("--rate-interval", type=parse_duration, default=60.0,
                    help="what the dashboard's $__rate_interval becomes (default: 1m; at least 4 scrape intervals)")
    ap.add_argument("--dashboard", type=pathlib.Path, default=DASHBOARD, help="dashboard JSON (default: %(default)s)")
    ap.add_argument("--out", type=pathlib.Path, default=OUT, help="PNG to write (default: %(default)s)")
    ap.add_argument("--title", default="eagle-serve", help="figure title (default: %(default)s)")
    a = ap.parse_args(argv)

    now = dt.datetime.now(dt.timezone.utc).timestamp()
    end = parse_time(a.end, now)
    start = parse_time(a.start, now) if a.start else end - a.last
    if start >= end:
        ap.error(f"the range is empty: start {start} is not before end {end}")
    step = a.step or max(5.0, (end - start) / 300)
    dashboard = json.loads(a.dashboard.read_text())

    # Imported here so that --help works without matplotlib.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    cols = 3
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    tz = dt.datetime.now().astimezone().tzinfo
    for ax, (title, ylabel, shown) in zip(axes.flat, PANELS):
        drawn = 0
        for expr, fmt in panel_queries(dashboard, title):
            expr = expr.replace("$__rate_interval", prom_duration(a.rate_interval))
            expr = expr.replace("$__interval", prom_duration(step))
            for series in query_range(a.prometheus, expr, start, end, step):
                xs = [dt.datetime.fromtimestamp(float(t), tz) for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                if shown == "ms":
                    ys = [y * 1000 for y in ys]
                if not any(math.isfinite(y) for y in ys):
                    continue
                ax.plot(xs, ys, label=legend(fmt, series["metric"]), linewidth=1.2)
                drawn += 1
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(f"time ({dt.datetime.now().astimezone().strftime('%Z')})")
        ax.grid(True, alpha=0.3)
        locator = mdates.AutoDateLocator(tz=tz)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))
        ax.set_xlim(dt.datetime.fromtimestamp(start, tz), dt.datetime.fromtimestamp(end, tz))
        if shown == "percent":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylim(0, 1.05)
        else:
            ax.set_ylim(bottom=0)
        if drawn:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    span = f"{dt.datetime.fromtimestamp(start, tz):%Y-%m-%d %H:%M} to {dt.datetime.fromtimestamp(end, tz):%H:%M}"
    fig.suptitle(f"{a.title}: {span} ({a.prometheus})")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
