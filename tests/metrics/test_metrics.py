#!/usr/bin/env python3
"""The metrics contract (docs/metrics.md) end to end, and the files under deploy/ that use it.

Static tests (no cluster): promtool checks the Prometheus configs, the alerting rules and their
unit tests (deploy/prometheus/); the rules and the Grafana dashboard (deploy/grafana/) use only
the contract's metric names and the dashboard shows all of them; the dashboard is well formed
and its expressions are valid PromQL; plot.py answers --help.

Live tests: `eagle cluster up --prometheus-sd-dir DIR` from the release binaries and Debian's
Prometheus with deploy/prometheus/prometheus.yml and alerts.yml (exemplar storage on), its
targets/ being DIR. A known set of requests goes through the HTTP API; then Prometheus must
hold every metric of the contract under its job, counters equal to what was sent and to the
responses' usage, consistent speculation counters, trace exemplars on the latency histograms;
every dashboard expression must return data, the alerting rules must load and stay quiet, and
plot.py must draw the range.

Run: tests/metrics/run.sh [NAME_SUBSTRING ...] (installs plot.py's pinned matplotlib), or
python3 tests/metrics/test_metrics.py [NAME_SUBSTRING ...]; `static` picks the static tests,
`live` the others. Prints one line per test and `metrics: N passed, M failed`; exits 1 on
failure. The live tests need target/release (cargo build --release --workspace), the model
(`eagle fetch smollm2-135m`) and Debian's prometheus package (scripts/setup.sh --tests).
"""

from __future__ import annotations

import collections
import contextlib
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import contract  # noqa: E402
from cluster import Cluster, cluster_up  # noqa: E402
from contract import JOBS, PROMETHEUS_NAMES, REPO  # noqa: E402
from prom import PROM_DIR, Prometheus, promtool, prometheus_up  # noqa: E402

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "eagle-serve.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
PLOT = REPO / "deploy" / "grafana" / "plot.py"

# What the dashboard's Grafana variables stand for when an expression is evaluated here.
GRAFANA_VARS = {"$__rate_interval": "1m", "${__rate_interval}": "1m", "$__interval": "15s",
                "${__interval}": "15s", "$__range": "1h", "${__range}": "1h"}

# The cluster's queue limits, passed as flags so the limit gauges can be checked.
MAX_RUNNING, MAX_WAITING = 8, 32
MAX_TOKENS = 24
PROMPTS = [
    "Why is the sky blue?",
    "Write a Python function that checks whether a number is prime.",
    "List three uses of a hash map.",
    "Explain what a mutex is in one paragraph.",
    "What is the capital of France? Answer in one word.",
]

STATIC: list[Callable[[], None]] = []
LIVE: list[Callable[["Live"], None]] = []


def static(fn):
    STATIC.append(fn)
    return fn


def live(fn):
    LIVE.append(fn)
    return fn


def metrics_by_name() -> dict[str, contract.Metric]:
    return contract.by_name(contract.metrics())


# ---- reading the deploy files ------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets(d: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query target of every panel (rows hold none)."""
    d = d or dashboard()
    out = []

    def walk(panels):
        for p in panels:
            if p.get("type") == "row":
                walk(p.get("panels", []))
                continue
            for t in p.get("targets", []):
                out.append((p.get("title", "?"), t))

    walk(d["panels"])
    return out


def grafana_expr(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by what they would be."""
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    left = re.findall(r"\$\{?[A-Za-z_]\w*", expr)
    if left:
        raise AssertionError(f"unknown Grafana variable(s) {left} in {expr}")
    return expr


def rule_exprs(path: pathlib.Path) -> list[tuple[str, str]]:
    """(alert name, expr) of a rules file, read without a YAML library: `expr:` is a one-line
    value or a block (`|` / `>`) of more-indented lines."""
    out = []
    lines = path.read_text().splitlines()
    name = "?"
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^\s*-?\s*(alert|record):\s*(\S+)", line)
        if m:
            name = m.group(2)
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if m:
            indent, value = len(m.group(1)), m.group(2).strip()
            if value in ("|", ">", "|-", ">-"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                out.append((name, " ".join(b for b in block if b)))
                continue
            out.append((name, value.strip("'\"")))
        i += 1
    return out


def kubernetes_config_without_k8s_sd(src: str, sd_file: pathlib.Path) -> str:
    """prometheus-kubernetes.yml with each `kubernetes_sd_configs:` block replaced by a file SD
    reading `sd_file` (Debian's Prometheus is built without Kubernetes discovery); everything
    else, the relabeling included, as written."""
    out: list[str] = []
    skip: int | None = None
    for line in src.splitlines():
        if skip is not None:
            if not line.strip() or line.lstrip().startswith("#") or len(line) - len(line.lstrip()) > skip:
                continue
            skip = None
        m = re.match(r"^(\s*)kubernetes_sd_configs:\s*$", line)
        if m:
            ind = m.group(1)
            skip = len(ind)
            out += [f"{ind}file_sd_configs:", f"{ind}  - files: [{sd_file}]"]
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def promtool_ok(r: subprocess.CompletedProcess, what: str) -> str:
    text = (r.stdout + r.stderr).strip()
    assert r.returncode == 0, f"{what} failed:\n{text}"
    return text


# ---- static tests ------------------------------------------------------------------------


@static
def contract_tables_parse():
    """docs/metrics.md's tables give every metric a name, a type and its jobs; counters end in
    _total, histograms in a unit, and the four latency histograms carry exemplars."""
    ms = contract.metrics()
    assert len(ms) >= 30, f"only {len(ms)} metrics parsed from {contract.DOC}"
    for m in ms:
        if m.type == "counter":
            assert m.name.endswith("_total"), m
        assert m.jobs(), m
    ex = {m.name for m in ms if m.exemplars}
    assert ex == {"eagle_time_to_first_token_seconds", "eagle_inter_token_latency_seconds",
                  "eagle_e2e_request_latency_seconds", "eagle_request_queue_time_seconds"}, ex
    print(f"    {len(ms)} metrics: " + ", ".join(f"{n} {t}" for t, n in
          collections.Counter(m.type for m in ms).items()))


@static
def promtool_checks_local_config():
    """prometheus.yml is valid with alerts.yml beside it and SD files as `eagle cluster up`
    writes them; the targets keep the files' `service` label (the process's name), and the
    jobs are the contract's."""
    with tempfile.TemporaryDirectory(prefix="eagle-promcfg-") as d:
        work = pathlib.Path(d)
        for f in ("prometheus.yml", "alerts.yml"):
            shutil.copy(PROM_DIR / f, work / f)
        (work / "targets").mkdir()
        for i, job in enumerate(("coordinator", "draft", "worker")):
            name = "worker-0" if job == "worker" else job
            (work / "targets" / f"eagle-{job}.json").write_text(
                json.dumps([{"targets": [f"127.0.0.1:{41000 + i}"], "labels": {"service": name}}]))
        text = promtool_ok(promtool("check", "config", "prometheus.yml", cwd=work), "promtool check config prometheus.yml")
        assert "WARNING" not in text, text
        for i, job in enumerate(JOBS):
            r = promtool("check", "service-discovery", "prometheus.yml", job, "--timeout=1s", cwd=work)
            out = r.stdout[r.stdout.index("["):] if "[" in r.stdout else r.stdout
            try:
                found = json.loads(out)
            except ValueError:
                raise AssertionError(f"promtool check service-discovery {job}: {r.stdout}{r.stderr}")
            assert len(found) == 1, found
            labels = found[0]["labels"]
            name = "worker-0" if job == "eagle-worker" else job.split("-", 1)[1]
            assert labels["job"] == job and labels["service"] == name, labels
            assert labels["__address__"] == f"127.0.0.1:{41000 + i}" and labels["__metrics_path__"] == "/metrics", labels


@static
def promtool_checks_kubernetes_config():
    """prometheus-kubernetes.yml is valid. Debian's promtool has no Kubernetes discovery, so
    there the same file with a file SD in its place is checked (the chart's tests run its
    relabeling against the chart's own pods: tests/helm)."""
    src = PROM_DIR / "prometheus-kubernetes.yml"
    r = promtool("check", "config", src.name, cwd=PROM_DIR)
    if r.returncode == 0:
        return
    text = r.stdout + r.stderr
    assert "kubernetes_sd_configs not found" in text, f"promtool check config {src.name} failed:\n{text}"
    with tempfile.TemporaryDirectory(prefix="eagle-promcfg-") as d:
        work = pathlib.Path(d)
        shutil.copy(PROM_DIR / "alerts.yml", work / "alerts.yml")
        (work / "pods.json").write_text("[]")
        (work / src.name).write_text(kubernetes_config_without_k8s_sd(src.read_text(), work / "pods.json"))
        promtool_ok(promtool("check", "config", src.name, cwd=work), f"promtool check config {src.name} (file SD in place of Kubernetes)")
    print("    this promtool has no Kubernetes discovery (Debian's build): checked with a file SD in its place")


@static
def promtool_checks_and_tests_rules():
    """alerts.yml passes promtool check rules, and its unit tests (alerts.test.yml) pass."""
    text = promtool_ok(promtool("check", "rules", "alerts.yml", cwd=PROM_DIR), "promtool check rules alerts.yml")
    n = re.search(r"SUCCESS: (\d+) rules found", text)
    assert n and int(n.group(1)) >= 10, text
    promtool_ok(promtool("test", "rules", "alerts.test.yml", cwd=PROM_DIR), "promtool test rules alerts.test.yml")
    tested = set(re.findall(r"alertname:\s*(\S+)", (PROM_DIR / "alerts.test.yml").read_text()))
    alerts = {name for name, _ in rule_exprs(PROM_DIR / "alerts.yml")}
    assert alerts <= tested, f"alerts without a unit test: {sorted(alerts - tested)}"
    print(f"    {n.group(1)} rules, all unit-tested")


@static
def rules_and_dashboard_use_only_contract_names():
    """Every metric name in alerts.yml and the dashboard is in docs/metrics.md (or `up`), and
    the dashboard shows every metric of the contract."""
    ms = metrics_by_name()
    bad = []
    used = set()
    for name, expr in rule_exprs(PROM_DIR / "alerts.yml"):
        for n in contract.names_in(expr):
            if n not in PROMETHEUS_NAMES and contract.base_name(n, ms) is None:
                bad.append(f"alerts.yml {name}: {n}")
    for title, t in dashboard_targets():
        for n in contract.names_in(t["expr"]):
            if n in PROMETHEUS_NAMES:
                continue
            base = contract.base_name(n, ms)
            if base is None:
                bad.append(f"dashboard panel {title!r}: {n}")
            else:
                used.add(base)
    assert not bad, "names not in docs/metrics.md:\n  " + "\n  ".join(bad)
    missing = sorted(set(ms) - used)
    assert not missing, f"metrics of the contract that no dashboard panel shows: {missing}"


@static
def dashboard_is_well_formed():
    """The dashboard has its uid, title, schemaVersion, time range and a `datasource` variable
    of type prometheus; every panel a unique id and a place on the 24-column grid that no other
    panel takes; every panel but rows the variable as datasource and targets with refIds and
    expressions; latency histograms' targets ask for exemplars."""
    d = dashboard()
    for k in ("uid", "title", "schemaVersion", "time", "templating", "panels"):
        assert k in d, f"no {k}"
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36, d["schemaVersion"]
    assert d["uid"] == "eagle-serve" and d["title"], (d["uid"], d["title"])
    assert {"from", "to"} <= set(d["time"]), d["time"]
    var = [v for v in d["templating"]["list"] if v.get("name") == "datasource"]
    assert len(var) == 1 and var[0]["type"] == "datasource" and var[0]["query"] == "prometheus", var
    ids, cells = set(), {}
    exemplar_metrics = {m.name for m in contract.metrics() if m.exemplars}
    n_targets = 0
    for p in d["panels"]:
        pid, title = p.get("id"), p.get("title", "?")
        assert isinstance(pid, int) and pid not in ids, f"panel {title!r}: id {pid} missing or used twice"
        ids.add(pid)
        g = p.get("gridPos") or {}
        assert all(isinstance(g.get(k), int) for k in "xywh"), f"panel {title!r}: gridPos {g}"
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, f"panel {title!r}: gridPos {g}"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells.get((x, y))!r} and {title!r} overlap at {x},{y}"
                cells[(x, y)] = title
        if p["type"] == "row":
            assert not p.get("panels"), f"row {title!r}: collapsed rows are not used"
            continue
        assert p.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, f"panel {title!r}: datasource {p.get('datasource')}"
        ts = p.get("targets") or []
        assert ts, f"panel {title!r} has no targets"
        refs = [t.get("refId") for t in ts]
        assert len(set(refs)) == len(refs) and all(refs), f"panel {title!r}: refIds {refs}"
        for t in ts:
            assert t.get("expr", "").strip(), f"panel {title!r}: a target without expr"
            grafana_expr(t["expr"])
            uses = {n[: -len("_bucket")] for n in contract.names_in(t["expr"]) if n.endswith("_bucket")}
            if uses & exemplar_metrics:
                assert t.get("exemplar") is True, f"panel {title!r}: {t['expr']} does not ask for exemplars"
            n_targets += 1
    print(f"    {len(d['panels'])} panels, {n_targets} queries")


@static
def dashboard_expressions_are_valid_promql():
    """Every dashboard expression parses (promtool check rules on them as recording rules)."""
    rules = []
    for i, (title, t) in enumerate(dashboard_targets()):
        rules.append({"record": f"dashboard:q{i}", "expr": grafana_expr(t["expr"])})
    with tempfile.TemporaryDirectory(prefix="eagle-dash-") as d:
        f = pathlib.Path(d) / "dashboard.rules.json"  # JSON is YAML
        f.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
        promtool_ok(promtool("check", "rules", str(f)), "promtool check rules on the dashboard's expressions")


@static
def grafana_provisioning_files():
    """The provisioning files name the dashboards folder and a Prometheus datasource whose
    exemplars' trace_id links to a provisioned tracing datasource."""
    ds = (PROVISIONING / "datasources" / "prometheus.yml").read_text()
    prov = (PROVISIONING / "dashboards" / "eagle-serve.yml").read_text()
    assert re.search(r"^\s*type:\s*prometheus\s*$", ds, re.M), "no prometheus datasource"
    assert "exemplarTraceIdDestinations:" in ds and re.search(r"name:\s*trace_id\b", ds), "no trace_id exemplar link"
    dest = re.search(r"datasourceUid:\s*(\S+)", ds)
    uids = set(re.findall(r"^\s*uid:\s*(\S+)\s*$", ds, re.M))
    assert dest and dest.group(1) in uids, f"the exemplar link's datasourceUid is not a provisioned datasource: {dest and dest.group(1)} not in {uids}"
    assert re.search(r"^\s*type:\s*file\s*$", prov, re.M) and re.search(r"^\s*path:\s*\S+", prov, re.M), prov


@static
def plot_py_answers_help():
    """deploy/grafana/plot.py --help works (without a Prometheus, and without matplotlib)."""
    r = subprocess.run([sys.executable, str(PLOT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--prometheus" in r.stdout, r.stdout + r.stderr


# ---- the live cluster --------------------------------------------------------------------


@dataclass
class Live:
    cluster: Cluster
    prom: Prometheus
    t0: float  # Unix time before the first request
    ok: int = 0  # requests answered 200
    prompt_tokens: int = 0  # their usage
    completion_tokens: int = 0
    finish: collections.Counter = field(default_factory=collections.Counter)  # HTTP finish_reason
    refused: collections.Counter = field(default_factory=collections.Counter)  # gRPC code -> n
    speculative: list[dict] = field(default_factory=list)  # `eagle` objects of speculative answers


def post(c: Cluster, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(c.http + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def send_requests(s: Live) -> None:
    """The known set of requests: 5 chat completions (speculation on), one with speculation
    off, one streamed, one refused by the shared validation and one by the HTTP layer before it
    (both INVALID_ARGUMENT, HTTP 400)."""
    c = s.cluster

    def answered(body: dict[str, Any], spec: bool) -> None:
        u = body["usage"]
        s.ok += 1
        s.prompt_tokens += u["prompt_tokens"]
        s.completion_tokens += u["completion_tokens"]
        s.finish[body["choices"][0]["finish_reason"]] += 1
        if spec:
            s.speculative.append(body.get("eagle") or {})

    for p in PROMPTS:
        code, raw = post(c, "/v1/chat/completions", chat_body(p))
        assert code == 200, f"{p!r}: HTTP {code}: {raw[:500]!r}"
        answered(json.loads(raw), True)
    code, raw = post(c, "/v1/chat/completions", chat_body(PROMPTS[0], eagle={"speculation": False}))
    assert code == 200, f"speculation off: HTTP {code}: {raw[:500]!r}"
    answered(json.loads(raw), False)
    # Streamed, with the usage chunk at the end.
    code, raw = post(c, "/v1/chat/completions",
                     chat_body(PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    assert code == 200, f"stream: HTTP {code}: {raw[:500]!r}"
    usage, finish = None, None
    for line in raw.decode().splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for ch in chunk.get("choices", []):
            finish = ch.get("finish_reason") or finish
    assert usage and finish, f"the stream had no usage chunk or finish_reason: {raw[-1000:]!r}"
    answered({"usage": usage, "choices": [{"finish_reason": finish}]}, True)
    # Refused by the validation every request goes through (gRPC and HTTP alike).
    code, raw = post(c, "/v1/chat/completions",
                     {"messages": [{"role": "robot", "content": "beep"}], "max_tokens": MAX_TOKENS})
    assert code == 400, f"a message with role robot: HTTP {code}, not 400: {raw[:500]!r}"
    s.refused["INVALID_ARGUMENT"] += 1
    # Refused by the HTTP layer itself (one choice per request), counted all the same.
    code, raw = post(c, "/v1/chat/completions", chat_body(PROMPTS[0], n=2))
    assert code == 400 and json.loads(raw)["error"]["param"] == "n", f"n = 2: HTTP {code}, not 400 naming n: {raw[:500]!r}"
    s.refused["INVALID_ARGUMENT"] += 1


def eventually(check: Callable[[], None], timeout_s: float = 20) -> None:
    """Runs `check` until it passes or `timeout_s` has gone by (counters land with the next
    scrape); re-raises its last failure."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@live
def targets_from_sd_files_are_up(s: Live):
    """One `metrics NAME URL` line per process (coordinator, draft, worker-0), the SD files
    list exactly those addresses under the right job, and Prometheus scrapes each, up, with
    job eagle-<kind> and the process' name as `service`."""
    m = s.cluster.metrics
    assert {"coordinator", "draft", "worker-0"} <= set(m), f"metrics lines: {s.cluster.lines}"
    for name, url in m.items():
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url), (name, url)
    sd = s.cluster.sd_targets()
    for f, groups in sd.items():
        kind = f[len("eagle-"):-len(".json")]
        want = sorted(url[len("http://"):-len("/metrics")] for name, url in m.items() if name.split("-")[0] == kind)
        got = sorted(t for g in groups for t in g["targets"])
        assert got == want, f"{f}: targets {got}, metrics lines say {want}"
    targets = s.prom.targets()
    by_url = {t["scrapeUrl"]: t for t in targets}
    assert sorted(by_url) == sorted(m.values()), f"Prometheus scrapes {sorted(by_url)}, the cluster printed {sorted(m.values())}"
    for name, url in m.items():
        t = by_url[url]
        assert t["health"] == "up", (name, t["health"], t.get("lastError"))
        labels = t["labels"]
        assert labels["job"] == "eagle-" + name.split("-")[0], (name, labels)
        assert labels.get("service") == name, (name, labels)


@live
def metrics_endpoints_serve_openmetrics(s: Live):
    """Every /metrics answers in the OpenMetrics text format (what carries exemplars)."""
    for name, url in s.cluster.metrics.items():
        req = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text;version=1.0.0"})
        with urllib.request.urlopen(req, timeout=30) as r:
            ctype = r.headers.get("Content-Type", "")
            body = r.read().decode()
        assert ctype.startswith("application/openmetrics-text"), f"{name}: Content-Type {ctype!r}"
        assert body.endswith("# EOF\n"), f"{name}: the body does not end with '# EOF': {body[-200:]!r}"


@live
def every_contract_metric_exists_under_its_job(s: Live):
    """Every metric of docs/metrics.md is in Prometheus under each job that exports it
    (histograms as NAME_bucket), with its labels, and of its type."""
    missing, unlabelled, mistyped = [], [], []
    meta = s.prom.api("metadata")
    for m in contract.metrics():
        for job in m.jobs():
            sel = f'{{__name__="{m.series()}", job="{job}"}}'
            if not s.prom.query(f"count({sel})"):
                missing.append(f"{m.series()} ({job})")
                continue
            for label in m.labels:
                without = s.prom.query(f'{{__name__="{m.series()}", job="{job}", {label}=""}}')
                if without:
                    unlabelled.append(f"{m.series()} ({job}) without `{label}`: {[x['metric'] for x in without][:3]}")
        family = m.name[: -len("_total")] if m.type == "counter" else m.name
        types = {e["type"] for e in meta.get(family, []) + meta.get(m.name, [])}
        if types and types != {m.type}:
            mistyped.append(f"{m.name}: {sorted(types)}, the contract says {m.type}")
    problems = missing and ["missing: " + ", ".join(missing)] or []
    problems += unlabelled + mistyped
    assert not problems, "\n  ".join(["metrics not as docs/metrics.md says:"] + problems)


@live
def request_counts_match_what_was_sent(s: Live):
    """eagle_requests_total: the successful requests with code OK, by finish_reason as the
    responses said (HTTP's "stop" is the contract's stop or eos), and the refused ones, the
    HTTP layer's included, once each with their code and finish_reason none; nothing else."""

    def check():
        p = s.prom
        ok = p.value('sum(eagle_requests_total{code="OK"})')
        assert ok == s.ok, f'eagle_requests_total{{code="OK"}} {ok}, {s.ok} requests answered 200'
        by_reason = p.values('sum by (finish_reason) (eagle_requests_total{code="OK"})', "finish_reason")
        assert by_reason.get("length", 0) == s.finish["length"], (by_reason, s.finish)
        assert by_reason.get("stop", 0) + by_reason.get("eos", 0) == s.finish["stop"], (by_reason, s.finish)
        assert set(by_reason) <= {"length", "stop", "eos"}, by_reason
        codes = p.values("sum by (code) (eagle_requests_total)", "code")
        want = {"OK": s.ok, **s.refused}
        assert {k: v for k, v in codes.items() if v} == want, f"by code {codes}, sent {want}"
        refused = p.values('sum by (finish_reason) (eagle_requests_total{code!="OK"})', "finish_reason")
        assert {k: v for k, v in refused.items() if v} == {"none": sum(s.refused.values())}, refused

    eventually(check)
    print(f"    {s.ok} OK ({dict(s.finish)}), refused {dict(s.refused)}")


@live
def token_counters_match_usage(s: Live):
    """eagle_prompt_tokens_total and eagle_generation_tokens_total equal the responses' usage."""

    def check():
        got = s.prom.value("sum(eagle_prompt_tokens_total)")
        assert got == s.prompt_tokens, f"eagle_prompt_tokens_total {got}, the responses' usage.prompt_tokens add up to {s.prompt_tokens}"
        got = s.prom.value("sum(eagle_generation_tokens_total)")
        assert got == s.completion_tokens, f"eagle_generation_tokens_total {got}, usage.completion_tokens add up to {s.completion_tokens}"

    eventually(check)
    print(f"    {s.prompt_tokens} prompt and {s.completion_tokens} generated tokens")


@live
def latency_histograms_count_each_request(s: Live):
    """First-token, end-to-end and queue-time histograms observe each successful request once;
    inter-token latency once per token after a request's first."""

    def check():
        p = s.prom
        for name in ("eagle_time_to_first_token_seconds", "eagle_e2e_request_latency_seconds",
                     "eagle_request_queue_time_seconds"):
            assert p.value(f"sum({name}_count)") == s.ok, (name, p.value(f"sum({name}_count)"), s.ok)
        itl = p.value("sum(eagle_inter_token_latency_seconds_count)")
        assert itl == s.completion_tokens - s.ok, f"inter-token observations {itl}, tokens after the first {s.completion_tokens - s.ok}"

    eventually(check)


@live
def speculation_counters_are_consistent(s: Live):
    """Speculation ran: accepted tokens > 0, and the sum over positions of
    eagle_spec_decode_accepted_tokens_per_pos_total equals eagle_spec_decode_accepted_tokens_total;
    positions run 0..k-1 with non-increasing counts; draft tokens are the verified trees' nodes
    less their roots; a target pass gave more than one token on average."""

    def check():
        p = s.prom
        accepted = p.value("sum(eagle_spec_decode_accepted_tokens_total)")
        assert accepted > 0, "no draft token was accepted"
        per_pos = p.values("sum by (position) (eagle_spec_decode_accepted_tokens_per_pos_total)", "position")
        assert sum(per_pos.values()) == accepted, f"sum over positions {sum(per_pos.values())} != accepted {accepted}: {per_pos}"
        positions = sorted(int(k) for k in per_pos)
        assert positions == list(range(len(positions))), f"positions {positions}"
        counts = [per_pos[str(k)] for k in positions]
        assert all(a >= b for a, b in zip(counts, counts[1:])), f"per-position counts grow with position: {counts}"
        passes = p.value("sum(eagle_spec_decode_tree_size_count)")
        assert 0 < counts[0] <= passes, f"position 0 accepted {counts[0]} times in {passes} verify passes"
        drafted = p.value("sum(eagle_spec_decode_draft_tokens_total)")
        nodes = p.value("sum(eagle_spec_decode_tree_size_sum)")
        assert drafted == nodes - passes, f"draft tokens {drafted} != tree nodes {nodes} - roots {passes}"
        tpp = p.value("sum(eagle_spec_decode_tokens_per_pass_sum) / sum(eagle_spec_decode_tokens_per_pass_count)")
        assert tpp > 1, f"mean tokens per target pass {tpp}: no gain from speculation"

    eventually(check)
    p = s.prom
    per_pos = p.values("sum by (position) (eagle_spec_decode_accepted_tokens_per_pos_total)", "position")
    passes = p.value("sum(eagle_spec_decode_tree_size_count)")
    accept = ", ".join(f"{per_pos[k] / passes:.2f}" for k in sorted(per_pos, key=int))
    print(f"    {passes:.0f} verify passes, acceptance per position {accept}; "
          f"plain steps {p.value('sum(eagle_spec_decode_plain_steps_total)'):.0f}, "
          f"draft unavailable {p.value('sum(eagle_draft_unavailable_total)'):.0f}")


@live
def model_calls_by_op(s: Live):
    """The worker timed prefill, verify and decode calls (the speculation-off request decodes
    plainly), the draft service open and draft calls."""
    want = {"eagle-worker": {"prefill", "verify", "decode"}, "eagle-draft": {"open", "draft"}}
    for job, ops in want.items():
        got = s.prom.values(f'sum by (op) (eagle_step_duration_seconds_count{{job="{job}"}})', "op")
        seen = {op for op, n in got.items() if n > 0}
        assert ops <= seen, f"{job}: ops observed {got}, want {sorted(ops)}"


@live
def gauges_of_an_idle_local_cluster(s: Live):
    """After the requests: nothing running or waiting, the limits are the flags given, one
    worker group, TP 1 and healthy, no etcd, a KV budget, build info and process metrics."""
    p = s.prom

    def check():
        assert p.value("sum(eagle_requests_running)") == 0, "eagle_requests_running is not 0 after the last answer"
        assert p.value("sum(eagle_requests_waiting)") == 0, "eagle_requests_waiting is not 0 after the last answer"

    eventually(check)
    for expr, want in [("eagle_requests_running_limit", MAX_RUNNING), ("eagle_requests_waiting_limit", MAX_WAITING),
                       ("eagle_worker_groups", 1), ("eagle_etcd_reachable", 0), ("eagle_tp_world_size", 1),
                       ("eagle_tp_group_healthy", 1)]:
        got = p.value(expr)
        assert got == want, f"{expr} is {got}, want {want}"
    assert p.value('eagle_kv_cache_capacity_bytes{job="eagle-worker"}') > 0
    assert p.value('eagle_kv_cache_bytes{job="eagle-worker"}') >= 0
    for job in JOBS:
        build = p.query(f'eagle_build_info{{job="{job}"}}')
        assert build and all(float(b["value"][1]) == 1 and b["metric"].get("version") and b["metric"].get("binary") == job
                             for b in build), f"{job}: eagle_build_info {build}"
        assert p.value(f'sum(process_resident_memory_bytes{{job="{job}"}})') > 0
        started = p.value(f'min(process_start_time_seconds{{job="{job}"}})')
        assert time.time() - 3600 < started <= time.time(), f"{job}: process_start_time_seconds {started}"
        assert p.value(f'sum(eagle_trace_spans_dropped_total{{job="{job}"}})') == 0, f"{job}: spans dropped without an exporter"


@live
def latency_histograms_carry_trace_exemplars(s: Live):
    """Prometheus stored exemplars {trace_id="<32 hex>"} for each latency histogram of the
    contract, each no larger than its bucket's bound."""
    start, end = s.t0 - 60, time.time() + 60
    for m in contract.metrics():
        if not m.exemplars:
            continue
        data = s.prom.api("query_exemplars", query=f"{m.name}_bucket", start=f"{start:.3f}", end=f"{end:.3f}")
        found = [(series["seriesLabels"], e) for series in data for e in series["exemplars"]]
        assert found, f"{m.name}: no exemplars stored"
        for labels, e in found:
            tid = e["labels"].get("trace_id", "")
            assert re.fullmatch(r"[0-9a-f]{32}", tid) and set(tid) != {"0"}, f"{m.name}: exemplar labels {e['labels']}"
            le = float(labels["le"])
            assert float(e["value"]) <= le, f"{m.name}: exemplar {e['value']} in the bucket le={labels['le']}"
        print(f"    {m.name}: {len(found)} exemplars")


@live
def every_dashboard_expression_returns_data(s: Live):
    """Each expression of the dashboard, its Grafana variables substituted, answers with a
    non-empty result."""
    empty, errors = [], []
    n = 0
    for title, t in dashboard_targets():
        expr = grafana_expr(t["expr"])
        n += 1
        try:
            if not s.prom.query(expr):
                empty.append(f"{title!r}: {expr}")
        except AssertionError as e:
            errors.append(f"{title!r}: {e}")
    assert not errors and not empty, "\n  ".join(["dashboard queries failing or empty:"] + errors + empty)
    print(f"    {n} queries answered")


@live
def alerting_rules_load_and_stay_quiet(s: Live):
    """Prometheus loaded every rule of alerts.yml, evaluates them without error, and none is
    pending or firing on a healthy local cluster (no etcd there: EagleEtcdUnreachable too)."""
    want = {name for name, _ in rule_exprs(PROM_DIR / "alerts.yml")}

    def loaded():
        rules = [r for g in s.prom.api("rules")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == want, sorted(r["name"] for r in rules)
        bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") != "ok"]
        assert not bad, f"rules evaluated with errors: {bad}"

    eventually(loaded, 30)
    alerts = s.prom.api("alerts")["alerts"]
    assert not alerts, "alerts on a healthy cluster: " + "; ".join(
        f"{a['labels'].get('alertname')} {a['state']} {a['labels']}" for a in alerts)


@live
def plot_py_draws_the_range(s: Live):
    """deploy/grafana/plot.py queries this Prometheus over the test's time range and writes a PNG."""
    with tempfile.TemporaryDirectory(prefix="eagle-plot-") as d:
        out = pathlib.Path(d) / "dashboard.png"
        r = subprocess.run([sys.executable, str(PLOT), "--prometheus", s.prom.url, "--start", f"{s.t0 - 30:.0f}",
                            "--end", f"{time.time():.0f}", "--step", "5s", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"plot.py failed:\n{r.stdout}{r.stderr}"
        data = out.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, f"{out}: {len(data)} bytes"


def run_live(selected: list[Callable[[Live], None]], report: Callable[[str, Callable[[], None]], bool]) -> None:
    """Starts the cluster and Prometheus, sends the requests, runs the live tests, and stops
    both (their logs are printed when anything failed)."""
    with tempfile.TemporaryDirectory(prefix="eagle-sd-") as sd, contextlib.ExitStack() as stack:
        sd_dir = pathlib.Path(sd) / "targets"
        started: dict[str, Any] = {}

        def setup() -> None:
            c = started["cluster"] = stack.enter_context(
                cluster_up(sd_dir, "--max-running", str(MAX_RUNNING), "--max-waiting", str(MAX_WAITING)))
            p = started["prom"] = stack.enter_context(prometheus_up(sd_dir))
            p.wait_targets_up(len(c.metrics))
            s = Live(cluster=c, prom=p, t0=time.time())
            t = time.monotonic()
            send_requests(s)
            print(f"    cluster up, {len(c.metrics)} targets up, {s.ok + sum(s.refused.values())} requests "
                  f"in {time.monotonic() - t:.1f} s")
            c.alive()
            # Two scrapes of every target after the last request.
            p.wait_scrapes(2)
            started["live"] = s

        def not_run() -> None:
            raise AssertionError("not run: the setup failed")

        ok = report("live_setup_cluster_prometheus_requests", setup)
        for t in selected:
            ok &= report(t.__name__, (lambda t=t: t(started["live"])) if "live" in started else not_run)
        if not ok:
            for what in ("cluster", "prom"):
                if what in started:
                    log = started[what].log
                    print(f"--- {log} (last 6000 characters):\n{log.read_text(errors='replace')[-6000:]}")


def main(argv: list[str]) -> int:
    def picked(name: str, kind: str) -> bool:
        return not argv or kind in argv or any(a in name for a in argv)

    st = [t for t in STATIC if picked(t.__name__, "static")]
    lv = [t for t in LIVE if picked(t.__name__, "live")]
    passed = failed = 0
    t_all = time.monotonic()

    def report(name: str, fn: Callable[[], None]) -> bool:
        nonlocal passed, failed
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            failed += 1
            detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc()
            print(f"FAIL {name} ({time.monotonic() - t0:.1f} s): {detail}", flush=True)
            return False
        passed += 1
        print(f"ok   {name} ({time.monotonic() - t0:.1f} s)", flush=True)
        return True

    print(f"metrics tests: docs/metrics.md, deploy/prometheus, deploy/grafana; "
          f"{len(st)} static, {len(lv)} live", flush=True)
    for t in st:
        report(t.__name__, t)
    if lv:
        run_live(lv, report)
    print(f"{passed + failed} metrics tests in {time.monotonic() - t_all:.0f} s")
    print(f"metrics: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
