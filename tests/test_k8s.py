"""k8s/ (kustomize), validated offline: core kinds with kubernetes-validate --strict (schemas bundled in the package,
for the Kubernetes versions in k8s_schemas.K8S_VERSIONS), the TrainingRuntime with the vendored Kubeflow CRD schema,
and the references between the objects."""

import subprocess

import pytest
import yaml

import helpers
import k8s_schemas
from alignprop import trainjob

K8S = helpers.ROOT / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
CUSTOM_KINDS = {"TrainingRuntime"}


def objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, for every document of every listed resource file."""
    found = {}
    for name in KUSTOMIZATION["resources"]:
        for doc in k8s_schemas.load_documents(K8S / name):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def generated_secrets() -> dict[str, dict]:
    """The Secrets kustomize's secretGenerator makes from the committed env templates."""
    secrets = {}
    for generator in KUSTOMIZATION["secretGenerator"]:
        data = {}
        for env_file in generator["envs"]:
            for line in (K8S / env_file).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, _, value = line.partition("=")
                    data[key.strip()] = value
        secrets[generator["name"]] = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                      "metadata": {"name": generator["name"]}, "stringData": data}
    return secrets


def test_kustomization_lists_every_manifest_and_only_existing_files():
    manifests = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(KUSTOMIZATION["resources"]) == manifests
    for generator in KUSTOMIZATION["secretGenerator"]:
        for env_file in generator["envs"]:
            assert (K8S / env_file).is_file(), env_file
    assert {p.relative_to(K8S).as_posix() for p in (K8S / "secrets").iterdir()} == \
        {f for g in KUSTOMIZATION["secretGenerator"] for f in g["envs"]}


def test_core_manifests_pass_kubernetes_validate_strict(tmp_path):
    core = [K8S / name for name in KUSTOMIZATION["resources"]
            if not {d["kind"] for d in k8s_schemas.load_documents(K8S / name)} & CUSTOM_KINDS]
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(yaml.safe_dump_all(list(generated_secrets().values())))
    for version in k8s_schemas.K8S_VERSIONS:
        result = subprocess.run([str(helpers.VENV_BIN / "kubernetes-validate"), "--strict", "-k", version,
                                 *map(str, core), str(secrets)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count(" passed for resource ") == len(core) + len(generated_secrets())


def test_strict_validation_rejects_a_typo(tmp_path):
    deployment = objects()[("Deployment", "mlflow")]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicey"] = "Always"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = subprocess.run([str(helpers.VENV_BIN / "kubernetes-validate"), "--strict", "-k",
                             k8s_schemas.K8S_VERSIONS[0], str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "imagePullPolicey" in result.stdout + result.stderr


def test_training_runtime_matches_the_crd_and_what_trainjobs_expect():
    runtime = objects()[("TrainingRuntime", "alignprop")]
    assert k8s_schemas.crd_errors(runtime) == []
    spec = trainjob.TrainJobSpec(config_json="{}", output_uri="s3://b/r", image="i")
    assert runtime["metadata"]["name"] == spec.runtime and runtime["kind"] == spec.runtime_kind
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"  # PET_* are set
    assert "torch" in runtime["spec"]["mlPolicy"]
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == trainjob.NODE
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = job["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == trainjob.NODE and container["command"] == ["alignprop", "launch"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {name for kind, name in objects() if kind == "PersistentVolumeClaim"}


def test_references_between_objects_resolve():
    found = objects()
    kinds = {kind for kind, _ in found}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service", "PersistentVolumeClaim",
            "ConfigMap", "TrainingRuntime"} <= kinds
    binding = found[("RoleBinding", "alignprop-pipeline")]
    assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in found
    for subject in binding["subjects"]:
        assert (subject["kind"], subject["name"]) in found and subject["namespace"] == KUSTOMIZATION["namespace"]
    deployment, service = found[("Deployment", "mlflow")], found[("Service", "mlflow")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    pod = deployment["spec"]["template"]["spec"]
    for volume in pod["volumes"]:
        assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in found
    for source in pod["containers"][0]["envFrom"]:
        if "configMapRef" in source:
            assert ("ConfigMap", source["configMapRef"]["name"]) in found
        else:
            assert source["secretRef"]["name"] in generated_secrets()
    # every image is the project image, so `kustomize edit set image alignprop=...` sets them all
    images = {c["image"] for obj in found.values() for c in _containers(obj)}
    assert images == {image["name"] for image in KUSTOMIZATION["images"]} == {"alignprop"}


def _containers(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


def test_role_is_least_privilege():
    rules = objects()[("Role", "alignprop-pipeline")]["rules"]
    granted = {(group, resource): set(rule["verbs"]) for rule in rules for group in rule["apiGroups"]
               for resource in rule["resources"]}
    assert granted[("trainer.kubeflow.org", "trainjobs")] >= {"create", "get", "watch"}
    assert granted[("", "pods/log")] == {"get"}
    assert "create" not in granted[("", "pods")] and "delete" not in granted[("", "pods")]
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        if "secrets" in rule["resources"]:  # only named secrets, only read
            assert rule["verbs"] == ["get"] and set(trainjob.SECRET_ENV) <= set(rule["resourceNames"])
    assert not any(o["kind"].startswith("Cluster") for o in objects().values())  # nothing cluster-wide


def test_secret_templates_hold_every_key_and_no_value():
    secrets = generated_secrets()
    for name, keys in trainjob.SECRET_ENV.items():
        assert set(secrets[name]["stringData"]) == set(keys)
        assert all(value == "" for value in secrets[name]["stringData"].values()), f"{name} holds a value"


@pytest.mark.parametrize("host", ["mlflow:5000", "mlflow.alignprop:5000", "mlflow.alignprop.svc.cluster.local:5000"])
def test_mlflow_server_accepts_its_service_names(host):
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = objects()[("ConfigMap", "alignprop-config")]["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert is_allowed_host_header(allowed, host)
    assert not is_allowed_host_header(allowed, "evil.example.com")
