"""Multi-node training as a Kubeflow Trainer v2 TrainJob (`trainer.kubeflow.org/v1alpha1`): build, submit, wait,
stream the logs, collect the adapter.

    spec = TrainJobSpec(config_json=config.to_json(), output_uri="s3://bucket/runs", image="REGISTRY/alignprop:0.1.0",
                        nodes=2)
    adapter_dir = run_trainjob(spec, "outputs/adapter", timeout_s=6 * 3600)

Every node runs the project image's `alignprop launch` (alignprop.launch), which turns the PET_* variables the
Trainer sets into `accelerate launch --num_machines ... -m alignprop.cli train --config ...`. The config travels
in the ALIGNPROP_TRAIN_CONFIG variable. With an s3:// output, each node trains into a node-local directory and
node 0 publishes the finished run to `<output_uri>/<job name>` (alignprop.cache.publish_dir); with a path on a
volume every node mounts (a ReadWriteMany PVC), the nodes train there directly.

Submission goes through the Kubernetes client's CustomObjectsApi, not the Kubeflow SDK's TrainerClient, because:
the TrainJob is a plain dict built here, so tests validate the very object that is sent against the vendored CRD
schema, offline; TrainerClient.train() reads the runtime from the API server before it builds anything, exposes
the node command only through its options, and reports failures as bare RuntimeErrors; and the CustomObjectsApi
path needs nothing beyond `kubernetes` (already a kfp dependency) plus RBAC on trainjobs and pods in ONE namespace
(k8s/role.yaml), where TrainerClient also lists runtimes.
"""

from __future__ import annotations

import collections
import logging
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from alignprop.errors import UserError

logger = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
PLURAL = "trainjobs"
NODE = "node"  # replicated job and container name of a torch TrainingRuntime (PET_* go into this container)
PATCH_MANAGER = "alignprop"  # owner of our runtimePatches entry
CONFIG_ENV = "ALIGNPROP_TRAIN_CONFIG"  # alignprop.launch reads the config from here
NODE_OUTPUT_DIR = "/tmp/alignprop/run"  # where each node trains when the run is published to S3
# Secrets every node reads (keys become variables of the same name; optional, so an absent key is simply unset).
# The values live in the cluster only (k8s/secrets/); a TrainJob holds their names.
SECRET_ENV = {
    "alignprop-s3": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"],
    "alignprop-mlflow": ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"],
}
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")  # DNS-1035, short enough for the pod names derived


class TrainJobError(UserError):
    """A TrainJob could not be built, submitted or collected, or it failed; the message says why and what to do."""


class TrainJobTimeout(TrainJobError):
    """The TrainJob did not finish in time (it has been deleted so its nodes are released)."""


@dataclass
class TrainJobSpec:
    config_json: str  # TrainConfig.to_json(); its output_dir is replaced (see output_uri)
    output_uri: str  # s3:// prefix (the run is published to <output_uri>/<name>), or a path on a shared volume
    image: str  # the project image, e.g. registry/alignprop:0.1.0
    nodes: int = 2  # TrainJob numNodes
    procs_per_node: int = 1  # training processes per node (one per GPU)
    accelerators_per_node: int = 1  # GPUs requested per node (0: CPU only)
    accelerator_resource: str = "nvidia.com/gpu"  # extended resource name of the accelerator
    cpu: str = ""  # CPU request and limit per node, e.g. "8" ("" leaves it to the runtime)
    memory: str = ""  # memory request and limit per node, e.g. "64Gi"
    name: str = ""  # TrainJob name; "" = alignprop-<8 random hex digits>
    namespace: str = "alignprop"
    runtime: str = "alignprop"  # the TrainingRuntime (k8s/training-runtime.yaml)
    runtime_kind: str = "TrainingRuntime"  # or ClusterTrainingRuntime
    strategy: str = "ddp"  # alignprop launch --strategy: ddp or deepspeed_zero2
    env: dict[str, str] = field(default_factory=dict)  # extra plain variables (never secret values)
    secret_env: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in SECRET_ENV.items()})
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)  # Kubernetes toleration objects
    volumes: dict[str, str] = field(default_factory=dict)  # PVC claim name -> mount path on every node
    deadline_s: int = 0  # activeDeadlineSeconds: the Trainer stops the job after this long (0: no limit)

    def __post_init__(self):
        if not self.name:
            self.name = f"alignprop-{uuid.uuid4().hex[:8]}"

    @property
    def published(self) -> bool:
        from alignprop.storage import is_s3

        return is_s3(self.output_uri)

    @property
    def run_uri(self) -> str:
        """Where the finished run ends up: <output_uri>/<name> for S3, the shared path itself otherwise."""
        return f"{self.output_uri.rstrip('/')}/{self.name}" if self.published else self.output_uri

    def validate(self) -> "TrainJobSpec":
        from alignprop.config import TrainConfig

        if not NAME_RE.match(self.name):
            raise TrainJobError(f"TrainJob name {self.name!r} must be a DNS-1035 label of at most 40 characters "
                                "(lower-case letters, digits, '-', starting with a letter)")
        if self.nodes < 1 or self.procs_per_node < 1 or self.accelerators_per_node < 0:
            raise TrainJobError(f"nodes={self.nodes}, procs_per_node={self.procs_per_node} must be >= 1 and "
                                f"accelerators_per_node={self.accelerators_per_node} >= 0")
        if not self.image:
            raise TrainJobError("no image: pass the project image (built from the Dockerfile) every node runs")
        TrainConfig.from_json(self.config_json).validate()
        if not self.published and not any(_inside(self.output_uri, m) for m in self.volumes.values()):
            raise TrainJobError(
                f"output {self.output_uri!r} is neither an s3:// prefix nor on a volume every node mounts "
                f"({', '.join(self.volumes.values()) or 'none given'}): node 0's adapter would stay on its own "
                "disk. Use s3://bucket/prefix, or a path under a ReadWriteMany PVC passed in volumes")
        for secret, keys in self.secret_env.items():
            for key in keys:
                if key in self.env:
                    raise TrainJobError(f"{key} is set both as a plain variable and from secret {secret}; keep "
                                        "credentials in the secret only")
        return self


def _inside(path: str, mount: str) -> bool:
    return Path(path) == Path(mount) or Path(mount) in Path(path).parents


# ---------------------------------------------------------------------------------------------------------------
# Building the object
# ---------------------------------------------------------------------------------------------------------------
def build_trainjob(spec: TrainJobSpec) -> dict:
    """The TrainJob custom object (a plain dict, ready for CustomObjectsApi or `kubectl apply`)."""
    import json

    spec.validate()
    config = json.loads(spec.config_json)
    config["output_dir"] = NODE_OUTPUT_DIR if spec.published else spec.output_uri
    args = ["--strategy", spec.strategy]
    if spec.published:
        args += ["--publish", spec.run_uri]
    env = [{"name": CONFIG_ENV, "value": json.dumps(config, sort_keys=True)}]
    env += [{"name": k, "value": str(v)} for k, v in sorted(spec.env.items())]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for secret, keys in sorted(spec.secret_env.items()) for key in keys]
    trainer = {"image": spec.image, "command": ["alignprop", "launch"], "args": args, "env": env,
               "numNodes": spec.nodes, "numProcPerNode": spec.procs_per_node}
    resources = _resources(spec)
    if resources:
        trainer["resourcesPerNode"] = resources
    body = {"runtimeRef": {"apiGroup": GROUP, "kind": spec.runtime_kind, "name": spec.runtime}, "trainer": trainer}
    pod_patch = _pod_patch(spec)
    if pod_patch:
        replicated_job = {"name": NODE, "template": {"spec": {"template": {"spec": pod_patch}}}}
        body["runtimePatches"] = [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {
            "template": {"spec": {"replicatedJobs": [replicated_job]}}}}]
    if spec.deadline_s:
        body["activeDeadlineSeconds"] = spec.deadline_s
    metadata = {"name": spec.name, "namespace": spec.namespace,
                "labels": {"app.kubernetes.io/part-of": "alignprop", "app.kubernetes.io/component": "train"}}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": body}


def _resources(spec: TrainJobSpec) -> dict:
    limits, requests = {}, {}
    if spec.accelerators_per_node:
        limits[spec.accelerator_resource] = spec.accelerators_per_node
    for name, value in (("cpu", spec.cpu), ("memory", spec.memory)):
        if value:
            limits[name] = requests[name] = value
    return {k: v for k, v in (("limits", limits), ("requests", requests)) if v}


def _pod_patch(spec: TrainJobSpec) -> dict:
    patch = {}
    if spec.node_selector:
        patch["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        patch["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.volumes:
        names = {claim: f"pvc-{i}" for i, claim in enumerate(sorted(spec.volumes))}
        patch["volumes"] = [{"name": names[c], "persistentVolumeClaim": {"claimName": c}} for c in sorted(names)]
        patch["containers"] = [{"name": NODE, "volumeMounts": [
            {"name": names[c], "mountPath": spec.volumes[c]} for c in sorted(names)]}]
    return patch


def to_yaml(trainjob: dict) -> str:
    import yaml

    return yaml.safe_dump(trainjob, sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# Talking to the cluster
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class KubeClients:
    custom: object  # kubernetes.client.CustomObjectsApi (or a stand-in with the same methods)
    core: object  # kubernetes.client.CoreV1Api


def kube_clients() -> KubeClients:
    """In-cluster credentials (the pod's service account) when running in a pod, else ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError, TypeError) as e:
            raise TrainJobError(f"no Kubernetes credentials: not in a pod, and no usable kubeconfig ({e}); "
                                "set KUBECONFIG or run inside the cluster") from None
    return KubeClients(client.CustomObjectsApi(), client.CoreV1Api())


def current_namespace(default: str = "alignprop") -> str:
    """The pod's own namespace (from its service-account mount), else `default`."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else default


def submit(trainjob: dict, clients: KubeClients) -> str:
    """Create the TrainJob; returns its name. API errors become TrainJobErrors naming the likely fix."""
    namespace, name = trainjob["metadata"]["namespace"], trainjob["metadata"]["name"]
    try:
        clients.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, trainjob)
    except Exception as e:  # kubernetes.client.ApiException, or a transport error
        raise _api_error(e, f"create TrainJob {namespace}/{name}") from e
    logger.info("submitted TrainJob %s/%s (%d nodes x %d processes)", namespace, name,
                trainjob["spec"]["trainer"]["numNodes"], trainjob["spec"]["trainer"]["numProcPerNode"])
    return name


def _api_error(e: Exception, action: str) -> TrainJobError:
    status = getattr(e, "status", None)
    hints = {
        403: "the service account lacks the permission: apply k8s/ (Role alignprop-pipeline) and run the pipeline "
             "with --service-account alignprop-pipeline",
        404: "the TrainJob API is missing: install Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1)",
        409: "a TrainJob of that name exists already: pick another name or delete the old one",
        422: "the API server rejected the object: check the TrainingRuntime name and the resource values",
    }
    reason = getattr(e, "reason", None) or type(e).__name__
    hint = hints.get(status, "check that the cluster is reachable")
    return TrainJobError(f"cannot {action}: {status or ''} {reason}".replace("  ", " ") + f"; {hint}")


def trainjob_state(trainjob: dict) -> tuple[str | None, str]:
    """("Complete" | "Failed" | None, reason and message of that condition)."""
    for condition in (trainjob.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            detail = ": ".join(x for x in (condition.get("reason"), condition.get("message")) if x)
            return condition["type"], detail
    return None, ""


def node_pods(clients: KubeClients, namespace: str, name: str) -> list:
    """The job's training pods, node 0 first (JobSet labels; the completion index is the node rank)."""
    selector = f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={NODE}"
    pods = clients.core.list_namespaced_pod(namespace, label_selector=selector).items

    def rank(pod) -> tuple[int, str]:
        labels = pod.metadata.labels or {}
        return int(labels.get("batch.kubernetes.io/job-completion-index", 1 << 30)), pod.metadata.name

    return sorted(pods, key=rank)


class LogFollower:
    """Streams node 0's training log while the job runs (one thread per pod incarnation) and keeps its tail."""

    def __init__(self, clients: KubeClients, namespace: str, name: str, sink: Callable[[str], None] | None = None,
                 keep: int = 200):
        self.clients, self.namespace, self.name = clients, namespace, name
        self.sink = sink or (lambda line: logger.info("[node 0] %s", line))
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.followed: set[str] = set()
        self.thread: threading.Thread | None = None

    def poll(self) -> None:
        """Start following node 0's pod once it has started (again, if it was replaced)."""
        if self.thread is not None and self.thread.is_alive():
            return
        pods = node_pods(self.clients, self.namespace, self.name)
        if not pods or pods[0].status.phase not in ("Running", "Succeeded", "Failed"):
            return
        pod = pods[0].metadata.name
        if pod in self.followed:
            return
        self.followed.add(pod)
        self.thread = threading.Thread(target=self._follow, args=(pod,), daemon=True, name=f"logs-{pod}")
        self.thread.start()

    def _follow(self, pod: str) -> None:
        try:
            response = self.clients.core.read_namespaced_pod_log(
                name=pod, namespace=self.namespace, container=NODE, follow=True, _preload_content=False)
            for line in _lines(response.stream(4096)):
                self.tail.append(line)
                self.sink(line)
        except Exception as e:  # the stream is a convenience: the job's status decides success, not the log
            logger.warning("log stream of %s/%s stopped: %s", self.namespace, pod, e)

    def finish(self, timeout_s: float = 30.0) -> None:
        self.poll()  # a job that finished between two polls: read its log now
        if self.thread is not None:
            self.thread.join(timeout_s)


def _lines(chunks) -> Iterator[str]:
    buffer = b""
    for chunk in chunks:
        buffer += chunk if isinstance(chunk, bytes) else chunk.encode()
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


def wait_for_trainjob(name: str, namespace: str, clients: KubeClients, timeout_s: float, poll_s: float = 10.0,
                      sink: Callable[[str], None] | None = None) -> dict:
    """Poll until the TrainJob is Complete (returns it) or Failed (raises TrainJobError with the Trainer's reason
    and the last log lines of every node), streaming node 0's log meanwhile. After `timeout_s` the job is deleted,
    releasing its nodes, and TrainJobTimeout is raised."""
    deadline = time.monotonic() + timeout_s
    follower = LogFollower(clients, namespace, name, sink)
    while True:
        try:
            trainjob = clients.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as e:
            raise _api_error(e, f"read TrainJob {namespace}/{name}") from e
        state, detail = trainjob_state(trainjob)
        if state is None:
            follower.poll()
        else:
            follower.finish()
            if state == "Complete":
                logger.info("TrainJob %s/%s complete", namespace, name)
                return trainjob
            raise TrainJobError(f"TrainJob {namespace}/{name} failed ({detail or 'no reason given'}).\n"
                                f"{failure_logs(clients, namespace, name)}\nInspect it with: kubectl -n {namespace} "
                                f"describe trainjob {name}")
        if time.monotonic() >= deadline:
            delete_trainjob(name, namespace, clients)
            raise TrainJobTimeout(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f} s and was "
                                  "deleted; raise the timeout, or lower num_steps")
        time.sleep(poll_s)


def failure_logs(clients: KubeClients, namespace: str, name: str, lines: int = 20) -> str:
    """The last lines of every node's log, for the error message of a failed job."""
    parts = []
    try:
        pods = node_pods(clients, namespace, name)
    except Exception as e:
        return f"(could not list the job's pods: {e})"
    for rank, pod in enumerate(pods):
        try:
            text = clients.core.read_namespaced_pod_log(name=pod.metadata.name, namespace=namespace, container=NODE,
                                                        tail_lines=lines)
        except Exception as e:
            text = f"(no log: {e})"
        parts.append(f"--- node {rank} ({pod.metadata.name}, {pod.status.phase}), last {lines} lines ---\n"
                     f"{str(text).rstrip()}")
    return "\n".join(parts) or "(no node pod was created: check the runtime name, quotas and node selectors)"


def delete_trainjob(name: str, namespace: str, clients: KubeClients) -> None:
    try:
        clients.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as e:
        logger.warning("could not delete TrainJob %s/%s: %s", namespace, name, e)


# ---------------------------------------------------------------------------------------------------------------
# Collecting the result
# ---------------------------------------------------------------------------------------------------------------
def collect_run(run_uri: str, destination: str | Path) -> Path:
    """Copy a finished run (adapter, config.json, metrics.jsonl) from S3 or the shared volume to `destination`."""
    from alignprop import cache, storage
    from alignprop.runtime import ADAPTER_FILE

    destination = Path(destination)
    if storage.is_s3(run_uri):
        manifest_uri = cache.manifest_uri_for(run_uri)
        if not storage.exists(manifest_uri):
            raise TrainJobError(f"the TrainJob finished but nothing was published at {run_uri} (no "
                                f"{cache.PUBLISHED_MANIFEST}); node 0 could not upload: check the alignprop-s3 "
                                "secret and node 0's log")
        cache.fetch(cache.load_manifest(run_uri), destination)
    else:
        source = Path(run_uri)
        if not (source / ADAPTER_FILE).is_file():
            raise TrainJobError(f"the TrainJob finished but {source} holds no {ADAPTER_FILE}; is the volume shared "
                                "(ReadWriteMany) and mounted at the same path in this pod?")
        shutil.copytree(source, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
    if not (destination / ADAPTER_FILE).is_file():
        raise TrainJobError(f"the run collected from {run_uri} has no {ADAPTER_FILE}")
    return destination


def run_trainjob(spec: TrainJobSpec, destination: str | Path, timeout_s: float, poll_s: float = 10.0,
                 clients: KubeClients | None = None, sink: Callable[[str], None] | None = None) -> Path:
    """Submit, wait (streaming node 0's log), collect the run into `destination`; returns it."""
    trainjob = build_trainjob(spec)
    clients = clients or kube_clients()
    submit(trainjob, clients)
    wait_for_trainjob(spec.name, spec.namespace, clients, timeout_s=timeout_s, poll_s=poll_s, sink=sink)
    return collect_run(spec.run_uri, destination)


def parse_toleration(text: str) -> dict:
    """`key[=value]:Effect` (kubectl taint syntax) -> a toleration; without a value the operator is Exists."""
    spec, sep, effect = text.rpartition(":")
    if not sep or not spec or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise TrainJobError(f"toleration {text!r} is not KEY[=VALUE]:EFFECT with EFFECT NoSchedule, "
                            "PreferNoSchedule or NoExecute (e.g. nvidia.com/gpu:NoSchedule)")
    key, has_value, value = spec.partition("=")
    if has_value:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}
