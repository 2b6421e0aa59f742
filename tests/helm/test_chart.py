#!/usr/bin/env python3
"""The Helm chart's tests (helm/eagle-serve): Helm's own lint and rendering, Kubernetes API
schemas, the chart's invariants, refused values, and the CPU demo's rendered commands started
as a real local cluster that must answer like the in-process engine.

Run: tests/helm/run.sh (installs the pinned packages), or python3 tests/helm/test_chart.py
[NAME_SUBSTRING ...]. Prints one line per test and `N passed, M failed`; exits 1 on failure.
The local cluster test needs target/release (eagle, eagle-coordinator, eagle-draft,
eagle-worker), etcd on PATH (Debian etcd-server) and flock (util-linux); the scrape-config tests
need promtool (Debian prometheus).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import traceback

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import helm_python as helm  # noqa: E402
import kubernetes_validate  # noqa: E402

from chart import (  # noqa: E402
    CHART,
    NAMESPACE,
    REPO,
    by_name,
    containers,
    deep_merge,
    example_names,
    example_values,
    lint,
    manifests,
    of_kind,
    pod_spec,
    render,
    strip,
)
from local_cluster import BIN_DIR, LocalCluster  # noqa: E402

# The Kubernetes versions every manifest is validated against: the chart's minimum
# (Chart.yaml kubeVersion >=1.27: native gRPC probes are GA there) and a current release.
KUBE_VERSIONS = ["1.27.0", "1.34.0"]
# Kinds that are not part of the Kubernetes API (CRDs); checked by hand below.
CRD_KINDS = {"ServiceMonitor"}

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def all_renders():
    """(label, values, docs) for the defaults and every example."""
    out = [("defaults", None, manifests(render(None)))]
    for name in example_names():
        v = example_values(name)
        out.append((f"examples/{name}", v, manifests(render(v))))
    return out


# ---- Helm's engine: lint and template ---------------------------------------------------


@test
def lint_defaults_and_examples():
    """helm lint --strict passes on the defaults and every example (info messages allowed)."""
    for label, values in [("defaults", None)] + [(f"examples/{n}", example_values(n)) for n in example_names()]:
        report = lint(values)
        bad = [m for m in report["messages"] if m["severity"] >= 2]
        assert not bad and not report["errors"], f"{label}: {bad or report['errors']}"
    assert len(example_names()) == 4, example_names()


@test
def template_defaults_and_examples():
    """helm template renders the defaults and every example into the expected objects."""
    for label, values, docs in all_renders():
        kinds = sorted({d["kind"] for d in docs})
        for k in ["Deployment", "Service", "StatefulSet", "ServiceAccount", "PodDisruptionBudget"]:
            assert k in kinds, f"{label}: no {k} in {kinds}"
        names = [d["metadata"]["name"] for d in docs if d["kind"] != "Service"]
        assert len(names) == len(set((d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "Service")), label
        notes = render(values)["eagle-serve/templates/NOTES.txt"]
        assert "eagle client --addr" in notes, f"{label}: NOTES.txt lacks the client command"


@test
def kubernetes_api_schemas():
    """Every rendered object validates (strict: no unknown fields) against the Kubernetes API
    schemas of each version in KUBE_VERSIONS."""
    n = 0
    for label, _, docs in all_renders():
        for d in docs:
            if d["kind"] in CRD_KINDS:
                continue
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(strip(d), version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    raise AssertionError(
                        f"{label}: {d['kind']}/{d['metadata']['name']} is not valid Kubernetes {version}: "
                        f"{e.message} at {'/'.join(map(str, e.absolute_path))}"
                    )
                n += 1
    assert n > 50, n


@test
def optional_parts_render_valid():
    """A ServiceMonitor, TLS and API-key mounts, a chart-made model PVC, persistent 3-member
    etcd and an external etcd all render into valid objects; they stay off by default
    (metrics are on: see metrics_on_every_eagle_container)."""
    defaults = manifests(render(None))
    text = json.dumps([strip(d) for d in defaults])
    assert "ServiceMonitor" not in text
    assert "/etc/eagle/tls" not in text and "/etc/eagle/api-keys" not in text
    values = {
        "metrics": {"enabled": True, "serviceMonitor": {"enabled": True}},
        "security": {"tls": {"enabled": True, "secretName": "eagle-tls"}, "apiKeys": {"enabled": True, "secretName": "eagle-keys"}},
        "modelStorage": {"type": "pvc", "size": "5Gi"},
        "etcd": {"replicas": 3, "persistence": {"enabled": True}},
    }
    docs = manifests(render(values))
    for d in docs:
        if d["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(strip(d), KUBE_VERSIONS[-1], strict=True)
    sm = of_kind(docs, "ServiceMonitor")
    assert len(sm) == 1 and sm[0]["spec"]["endpoints"][0]["port"] == "metrics", sm
    assert sm[0]["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm[0]["spec"]["endpoints"][0]["path"] == "/metrics", sm[0]["spec"]["endpoints"]
    for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        if w["metadata"]["labels"]["app.kubernetes.io/component"] == "etcd":
            assert w["spec"]["replicas"] == 3 and w["spec"]["volumeClaimTemplates"], w["metadata"]["name"]
            init = w["spec"]["template"]["spec"]["containers"][0]["args"]
            assert init[init.index("--initial-cluster") + 1].count("=http://") == 3
            continue
        ann = w["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9090", ann
        c = pod_spec(w)["containers"][0]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/etc/eagle/tls", "/etc/eagle/api-keys"} <= mounts, mounts
        assert "metrics" in {p["name"] for p in c["ports"]}
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(w)["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["demo-eagle-serve-models"], claims
    assert of_kind(docs, "PersistentVolumeClaim")
    ext = manifests(render({"etcd": {"mode": "external", "urls": ["http://etcd.infra.svc:2379"]}}))
    assert not [d for d in ext if d["metadata"]["labels"].get("app.kubernetes.io/component") == "etcd"]
    coord = by_name(ext, "Deployment", "demo-eagle-serve-coordinator")
    args = pod_spec(coord)["containers"][0]["args"]
    assert args[args.index("--etcd") + 1] == "http://etcd.infra.svc:2379", args


# ---- metrics and their scraping -----------------------------------------------------------

EAGLE_COMPONENTS = ("coordinator", "draft", "worker")


def eagle_workloads(docs):
    return [w for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")
            if w["metadata"]["labels"]["app.kubernetes.io/component"] in EAGLE_COMPONENTS]


@test
def metrics_on_every_eagle_container():
    """Metrics are on by default: every coordinator, draft and worker container (every layout,
    every example) gets --metrics-addr 0.0.0.0:<metrics.port>, a container port `metrics` that
    is no other port, and its pod prometheus.io/scrape, /port and /path annotations; etcd gets
    none. /metrics needs no API key, so the coordinator's public Service does not carry the
    port, a headless <release>-coordinator-metrics Service does. metrics.enabled=false removes
    all of it."""
    for label, values, docs in all_renders():
        for w in eagle_workloads(docs):
            name = w["metadata"]["name"]
            ann = w["spec"]["template"]["metadata"].get("annotations", {})
            assert ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/path") == "/metrics", (label, name, ann)
            c = pod_spec(w)["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert "metrics" in ports and ann["prometheus.io/port"] == str(ports["metrics"]), (label, name, ports, ann)
            assert list(ports.values()).count(ports["metrics"]) == 1, (label, name, ports)
            assert arg(c["args"], "--metrics-addr") == f"0.0.0.0:{ports['metrics']}", (label, name, c["args"])
            assert c["args"].count("--metrics-addr") == 1, c["args"]
        for w in of_kind(docs, "StatefulSet"):
            if w["metadata"]["labels"]["app.kubernetes.io/component"] == "etcd":
                c = pod_spec(w)["containers"][0]
                assert "--metrics-addr" not in c["args"] and "prometheus.io/scrape" not in json.dumps(w), label
        public = by_name(docs, "Service", "demo-eagle-serve-coordinator")
        assert "metrics" not in {p["name"] for p in public["spec"]["ports"]}, f"{label}: /metrics on the public Service"
        ms = by_name(docs, "Service", "demo-eagle-serve-coordinator-metrics")
        assert ms["spec"]["clusterIP"] == "None" and [p["name"] for p in ms["spec"]["ports"]] == ["metrics"], ms
    off = manifests(render({"metrics": {"enabled": False}}))
    text = json.dumps([strip(d) for d in off])
    for word in ("--metrics-addr", "prometheus.io/", '"metrics"', "coordinator-metrics"):
        assert word not in text, f"metrics.enabled=false still renders {word}"


def sanitize(name: str) -> str:
    """A Kubernetes label or annotation name as Prometheus' discovery writes it in a label name."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def kubernetes_pod_targets(docs):
    """The target groups Prometheus' Kubernetes discovery (role: pod) would make of the pods of
    a render: one per declared port of each container, with the __meta_kubernetes_pod_* labels
    it sets (pods named as their controllers name them, each with an IP of its own)."""
    groups, n = [], 0
    for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        tmpl = w["spec"]["template"]
        for i in range(w["spec"].get("replicas", 1)):
            n += 1
            ip = f"10.1.{n // 250}.{n % 250 + 1}"
            pod = f"{w['metadata']['name']}-{i}" if w["kind"] == "StatefulSet" else f"{w['metadata']['name']}-7d9f8c6b5-q{i}x2z"
            meta = {
                "__meta_kubernetes_namespace": NAMESPACE,
                "__meta_kubernetes_pod_name": pod,
                "__meta_kubernetes_pod_ip": ip,
                "__meta_kubernetes_pod_phase": "Running",
                "__meta_kubernetes_pod_ready": "true",
            }
            for k, v in (tmpl["metadata"].get("labels") or {}).items():
                meta[f"__meta_kubernetes_pod_label_{sanitize(k)}"] = str(v)
                meta[f"__meta_kubernetes_pod_labelpresent_{sanitize(k)}"] = "true"
            for k, v in (tmpl["metadata"].get("annotations") or {}).items():
                meta[f"__meta_kubernetes_pod_annotation_{sanitize(k)}"] = str(v)
                meta[f"__meta_kubernetes_pod_annotationpresent_{sanitize(k)}"] = "true"
            for c in tmpl["spec"]["containers"]:
                for p in c.get("ports", []):
                    groups.append({"targets": [f"{ip}:{p['containerPort']}"], "labels": {
                        **meta,
                        "__meta_kubernetes_pod_container_name": c["name"],
                        "__meta_kubernetes_pod_container_init": "false",
                        "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                        "__meta_kubernetes_pod_container_port_number": str(p["containerPort"]),
                        "__meta_kubernetes_pod_container_port_protocol": p.get("protocol", "TCP"),
                    }})
    return groups


def discovered(config: dict, job: str, groups) -> list[dict]:
    """`promtool check service-discovery` of `job` in `config` (Kubernetes discovery replaced
    by a file SD holding `groups`: Debian's promtool has no Kubernetes discovery): the labels
    of each target that relabeling keeps."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH (Debian prometheus; scripts/setup.sh --tests installs it)"
    with tempfile.TemporaryDirectory(prefix="eagle-sd-") as d:
        sd = pathlib.Path(d) / "pods.json"
        sd.write_text(json.dumps(groups))
        config = json.loads(json.dumps(config))
        config.pop("rule_files", None)
        for sc in config["scrape_configs"]:
            if sc.pop("kubernetes_sd_configs", None) is not None:
                sc["file_sd_configs"] = [{"files": [str(sd)]}]
        cfg = pathlib.Path(d) / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        check = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        r = subprocess.run([promtool, "check", "service-discovery", str(cfg), job, "--timeout=1s"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "[" in r.stdout, r.stdout + r.stderr
        found = json.loads(r.stdout[r.stdout.index("["):])
    assert len(found) == sum(len(g["targets"]) for g in groups), (len(found), len(groups))
    return [t["labels"] for t in found if t["labels"]]


def expected_scrapes(docs) -> dict[str, tuple[str, str]]:
    """instance -> (job, pod) of every target the chart means to be scraped: each coordinator,
    draft and worker pod (every rank's of a pod-per-rank group), on its `metrics` port."""
    want = {}
    for g in kubernetes_pod_targets(docs):
        lab = g["labels"]
        comp = lab.get("__meta_kubernetes_pod_label_app_kubernetes_io_component")
        if comp not in EAGLE_COMPONENTS or lab["__meta_kubernetes_pod_container_port_name"] != "metrics":
            continue
        want[g["targets"][0]] = (f"eagle-{comp}", lab["__meta_kubernetes_pod_name"])
    return want


@test
def prometheus_kubernetes_config_scrapes_the_charts_pods():
    """deploy/prometheus/prometheus-kubernetes.yml, run by promtool over the pods of every
    render as Kubernetes discovery would list them, keeps exactly the `metrics` port of each
    coordinator, draft and worker pod (the pod-per-rank example's ranks 1-7 included: they serve
    the every-process metrics), with the contract's job names and namespace, pod, release and
    group labels; etcd, gRPC, HTTP and TP ports are dropped."""
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus-kubernetes.yml").read_text())
    jobs = [sc["job_name"] for sc in config["scrape_configs"]]
    assert jobs == ["eagle-serve"], jobs
    for label, _, docs in all_renders():
        groups = kubernetes_pod_targets(docs)
        kept = discovered(config, "eagle-serve", groups)
        want = expected_scrapes(docs)
        got = {t["instance"]: (t["job"], t["pod"]) for t in kept}
        assert got == want, f"{label}: scraped {got}, want {want}"
        for t in kept:
            assert t["namespace"] == NAMESPACE and t["release"] == "demo" and t["__metrics_path__"] == "/metrics", t
            assert ("group" in t) == (t["job"] == "eagle-worker"), t
            assert not [k for k in t if k.startswith("__meta")], t


@test
def service_monitor_relabelings_give_the_contract_job_names():
    """The ServiceMonitor's relabelings, as Prometheus relabel configs after a keep of the
    `metrics` port (what the operator makes of `port: metrics`), run by promtool over the same
    pods: the jobs are eagle-coordinator, eagle-draft and eagle-worker, every rank's pod kept,
    the operator's own labels left alone."""
    docs = manifests(render({"metrics": {"serviceMonitor": {"enabled": True}}}))
    sm = of_kind(docs, "ServiceMonitor")[0]
    ep = sm["spec"]["endpoints"][0]
    snake = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    # The operator's own first: keep the endpoint's port, label the pod, the namespace and the
    # Service (`service`).
    relabel = [{"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": ep["port"], "action": "keep"},
               {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
               {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
               {"target_label": "service", "replacement": "some-service"}]
    relabel += [{snake.get(k, k): v for k, v in r.items()} for r in ep["relabelings"]]
    for values in [{"metrics": {"serviceMonitor": {"enabled": True}}},
                   deep_merge(example_values("qwen2-72b-tp8-multinode"), {"metrics": {"serviceMonitor": {"enabled": True}}})]:
        docs = manifests(render(values))
        config = {"scrape_configs": [{"job_name": "sm", "kubernetes_sd_configs": [{"role": "pod"}], "relabel_configs": relabel}]}
        kept = discovered(config, "sm", kubernetes_pod_targets(docs))
        got = {t["instance"]: (t["job"], t["pod"]) for t in kept}
        assert got == expected_scrapes(docs), got
        for t in kept:
            assert t["release"] == "demo" and t["service"] == "some-service" and ("group" in t) == (t["job"] == "eagle-worker"), t


@test
def grafana_dashboard_configmap():
    """The chart's dashboards/eagle-serve.json is deploy/grafana/dashboards/eagle-serve.json, and
    metrics.grafanaDashboard.enabled puts it in a valid ConfigMap with the sidecar's label."""
    chart_copy = (CHART / "dashboards" / "eagle-serve.json").read_bytes()
    source = (REPO / "deploy" / "grafana" / "dashboards" / "eagle-serve.json").read_bytes()
    assert chart_copy == source, ("helm/eagle-serve/dashboards/eagle-serve.json differs from deploy/grafana/dashboards/"
                                  "eagle-serve.json: cp deploy/grafana/dashboards/eagle-serve.json helm/eagle-serve/dashboards/")
    docs = manifests(render({"metrics": {"grafanaDashboard": {"enabled": True}}}))
    cms = of_kind(docs, "ConfigMap")
    assert len(cms) == 1 and cms[0]["metadata"]["labels"]["grafana_dashboard"] == "1", cms
    kubernetes_validate.validate(strip(cms[0]), KUBE_VERSIONS[-1], strict=True)
    data = cms[0]["data"]
    assert list(data) == ["eagle-serve.json"] and json.loads(data["eagle-serve.json"])["uid"] == "eagle-serve"
    assert len(json.dumps(strip(cms[0]))) < 1 << 20, "a ConfigMap holds at most 1 MiB"
    assert not of_kind(manifests(render(None)), "ConfigMap"), "the dashboard ConfigMap is off by default"


# ---- chart invariants ---------------------------------------------------------------------


def worker_sets(docs):
    return [d for d in of_kind(docs, "StatefulSet") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]


def arg(args, flag):
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def gpu_count(c):
    r = c.get("resources", {})
    lim = r.get("limits", {}).get("nvidia.com/gpu", 0)
    req = r.get("requests", {}).get("nvidia.com/gpu", 0)
    assert lim == req, f"{c['name']}: GPU limit {lim} != request {req}"
    return int(lim)


# What each example must deploy: [(group, tp, pods, gpus per pod)].
EXPECTED_GROUPS = {
    "defaults": [("g0", 1, 1, 0)],
    "examples/cpu-demo": [("g0", 1, 1, 0)],
    "examples/llama3-70b-tp8": [("llama", 8, 1, 8)],
    "examples/mixtral-8x7b": [("mixtral-0", 4, 1, 4), ("mixtral-1", 4, 1, 4)],
    "examples/qwen2-72b-tp8-multinode": [("qwen", 8, 8, 1)],
}


@test
def tp_statefulsets_replicas_and_gpus():
    """Each worker group is one StatefulSet with tp / gpusPerPod replicas, the GPUs it needs,
    and the worker flags of its layout (rank 0 spawns, or rank = pod ordinal via etcd)."""
    for label, values, docs in all_renders():
        got = []
        for sts in worker_sets(docs):
            group = sts["metadata"]["labels"]["eagle-serve/group"]
            c = pod_spec(sts)["containers"][0]
            args = c["args"]
            tp = int(arg(args, "--tp"))
            pods = sts["spec"]["replicas"]
            gpus = gpu_count(c)
            got.append((group, tp, pods, gpus))
            assert sts["spec"]["podManagementPolicy"] == "Parallel", label
            assert arg(args, "--group") == group and arg(args, "--etcd").startswith("http"), args
            assert arg(args, "--advertise") == "$(POD_IP):50061", args
            device = arg(args, "--device")
            assert device == ("cuda" if gpus else "cpu"), (label, device, gpus)
            if pods == 1:
                assert c["command"] == ["eagle-worker"], c["command"]
                assert "--tp-no-spawn" not in args and "--tp-rank" not in args, args
            else:
                assert pods == tp and gpus in (0, 1), (label, pods, tp, gpus)
                assert c["command"][:2] == ["/bin/sh", "-c"] and '--tp-rank "${POD_NAME##*-}"' in c["command"][2], c["command"]
                assert args[0] == "eagle-worker" and "--tp-no-spawn" in args, args
                assert arg(args, "--tp-advertise") == "$(POD_IP):7070" and arg(args, "--tp-listen") == "0.0.0.0:7070"
            if gpus > 1:
                shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
                assert shm, f"{label}: a multi-GPU pod has no /dev/shm volume"
        assert sorted(got) == sorted(EXPECTED_GROUPS[label]), f"{label}: {got}"


@test
def workers_send_the_features_the_head_reads():
    """draft.headFeatures reaches every worker rank as --draft-features (an EAGLE-3 head reads
    three layers' outputs); the default is the last features; a value the worker would refuse
    is refused by the schema before anything renders."""
    for label, _, docs in all_renders():
        for sts in worker_sets(docs):
            args = pod_spec(sts)["containers"][0]["args"]
            assert arg(args, "--draft-features") == "last", (label, args)
    for features in ("eagle3", "1,14,26"):
        docs = manifests(render({"draft": {"headFeatures": features}}))
        for sts in worker_sets(docs):
            assert arg(pod_spec(sts)["containers"][0]["args"], "--draft-features") == features
    try:
        render({"draft": {"headFeatures": "layer 3"}})
    except helm.HelmValuesError as e:
        assert "headFeatures" in str(e), e
    else:
        raise AssertionError("the schema let headFeatures 'layer 3' through")


@test
def probes_point_at_grpc_health_ports():
    """Every eagle container that serves gRPC has startup, readiness and liveness probes, all
    native gRPC probes on its own grpc port (grpc.health.v1), and that port is what its
    --listen flag binds; only pod-per-rank worker pods (ranks above 0 serve no gRPC) go
    without. etcd's probes use its client port."""
    checked = 0
    for label, _, docs in all_renders():
        for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
            comp = w["metadata"]["labels"]["app.kubernetes.io/component"]
            for c in containers(w, init=False):
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                if comp == "etcd":
                    assert c["readinessProbe"]["httpGet"]["port"] == "client" and "client" in ports
                    assert c["livenessProbe"]["tcpSocket"]["port"] == "client"
                    continue
                per_rank = w["metadata"].get("annotations", {}).get("eagle-serve/layout") == "pod-per-rank"
                kinds = [k for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c]
                if per_rank:
                    assert not kinds, f"{label}: pod-per-rank {w['metadata']['name']} has probes {kinds}"
                    continue
                assert kinds == ["startupProbe", "readinessProbe", "livenessProbe"], (label, c["name"], kinds)
                listen = int(arg(c["args"], "--listen").rsplit(":", 1)[1])
                assert ports["grpc"] == listen, (label, c["name"], ports, listen)
                for k in kinds:
                    assert set(c[k]) >= {"grpc"} and not {"httpGet", "tcpSocket", "exec"} & set(c[k]), c[k]
                    assert c[k]["grpc"]["port"] == ports["grpc"], (label, c["name"], k, c[k])
                    assert c[k]["grpc"]["service"] in ("", "eagle.etcd"), c[k]
                checked += 1
    assert checked >= 12, checked


@test
def services_select_pods_and_named_ports():
    """Every Service selects pods of the render and every targetPort names a port they declare."""
    for label, _, docs in all_renders():
        pods = [(w["spec"]["template"]["metadata"]["labels"], containers(w, init=False)) for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")]
        for svc in of_kind(docs, "Service"):
            sel = svc["spec"]["selector"]
            matched = [cs for labels, cs in pods if all(labels.get(k) == v for k, v in sel.items())]
            assert matched, f"{label}: Service {svc['metadata']['name']} selects nothing"
            for p in svc["spec"]["ports"]:
                names = {pp["name"] for cs in matched for c in cs for pp in c.get("ports", [])}
                assert p["targetPort"] in names, (label, svc["metadata"]["name"], p, names)
        for sts in of_kind(docs, "StatefulSet"):
            assert any(s["metadata"]["name"] == sts["spec"]["serviceName"] and s["spec"].get("clusterIP") == "None" for s in of_kind(docs, "Service")), sts["metadata"]["name"]


@test
def security_context_and_service_account():
    """Every pod runs as non-root with a read-only root filesystem, no privilege escalation,
    no capabilities, its own service account and no API token; /tmp is writable."""
    for label, _, docs in all_renders():
        sa = of_kind(docs, "ServiceAccount")
        assert len(sa) == 1 and sa[0]["automountServiceAccountToken"] is False
        for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
            spec = pod_spec(w)
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
            assert spec["serviceAccountName"] == sa[0]["metadata"]["name"] and spec["automountServiceAccountToken"] is False
            for c in containers(w):
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (label, c["name"])
                assert sc["capabilities"]["drop"] == ["ALL"]
                if w["metadata"]["labels"]["app.kubernetes.io/component"] != "etcd":
                    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, (label, c["name"])


@test
def pod_disruption_budgets():
    """A PodDisruptionBudget covers each component, the workers' one all worker pods."""
    for label, _, docs in all_renders():
        pdbs = {d["metadata"]["name"]: d for d in of_kind(docs, "PodDisruptionBudget")}
        comps = {w["metadata"]["labels"]["app.kubernetes.io/component"] for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")}
        for comp in comps:
            pdb = pdbs[f"demo-eagle-serve-{comp}"]
            assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == comp
            assert pdb["spec"]["maxUnavailable"] == 1


@test
def model_sources():
    """The fetch init container runs `eagle fetch` into the writable model volume (under a file
    lock), which the main containers mount read-only as EAGLE_HOME; a pre-populated claim
    (model.fetch empty) has no init container."""
    docs = manifests(render(None))
    for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        if w["metadata"]["labels"]["app.kubernetes.io/component"] == "etcd":
            continue
        spec = pod_spec(w)
        (init,) = spec["initContainers"]
        assert init["command"] == ["flock", "/models/.fetch.lock", "eagle", "fetch", "smollm2-135m"], init["command"]
        assert [m for m in init["volumeMounts"] if m["name"] == "models" and not m.get("readOnly")]
        main = spec["containers"][0]
        assert [m for m in main["volumeMounts"] if m["name"] == "models" and m["readOnly"] is True]
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env["EAGLE_HOME"] == "/models"
        assert arg(main["args"], "--model") == "/models/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
    docs = manifests(render(example_values("llama3-70b-tp8")))
    for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        if w["metadata"]["labels"]["app.kubernetes.io/component"] == "etcd":
            continue
        spec = pod_spec(w)
        assert "initContainers" not in spec, w["metadata"]["name"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["llama3-70b-weights"], claims


# ---- refused values -----------------------------------------------------------------------

BAD_VALUES = [
    # (what, values, a string the error must contain: the value's name)
    ("TP degree 0", {"workers": {"groups": [{"name": "g0", "tp": 0}]}}, "/workers/groups/0/tp"),
    ("TP degree -2", {"workers": {"groups": [{"name": "g0", "tp": -2}]}}, "/workers/groups/0/tp"),
    ("TP degree 2.5", {"workers": {"groups": [{"name": "g0", "tp": 2.5}]}}, "/workers/groups/0/tp"),
    ("GPUs per pod not dividing TP", {"workers": {"groups": [{"name": "g0", "tp": 8, "gpusPerPod": 3}]}}, "workers.groups[0].gpusPerPod"),
    ("GPUs per pod dividing TP but not a layout", {"workers": {"groups": [{"name": "a", "tp": 2}, {"name": "b", "tp": 8, "gpusPerPod": 4}]}}, "workers.groups[1].gpusPerPod"),
    ("GPUs per pod 0", {"workers": {"groups": [{"name": "g0", "tp": 2, "gpusPerPod": 0}]}}, "/workers/groups/0/gpusPerPod"),
    ("missing model (empty path)", {"model": {"path": ""}}, "/model/path"),
    ("missing model (path removed)", {"model": {"path": None}}, "at '/model': missing property 'path'"),
    ("no worker group", {"workers": {"groups": []}}, "/workers/groups"),
    ("group without tp", {"workers": {"groups": [{"name": "g0"}]}}, "tp"),
    ("group name not a DNS label", {"workers": {"groups": [{"name": "G_0", "tp": 1}]}}, "/workers/groups/0/name"),
    ("misspelt group setting", {"workers": {"groups": [{"name": "g0", "tp": 2, "gpuPerPod": 1}]}}, "gpuPerPod"),
    ("duplicate group names", {"workers": {"groups": [{"name": "g0", "tp": 1}, {"name": "g0", "tp": 1}]}}, "workers.groups[1].name"),
    ("2-member etcd", {"etcd": {"replicas": 2}}, "/etcd/replicas"),
    ("3-member etcd without persistence", {"etcd": {"replicas": 3}}, "etcd.persistence.enabled"),
    ("external etcd without URLs", {"etcd": {"mode": "external"}}, "etcd.urls"),
    ("unknown device", {"device": "tpu"}, "/device"),
    ("unknown dtype", {"model": {"dtype": "int3"}}, "/model/dtype"),
    ("emptyDir model volume without fetch", {"model": {"fetch": ""}}, "model.fetch"),
    ("group override of fetch on emptyDir", {"workers": {"groups": [{"name": "g0", "tp": 1, "model": {"fetch": ""}}]}}, "workers.groups[0].model.fetch"),
    ("existingClaim without a name", {"modelStorage": {"type": "existingClaim"}}, "modelStorage.existingClaim"),
    ("TLS without a Secret", {"security": {"tls": {"enabled": True}}}, "security.tls.secretName"),
    ("ServiceMonitor without metrics", {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}, "metrics.serviceMonitor.enabled"),
    ("metrics port on the gRPC port", {"metrics": {"port": 50051}}, "metrics.port: 50051 is also coordinator.port"),
    ("metrics port on the HTTP port", {"metrics": {"port": 8000}}, "metrics.port: 8000 is also coordinator.http.port"),
    ("metrics port on the TP group port", {"metrics": {"port": 7070}}, "metrics.port: 7070 is also workers.tpPort"),
    ("metrics path (the services serve /metrics only)", {"metrics": {"path": "/stats"}}, "path"),
    ("ServiceMonitor interval not a duration", {"metrics": {"serviceMonitor": {"interval": "30"}}}, "/metrics/serviceMonitor/interval"),
]


@test
def bad_values_refused_naming_the_value():
    """Each bad value is refused by the values schema or a template `fail`, and the message
    names the value."""
    for what, values, name in BAD_VALUES:
        try:
            render(values)
        except (helm.HelmValuesError, helm.HelmRenderError) as e:
            assert name in str(e), f"{what}: the message does not name {name!r}: {e}"
        else:
            raise AssertionError(f"{what}: rendered without complaint")
    # And the good neighbours of those values render.
    for values in [
        {"workers": {"groups": [{"name": "g0", "tp": 3, "gpusPerPod": 1}]}},
        {"workers": {"groups": [{"name": "g0", "tp": 3, "gpusPerPod": 3}]}},
        {"workers": {"groups": [{"name": "g0", "tp": 2, "count": 3}]}},
        {"etcd": {"replicas": 3, "persistence": {"enabled": True}}},
        {"metrics": {"port": 8000}, "coordinator": {"http": {"enabled": False}}},
        {"metrics": {"enabled": False, "port": 50051}},
    ]:
        render(values)


# ---- the binaries know every flag ---------------------------------------------------------


def binaries_ready():
    return all((BIN_DIR / b).exists() for b in ("eagle", "eagle-coordinator", "eagle-draft", "eagle-worker"))


def help_flags(binary, *sub):
    out = subprocess.run([str(BIN_DIR / binary), *sub, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


@test
def every_flag_is_known_to_its_binary():
    """Every --flag the chart passes (defaults and all examples, GPU ones included) is one the
    binary lists in its --help, and every fetched model is in `eagle fetch --list`."""
    assert binaries_ready(), f"no release binaries in {BIN_DIR} (cargo build --release --workspace)"
    known = {b: help_flags(b) for b in ("eagle-coordinator", "eagle-draft", "eagle-worker")}
    known["eagle fetch"] = help_flags("eagle", "fetch")
    registry = subprocess.run([str(BIN_DIR / "eagle"), "fetch", "--list"], capture_output=True, text=True, timeout=60).stdout.split()
    for label, _, docs in all_renders():
        for w in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
            for c in containers(w):
                argv = c.get("command", []) + c.get("args", [])
                if argv[0] == "etcd":
                    continue
                if argv[0] == "flock":
                    assert argv[4] in registry, f"{label}: `eagle fetch {argv[4]}`: not in the registry {registry}"
                    continue
                binary = argv[0] if argv[0] != "/bin/sh" else argv[4]
                flags = {a for a in argv if a.startswith("--")}
                unknown = flags - known[binary]
                assert not unknown, f"{label}: {binary} does not know {sorted(unknown)}"


# ---- the chart's commands start a real cluster ------------------------------------------

PROMPT = "Why is the sky blue?"
MAX_NEW = 48


def eagle_home():
    return pathlib.Path(os.environ.get("EAGLE_HOME") or pathlib.Path.home() / ".cache" / "eagle")


def run_local_cluster(values, label, deadline_s=240.0):
    """Starts the render of `values` as local processes; returns (cluster, coordinator address,
    the client's JSON, the engine's JSON)."""
    assert binaries_ready(), f"no release binaries in {BIN_DIR}"
    for tool in ("etcd", "flock"):
        assert shutil.which(tool), f"{tool} is not on PATH (Debian etcd-server, util-linux)"
    docs = manifests(render(values))
    cluster = LocalCluster(docs, eagle_home(), domain="cluster.local")
    t0 = time.monotonic()
    deadline = t0 + deadline_s
    seen = []
    try:
        etcd_pods = [p for p in cluster.pods if p.labels["app.kubernetes.io/component"] == "etcd"]
        others = [p for p in cluster.pods if p not in etcd_pods]
        assert etcd_pods, f"{label}: no bundled etcd"
        for p in etcd_pods:
            cluster.start(p)
        for p in etcd_pods:
            seen += cluster.wait_probe(p, "readiness", time.monotonic() + 30)
        # Init containers (the real `eagle fetch`: idempotent, so a second pod's is quick).
        for p in others:
            cluster.run_init(p, timeout=max(30.0, deadline - time.monotonic()))
        for p in others:
            cluster.start(p)
        for p in others:
            seen += cluster.wait_probe(p, "startup", deadline)
        for p in others:
            seen += cluster.wait_probe(p, "readiness", deadline)
            seen += cluster.wait_probe(p, "liveness", deadline)
        coord_svc = "demo-eagle-serve-coordinator"
        port = cluster.services[coord_svc]["spec"]["ports"][0]["port"]
        addr = cluster.service_addr(coord_svc, port)
        client = subprocess.run(
            [str(BIN_DIR / "eagle"), "client", "--addr", addr, "--chat", "--prompt", PROMPT,
             "--max-new-tokens", str(MAX_NEW), "--json"],
            capture_output=True, text=True, timeout=max(10.0, deadline - time.monotonic()),
        )
        assert client.returncode == 0, f"eagle client failed: {client.stderr[-2000:]}"
        got = json.loads(client.stdout.strip().splitlines()[-1])
        # The engine in-process, with the model, head and dtype the chart gave the services.
        worker = next(p for p in others if p.labels["app.kubernetes.io/component"] == "worker")
        draft = next(p for p in others if p.labels["app.kubernetes.io/component"] == "draft")
        wargv, _ = cluster.command_of(worker, worker.spec["containers"][0])
        dargv, _ = cluster.command_of(draft, draft.spec["containers"][0])
        dtype = arg(wargv, "--dtype")
        if dtype in ("auto", "q8_0") and "--tp" in wargv and int(arg(wargv, "--tp")) > 1:
            # Tensor-parallel ranks load dense bf16 slices under auto (eagle-worker --help).
            dtype = "bf16"
        ref = subprocess.run(
            [str(BIN_DIR / "eagle"), "generate", "--model", arg(wargv, "--model"), "--head", arg(dargv, "--head"),
             "--dtype", dtype, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW), "--json"],
            capture_output=True, text=True, timeout=max(10.0, deadline - time.monotonic()),
            env={**os.environ, "EAGLE_HOME": str(eagle_home())},
        )
        assert ref.returncode == 0, f"eagle generate failed: {ref.stderr[-2000:]}"
        want = json.loads(ref.stdout.strip().splitlines()[-1])
        # Membership as the chart named it: cluster name and group in etcd.
        etcd_addr = cluster.service_addr("demo-eagle-serve-etcd", 2379)
        status = subprocess.run(
            [str(BIN_DIR / "eagle"), "cluster", "status", "--etcd", f"http://{etcd_addr}", "--cluster", "demo", "--json"],
            capture_output=True, text=True, timeout=30,
        )
        assert status.returncode == 0, status.stderr[-2000:]
        return cluster, seen, got, want, json.loads(status.stdout), time.monotonic() - t0
    except BaseException:
        print(cluster.dump_logs(), file=sys.stderr)
        cluster.stop(grace=2)
        cluster.cleanup()
        raise


@contextlib.contextmanager
def stopped_after(cluster):
    """Runs a test's checks on a started local cluster: on failure prints its logs; always
    stops and cleans it; then requires that no process needed SIGKILL."""
    try:
        yield
    except BaseException:
        print(cluster.dump_logs(), file=sys.stderr)
        raise
    finally:
        killed = cluster.stop(grace=15)
        cluster.cleanup()
    assert not killed, f"needed SIGKILL: {killed}"


@test
def cpu_demo_commands_start_a_real_cluster():
    """The CPU demo's rendered pods (etcd, the fetch init containers, worker, draft service,
    coordinator) run as local processes from their manifests' commands, arguments and
    environment; all their probes pass; the coordinator answers Generate, and the HTTP API's
    chat completions, with the tokens of `eagle generate` (the in-process engine) on the same
    prompt, with speculation; the worker
    group is registered in etcd under the chart's cluster and group names; every service serves
    /metrics behind its Service's `metrics` port; everything stops on SIGTERM within the grace
    period."""
    cluster, seen, got, want, status, took = run_local_cluster(example_values("cpu-demo"), "cpu-demo")
    with stopped_after(cluster):
        assert got["token_ids"] == want["token_ids"], f"cluster {got['token_ids']} != engine {want['token_ids']}"
        assert len(got["token_ids"]) > 0 and got["text"] == want["text"]
        # The draft service, found through etcd, took part: fewer target steps than tokens.
        assert got["stats"]["steps"] < len(got["token_ids"]), f"no speculation: {got['stats']}"
        blob = json.dumps(status)
        assert '"g0"' in blob and '"worker"' in blob and '"draft"' in blob, blob[:2000]
        probes = [s for s in seen if "grpc" in s]
        assert len(probes) >= 9, seen  # 3 kinds x coordinator, draft, worker
        assert any("'eagle.etcd': SERVING" in s for s in probes), probes
        # The coordinator's HTTP API, through its Service's `http` port, answers the same tokens.
        svc = cluster.services["demo-eagle-serve-coordinator"]
        http_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
        http = cluster.service_addr("demo-eagle-serve-coordinator", http_port)
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_NEW, "temperature": 0}
        req = urllib.request.Request(f"http://{http}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
        assert answer["eagle"]["token_ids"] == want["token_ids"], answer
        # Every service's /metrics through its Service's `metrics` port (the coordinator's
        # headless metrics Service), in OpenMetrics, from the binary the chart named.
        for svc_name, metric in [("demo-eagle-serve-coordinator-metrics", "eagle_time_to_first_token_seconds_bucket"),
                                 ("demo-eagle-serve-draft", "eagle_step_duration_seconds_bucket"),
                                 ("demo-eagle-serve-worker-g0", "eagle_kv_cache_capacity_bytes")]:
            svc = cluster.services[svc_name]
            port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "metrics")
            req = urllib.request.Request(f"http://{cluster.service_addr(svc_name, port)}/metrics",
                                         headers={"Accept": "application/openmetrics-text;version=1.0.0"})
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read().decode()
            assert body.endswith("# EOF\n"), f"{svc_name}: not OpenMetrics: {body[-300:]!r}"
            assert f"\n{metric}" in body and "\neagle_build_info{" in body, f"{svc_name}: no {metric} or eagle_build_info"
    print(f"    {len(got['token_ids'])} tokens identical, {got['stats']['steps']} steps "
          f"(mean accepted {got['stats']['mean_accepted']:.2f}), "
          f"{len(seen)} probes passed, {took:.1f} s to answer")


@test
def pod_per_rank_group_starts_through_etcd_rendezvous():
    """The pod-per-rank layout (TP 3, one rank per pod, rank = pod ordinal) started from its
    rendered commands: rank 0 waits with --tp-no-spawn, ranks 1 and 2 find it through the etcd
    rendezvous, the group serves, and the coordinator's tokens equal the engine's."""
    values = deep_merge(example_values("cpu-demo"), {"workers": {"groups": [{"name": "g0", "tp": 3, "gpusPerPod": 1}]}})
    cluster, seen, got, want, status, took = run_local_cluster(values, "pod-per-rank")
    with stopped_after(cluster):
        assert len([p for p in cluster.pods if p.labels["app.kubernetes.io/component"] == "worker"]) == 3
        assert got["token_ids"] == want["token_ids"], f"cluster {got['token_ids']} != engine {want['token_ids']}"
        ranks = sorted(m.get("rank") for m in status.get("members", []) if m.get("kind") == "worker")
        assert ranks == [0, 1, 2], status
    print(f"    3 ranks in 3 pods, {len(got['token_ids'])} tokens identical, {took:.1f} s to answer")


# ---- runner -------------------------------------------------------------------------------


def main(argv):
    selected = [t for t in TESTS if not argv or any(a in t.__name__ for a in argv)]
    passed = failed = 0
    t_all = time.monotonic()
    print(f"helm chart tests: {CHART.relative_to(REPO)}, helm-python-sdk (Helm {helm.helm_sdk_version()}), "
          f"Kubernetes schemas {', '.join(KUBE_VERSIONS)}")
    for t in selected:
        t0 = time.monotonic()
        try:
            t()
        except Exception as e:  # noqa: BLE001
            failed += 1
            detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc()
            print(f"FAIL {t.__name__} ({time.monotonic() - t0:.1f} s): {detail}")
        else:
            passed += 1
            print(f"ok   {t.__name__} ({time.monotonic() - t0:.1f} s)")
    print(f"{len(selected)} chart tests in {time.monotonic() - t_all:.0f} s")
    print(f"helm: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
