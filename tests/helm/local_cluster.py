"""Starts a rendered release as local processes: each pod's init containers, then its
containers, with the command, arguments and environment taken from the manifests.

What stands in for Kubernetes, and nothing more:
- the kubelet's `$(VAR)` expansion of command and arguments, with the downward API's values
  (metadata.name, metadata.namespace, status.podIP = 127.0.0.1);
- DNS and Services: every container port of every pod gets a free loopback port, and
  `<service>.<ns>.svc.<domain>:PORT` / `<pod>.<headless>.<ns>.svc.<domain>:PORT`,
  `0.0.0.0:PORT` and the pod's own IP are rewritten to `127.0.0.1:<that port>`;
- volumes: each container's mount paths are mapped to local directories (the model volume to
  EAGLE_HOME, emptyDirs to fresh temporary directories), and the image's files to the
  repository (binaries from target/release on PATH, /opt/eagle/heads to heads/);
- probes: gRPC probes are grpc.health.v1 Check calls on the mapped port with the probe's
  service name, httpGet and tcpSocket probes likewise.

Only loopback addresses are used; a rendered host name that maps to no pod fails the test.
Every process runs in its own process group and is killed at the end, bounded in time.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chart import NAMESPACE, REPO

# Files the eagle image holds (deploy/docker), and where they are in this checkout.
IMAGE_PATHS = {"/opt/eagle/heads": REPO / "heads"}
BIN_DIR = REPO / "target" / "release"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass
class Pod:
    name: str
    workload: dict[str, Any]
    labels: dict[str, str]
    spec: dict[str, Any]
    subdomain: str | None  # the governing Service of a StatefulSet pod
    ports: dict[int, int] = field(default_factory=dict)  # container port -> local port
    named: dict[str, int] = field(default_factory=dict)  # port name -> container port
    dirs: dict[str, pathlib.Path] = field(default_factory=dict)  # volume name -> local dir
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)


class LocalCluster:
    def __init__(self, docs: list[dict[str, Any]], eagle_home: pathlib.Path, domain: str):
        self.docs = docs
        self.eagle_home = eagle_home
        self.domain = domain
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="eagle-helm-"))
        self.pods: list[Pod] = []
        self.services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        for d in docs:
            if d["kind"] not in ("Deployment", "StatefulSet"):
                continue
            name = d["metadata"]["name"]
            tmpl = d["spec"]["template"]
            for i in range(d["spec"].get("replicas", 1)):
                sts = d["kind"] == "StatefulSet"
                pod = Pod(
                    name=f"{name}-{i}" if sts else f"{name}-local{i}",
                    workload=d,
                    labels=tmpl["metadata"].get("labels", {}),
                    spec=tmpl["spec"],
                    subdomain=d["spec"]["serviceName"] if sts else None,
                )
                for c in pod.spec.get("initContainers", []) + pod.spec["containers"]:
                    for p in c.get("ports", []):
                        pod.ports[p["containerPort"]] = free_port()
                        if "name" in p:
                            pod.named[p["name"]] = p["containerPort"]
                for v in pod.spec.get("volumes", []):
                    if v["name"] == "models" or "persistentVolumeClaim" in v:
                        pod.dirs[v["name"]] = eagle_home
                    else:
                        d_ = self.work / pod.name / v["name"]
                        d_.mkdir(parents=True)
                        pod.dirs[v["name"]] = d_
                for t in d["spec"].get("volumeClaimTemplates", []):
                    d_ = self.work / pod.name / t["metadata"]["name"]
                    d_.mkdir(parents=True)
                    pod.dirs[t["metadata"]["name"]] = d_
                self.pods.append(pod)
        self.logs: list[pathlib.Path] = []

    # ---- names and addresses -------------------------------------------------------------

    def pod(self, prefix: str) -> Pod:
        for p in self.pods:
            if p.name.startswith(prefix):
                return p
        raise KeyError(prefix)

    def service_pods(self, svc: dict[str, Any]) -> list[Pod]:
        sel = svc["spec"].get("selector", {})
        return [p for p in self.pods if labels_match(sel, p.labels)]

    def container_port(self, pod: Pod, target: int | str) -> int:
        return pod.named[target] if isinstance(target, str) else int(target)

    def service_addr(self, name: str, port: int) -> str:
        """The loopback address that `<name>:<port>` (a Service) reaches."""
        svc = self.services[name]
        for sp in svc["spec"]["ports"]:
            if sp["port"] == port:
                pods = self.service_pods(svc)
                if not pods:
                    raise AssertionError(f"Service {name} selects no pod")
                target = self.container_port(pods[0], sp.get("targetPort", port))
                if target not in pods[0].ports:
                    raise AssertionError(f"Service {name}:{port} targets port {target}, which pod {pods[0].name} does not declare")
                return f"127.0.0.1:{pods[0].ports[target]}"
        raise AssertionError(f"Service {name} has no port {port}")

    def resolve(self, host: str, port: int) -> str:
        suffix = f".{NAMESPACE}.svc.{self.domain}"
        if not host.endswith(suffix):
            raise AssertionError(f"{host}: not a name in namespace {NAMESPACE}")
        parts = host[: -len(suffix)].split(".")
        if len(parts) == 1:
            return self.service_addr(parts[0], port)
        if len(parts) == 2:  # <pod>.<governing service>
            for p in self.pods:
                if p.name == parts[0] and p.subdomain == parts[1]:
                    if port not in p.ports:
                        raise AssertionError(f"{host}:{port}: pod {p.name} declares no port {port}")
                    return f"127.0.0.1:{p.ports[port]}"
        raise AssertionError(f"{host}: no such Service or StatefulSet pod in the render")

    # ---- the kubelet's part --------------------------------------------------------------

    def env_of(self, pod: Pod, c: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = self.expand(str(e["value"]), env)
            else:
                ref = e["valueFrom"]["fieldRef"]["fieldPath"]
                env[e["name"]] = {
                    "metadata.name": pod.name,
                    "metadata.namespace": NAMESPACE,
                    "status.podIP": "127.0.0.1",
                }[ref]
        return env

    @staticmethod
    def expand(s: str, env: dict[str, str]) -> str:
        """Kubernetes' $(VAR) expansion ($$ escapes; unknown names stay as written)."""

        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            return env.get(m.group(1), m.group(0))

        return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, s)

    def rewrite(self, pod: Pod, c: dict[str, Any], s: str, env: dict[str, str]) -> str:
        s = self.expand(s, env)
        # The pod's own listening addresses.
        s = re.sub(
            r"\b(?:0\.0\.0\.0|127\.0\.0\.1):(\d+)\b",
            lambda m: f"127.0.0.1:{pod.ports[int(m.group(1))]}" if int(m.group(1)) in pod.ports else m.group(0),
            s,
        )
        # Cluster DNS names.
        s = re.sub(
            r"\b([a-z0-9][a-z0-9.-]*\.svc\." + re.escape(self.domain) + r"):(\d+)\b",
            lambda m: self.resolve(m.group(1), int(m.group(2))),
            s,
        )
        # Volumes, then the image's own files.
        mounts = [(m["mountPath"], pod.dirs[m["name"]]) for m in c.get("volumeMounts", []) if m["name"] in pod.dirs]
        for path, local in sorted(mounts + list(IMAGE_PATHS.items()), key=lambda x: -len(x[0])):
            path = path.rstrip("/")
            if s == path or s.startswith(path + "/"):
                s = str(local) + s[len(path):]
                break
        return s

    def command_of(self, pod: Pod, c: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        env = self.env_of(pod, c)
        argv = [self.rewrite(pod, c, a, env) for a in c.get("command", []) + c.get("args", [])]
        env = {k: self.rewrite(pod, c, v, env) for k, v in env.items()}
        for s in argv + list(env.values()):
            if ".svc." in s or "0.0.0.0" in s:
                raise AssertionError(f"{pod.name}/{c['name']}: {s!r} still names a non-loopback address")
        env["PATH"] = f"{BIN_DIR}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        return argv, env

    def spawn(self, pod: Pod, c: dict[str, Any]) -> subprocess.Popen:
        argv, env = self.command_of(pod, c)
        log = self.work / f"{pod.name}.{c['name']}.log"
        self.logs.append(log)
        with open(log, "w") as f:
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            return subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run_init(self, pod: Pod, timeout: float) -> None:
        for c in pod.spec.get("initContainers", []):
            p = self.spawn(pod, c)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                raise AssertionError(f"init container {pod.name}/{c['name']} ran past {timeout:.0f} s")
            if rc != 0:
                raise AssertionError(f"init container {pod.name}/{c['name']} exited {rc}:\n{self.tail(self.logs[-1])}")

    def start(self, pod: Pod) -> None:
        for c in pod.spec["containers"]:
            pod.procs.append((c["name"], self.spawn(pod, c)))

    # ---- probes ---------------------------------------------------------------------------

    def probe(self, pod: Pod, spec: dict[str, Any]) -> tuple[bool, str]:
        """One probe, as the kubelet runs it; (passed, what was seen)."""
        if "grpc" in spec:
            port = pod.ports[spec["grpc"]["port"]]
            service = spec["grpc"].get("service", "")
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=spec.get("timeoutSeconds", 1)
                    )
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                return r.status == health_pb2.HealthCheckResponse.SERVING, f"grpc {port} {service!r}: {status}"
            except grpc.RpcError as e:
                return False, f"grpc {port} {service!r}: {e.code().name}"
        if "httpGet" in spec:
            port = pod.ports[self.container_port(pod, spec["httpGet"]["port"])]
            url = f"http://127.0.0.1:{port}{spec['httpGet'].get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=spec.get("timeoutSeconds", 1)) as r:
                    return 200 <= r.status < 400, f"GET {url}: {r.status}"
            except OSError as e:
                return False, f"GET {url}: {e}"
        if "tcpSocket" in spec:
            port = pod.ports[self.container_port(pod, spec["tcpSocket"]["port"])]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True, f"tcp {port}: open"
            except OSError as e:
                return False, f"tcp {port}: {e}"
        raise AssertionError(f"unsupported probe {spec}")

    def wait_probe(self, pod: Pod, kind: str, deadline: float) -> list[str]:
        """Waits until every container's `kind` probe passes; returns what was seen."""
        seen = []
        for c in pod.spec["containers"]:
            spec = c.get(f"{kind}Probe")
            if not spec:
                continue
            while True:
                for other in self.pods:  # a container that died fails the wait at once
                    self.check_alive(other)
                ok, what = self.probe(pod, spec)
                if ok:
                    seen.append(f"{pod.name}/{c['name']} {kind}: {what}")
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{pod.name}/{c['name']} {kind} probe never passed: {what}")
                time.sleep(0.5)
        return seen

    def check_alive(self, pod: Pod) -> None:
        for name, p in pod.procs:
            if p.poll() is not None:
                log = next(l for l in self.logs if l.name == f"{pod.name}.{name}.log")
                raise AssertionError(f"{pod.name}/{name} exited {p.returncode}:\n{self.tail(log)}")

    # ---- the end --------------------------------------------------------------------------

    @staticmethod
    def tail(path: pathlib.Path, n: int = 25) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def dump_logs(self) -> str:
        return "\n".join(f"--- {l.name}\n{self.tail(l)}" for l in self.logs)

    def stop(self, grace: float = 10.0) -> list[str]:
        """SIGTERM every process group, SIGKILL what is left after `grace`; returns the
        containers that needed SIGKILL."""
        procs = [(pod.name, n, p) for pod in self.pods for n, p in pod.procs]
        for _, _, p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        killed = []
        for pod, n, p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(f"{pod}/{n}")
        for _, _, p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group too: ranks a worker started
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return killed

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
