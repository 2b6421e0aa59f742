"""Rendering the chart with Helm's own engine (helm-python-sdk: Helm v4 as libhelm_c.so) and
reading the result.

Nothing here renders templates itself: `render` is `helm template` (schema validation, then
the chart's templates, as an install would), `lint` is `helm lint`.
"""

from __future__ import annotations

import pathlib
from typing import Any

import helm_python as helm
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "eagle-serve"
EXAMPLES = CHART / "examples"
RELEASE = "demo"
NAMESPACE = "eagle"


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES.glob("*.yaml"))


def example_values(name: str) -> dict[str, Any]:
    """An example's values file, parsed by Helm's own YAML reader (as `-f FILE` is)."""
    return helm.values_from_yaml((EXAMPLES / f"{name}.yaml").read_text())


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`-f a.yaml -f b.yaml` composition: maps merge, everything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """`helm template demo helm/eagle-serve -n eagle [-f values]`: template path -> text.
    Raises helm_python's HelmValuesError (schema) or HelmRenderError (a template's `fail`)."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """`helm lint --strict helm/eagle-serve [-f values]`."""
    return helm.lint(CHART, values, strict=True, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render (NOTES.txt left out)."""
    docs = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template__"] = path
                docs.append(doc)
    return docs


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    """A document as the API server would get it (without our bookkeeping key)."""
    return {k: v for k, v in doc.items() if k != "__template__"}


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def by_name(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in of_kind(docs, kind):
        if d["metadata"]["name"] == name:
            return d
    raise KeyError(f"no {kind} named {name}")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return (spec.get("initContainers", []) if init else []) + spec["containers"]
