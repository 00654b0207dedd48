"""Cluster settings of the pipelines, and only here: the image, accelerators, node selector and tolerations, the
model-cache PVC, the secrets (by name; values stay in the cluster), timeouts and retries. kfp.local ignores the
Kubernetes parts, so the same pipeline runs on one machine."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from kfp import kubernetes

S3_ENV = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"]
MLFLOW_ENV = ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]


@dataclass
class ClusterSettings:
    image: str = "alignprop:0.1.0"  # the project image (Dockerfile), pushed where the cluster can pull it
    accelerator_type: str = "nvidia.com/gpu"  # accelerator resource of training and evaluation pods
    accelerator_limit: int = 1  # accelerators per training / evaluation pod (per node for TrainJobs)
    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict] = field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    model_cache_pvc: str = "alignprop-model-cache"  # k8s/model-cache-pvc.yaml (ReadWriteMany)
    model_cache_mount: str = "/cache"  # the image sets ALIGNPROP_MODELS_DIR=/cache/models
    s3_secret: str = "alignprop-s3"  # keys S3_ENV (k8s/secrets/s3.env)
    mlflow_secret: str = "alignprop-mlflow"  # keys MLFLOW_ENV (k8s/secrets/mlflow.env)
    train_cpu: str = "8"  # CPU request of a training / evaluation pod
    train_memory: str = "48Gi"  # memory request and limit of a training / evaluation pod
    train_timeout_s: int = 48 * 3600  # a training step (and its TrainJob) is stopped after this long
    retries: int = 2  # retries of the steps that only move data (prompts, cache); 0 for none (local runs)
    sweep_parallelism: int = 4  # sweep trials training at once

    def trainjob_json(self) -> str:
        """The TrainJob settings the train components receive (alignprop.trainjob.TrainJobSpec fields)."""
        return json.dumps({"image": self.image, "accelerator_resource": self.accelerator_type,
                           "accelerators_per_node": self.accelerator_limit, "node_selector": self.node_selector,
                           "tolerations": self.tolerations, "cpu": self.train_cpu, "memory": self.train_memory},
                          sort_keys=True)

    def to_dict(self) -> dict:
        return asdict(self)


def place(task, settings: ClusterSettings, gpu: bool = False, mlflow: bool = False, hub: bool = False,
          retry: bool = False, accelerators=None):
    """Apply the cluster settings to one task: the image, the model-cache volume and the S3 secret always; an
    accelerator, node selector and tolerations with `gpu` (`accelerators`: a count decided at run time instead of
    the settings' constant); the MLflow secret with `mlflow`; hub access with `hub` (the image is offline by
    default)."""
    task.set_container_image(settings.image)
    kubernetes.mount_pvc(task, pvc_name=settings.model_cache_pvc, mount_path=settings.model_cache_mount)
    kubernetes.use_secret_as_env(task, secret_name=settings.s3_secret, secret_key_to_env={k: k for k in S3_ENV},
                                 optional=True)
    if mlflow:
        kubernetes.use_secret_as_env(task, secret_name=settings.mlflow_secret,
                                     secret_key_to_env={k: k for k in MLFLOW_ENV}, optional=True)
    if gpu:
        task.set_accelerator_type(settings.accelerator_type)
        task.set_accelerator_limit(settings.accelerator_limit if accelerators is None else accelerators)
        task.set_cpu_request(settings.train_cpu).set_memory_request(settings.train_memory)
        task.set_memory_limit(settings.train_memory)
        for key, value in settings.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for toleration in settings.tolerations:
            kubernetes.add_toleration(task, **toleration)
        kubernetes.set_timeout(task, settings.train_timeout_s)
    if hub:
        task.set_env_variable("HF_HUB_OFFLINE", "0")
    if retry and settings.retries:
        task.set_retry(num_retries=settings.retries, backoff_duration="60s", backoff_factor=2.0)
    return task
