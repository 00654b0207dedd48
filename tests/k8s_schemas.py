"""Offline validation of Kubernetes objects: core kinds with kubernetes-validate (its bundled schemas, strict), custom
resources with the vendored Kubeflow CRD schemas (tests/data/k8s-crds/, see its README)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

CRD_DIR = Path(__file__).parent / "data" / "k8s-crds"
CRD_FILES = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.yaml",
}
# Kubernetes versions the core manifests must be valid for: the oldest a current Kubeflow release supports, and the
# newest kubernetes-validate bundles (both offline, from the package's own schema files).
K8S_VERSIONS = ("1.31.0", "1.37.0")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


def strict(schema: dict) -> dict:
    """A copy of a CRD schema that rejects unknown fields wherever it lists an object's properties, as the API
    server does for `kubectl apply --validate=strict` (it would otherwise prune them silently)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    group, version = api_version.split("/")
    crd = yaml.load((CRD_DIR / CRD_FILES[(api_version, kind)]).read_text(), Loader=_Loader)
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(served["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def crd_errors(obj: dict) -> list[str]:
    """Schema violations of a custom resource (empty when valid), each with its path."""
    validator = crd_validator(obj["apiVersion"], obj["kind"])
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]
    name = (obj.get("metadata") or {}).get("name", "")
    if not name or len(name) > 63:
        errors.append(f"metadata/name: {name!r} is not a valid object name")
    return errors
