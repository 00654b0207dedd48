"""Multi-node training as a Kubeflow Trainer TrainJob: the object (validated against the vendored CRD schema), the
wait / log / failure logic (against stand-ins of the Kubernetes API), and the node command run for real as two
"nodes" on this machine that rendezvous through the PET_* variables and publish to a real S3 server."""

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from kubernetes.client.exceptions import ApiException

import helpers
import k8s_schemas
from alignprop import trainjob
from alignprop.config import TrainConfig
from alignprop.trainjob import (KubeClients, TrainJobError, TrainJobSpec, TrainJobTimeout, build_trainjob,
                                parse_toleration, wait_for_trainjob)
from servers import free_ports


def two_node_spec(**overrides) -> TrainJobSpec:
    values = dict(config_json=TrainConfig(num_steps=7, learning_rate=3e-4).to_json(), output_uri="s3://bucket/runs",
                  image="registry.example/alignprop:0.1.0", nodes=2, procs_per_node=4, accelerators_per_node=4,
                  cpu="16", memory="128Gi", name="alignprop-test1", namespace="team-a",
                  node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                  tolerations=[parse_toleration("nvidia.com/gpu:NoSchedule")], deadline_s=7200)
    values.update(overrides)
    return TrainJobSpec(**values)


def env_of(trainjob: dict) -> dict[str, dict]:
    return {e["name"]: e for e in trainjob["spec"]["trainer"]["env"]}


# ---------------------------------------------------------------------------------------------------------------
# The object
# ---------------------------------------------------------------------------------------------------------------
def test_two_node_trainjob_is_valid_with_the_expected_command_and_environment():
    spec = two_node_spec()
    job = build_trainjob(spec)
    assert k8s_schemas.crd_errors(job) == []
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["image"] == "registry.example/alignprop:0.1.0"
    assert trainer["command"] == ["alignprop", "launch"]
    assert trainer["args"] == ["--strategy", "ddp", "--publish", "s3://bucket/runs/alignprop-test1"]
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 4, "cpu": "16", "memory": "128Gi"},
                                           "requests": {"cpu": "16", "memory": "128Gi"}}
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": "alignprop"}
    env = env_of(job)
    config = TrainConfig.from_json(env["ALIGNPROP_TRAIN_CONFIG"]["value"])
    assert (config.num_steps, config.learning_rate) == (7, 3e-4)  # the pipeline's config, unchanged...
    assert config.output_dir == trainjob.NODE_OUTPUT_DIR  # ...except where each node trains before publishing
    for secret, keys in trainjob.SECRET_ENV.items():
        for key in keys:
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                                             "optional": True}}}
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    pod = pod["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert job["spec"]["activeDeadlineSeconds"] == 7200


def test_schema_check_catches_a_misplaced_field():
    job = build_trainjob(two_node_spec())
    job["spec"]["trainer"]["gpus"] = 4  # not a TrainJob field: the API server would reject (or drop) it
    job["spec"]["trainer"]["numNodes"] = "two"
    errors = "\n".join(k8s_schemas.crd_errors(job))
    assert "'gpus' was unexpected" in errors and "spec/trainer/numNodes" in errors


def test_shared_volume_output_trains_in_place():
    job = build_trainjob(two_node_spec(output_uri="/shared/runs/r1", volumes={"alignprop-runs": "/shared"},
                                       accelerators_per_node=0, procs_per_node=2, cpu="", memory=""))
    assert k8s_schemas.crd_errors(job) == []
    assert "--publish" not in job["spec"]["trainer"]["args"]
    assert TrainConfig.from_json(env_of(job)["ALIGNPROP_TRAIN_CONFIG"]["value"]).output_dir == "/shared/runs/r1"
    assert "resourcesPerNode" not in job["spec"]["trainer"]  # CPU-only and no sizes: the runtime's defaults
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = pod["template"]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "pvc-0", "persistentVolumeClaim": {"claimName": "alignprop-runs"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "pvc-0", "mountPath": "/shared"}]}]


@pytest.mark.parametrize("overrides, message", [
    (dict(output_uri="/data/runs"), "neither an s3:// prefix nor on a volume every node mounts"),
    (dict(output_uri="/data/runs", volumes={"pvc": "/shared"}), "neither an s3:// prefix"),
    (dict(name="Bad_Name"), "DNS-1035"),
    (dict(nodes=0), "nodes=0"),
    (dict(config_json=TrainConfig(num_steps=0).to_json()), "num_steps"),
    (dict(env={"AWS_SECRET_ACCESS_KEY": "x"}), "keep credentials in the secret only"),
])
def test_bad_specs_fail_before_submission(overrides, message):
    with pytest.raises(Exception, match=message):
        build_trainjob(two_node_spec(**overrides))


def test_tolerations_parse_like_kubectl_taints():
    assert parse_toleration("dedicated=gpu:NoExecute") == {"key": "dedicated", "operator": "Equal", "value": "gpu",
                                                          "effect": "NoExecute"}
    with pytest.raises(TrainJobError, match="KEY\\[=VALUE\\]:EFFECT"):
        parse_toleration("nvidia.com/gpu")


def test_cli_dry_run_prints_a_valid_trainjob(capsys):
    import yaml

    from alignprop import cli

    assert cli.main(["trainjob", "--image", "img:1", "--output-uri", "s3://b/runs", "--nodes", "3",
                     "--gpus-per-node", "8", "--name", "alignprop-cli", "--namespace", "ns",
                     "--toleration", "nvidia.com/gpu:NoSchedule", "--set", "num_steps=5", "--dry-run"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert k8s_schemas.crd_errors(job) == []
    assert (job["spec"]["trainer"]["numNodes"], job["spec"]["trainer"]["numProcPerNode"]) == (3, 8)
    assert TrainConfig.from_json(env_of(job)["ALIGNPROP_TRAIN_CONFIG"]["value"]).num_steps == 5


# ---------------------------------------------------------------------------------------------------------------
# Waiting, logs, failures (stand-ins for CustomObjectsApi and CoreV1Api)
# ---------------------------------------------------------------------------------------------------------------
def pod(name, rank, phase):
    return SimpleNamespace(metadata=SimpleNamespace(name=name, labels={
        "batch.kubernetes.io/job-completion-index": str(rank)}), status=SimpleNamespace(phase=phase))


class LogStream:
    def __init__(self, chunks):
        self.chunks = chunks

    def stream(self, amt):
        yield from self.chunks


class FakeCluster:
    """Serves a TrainJob whose conditions follow `states` (one per poll) and the logs of its two node pods."""

    def __init__(self, states, node0_chunks=(), tails=None, create_error=None):
        self.states, self.node0_chunks, self.tails = list(states), list(node0_chunks), tails or {}
        self.create_error, self.created, self.deleted, self.polls = create_error, [], [], 0

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.create_error:
            raise self.create_error
        self.created.append((group, version, namespace, plural, body))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        state = self.states[min(self.polls, len(self.states) - 1)]
        self.polls += 1
        conditions = [] if state is None else [{"type": state[0], "status": "True", "reason": state[1],
                                                "message": state[2]}]
        return {"metadata": {"name": name}, "status": {"conditions": conditions}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)

    # CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector):
        assert "jobset.sigs.k8s.io/jobset-name=job1" in label_selector
        phase = "Pending" if self.polls < 2 else "Running"
        return SimpleNamespace(items=[pod("job1-node-0-1-b", 1, phase), pod("job1-node-0-0-a", 0, phase)])

    def read_namespaced_pod_log(self, name, namespace, container, follow=False, tail_lines=None,
                                _preload_content=True):
        assert container == "node"
        if follow:
            assert name == "job1-node-0-0-a"  # node 0, whatever order the API lists the pods in
            return LogStream(self.node0_chunks)
        return self.tails.get(name, "")


def clients(cluster):
    return KubeClients(custom=cluster, core=cluster)


def test_wait_streams_node0_log_until_complete():
    cluster = FakeCluster([None, None, None, ("Complete", "JobsCompleted", "done")],
                          node0_chunks=[b"step 1 rew", b"ard=0.1\nstep 2 reward=0.2\n", b"adapter written"])
    lines = []
    job = wait_for_trainjob("job1", "ns", clients(cluster), timeout_s=30, poll_s=0.01, sink=lines.append)
    assert job["metadata"]["name"] == "job1"
    assert lines == ["step 1 reward=0.1", "step 2 reward=0.2", "adapter written"]  # whole lines, in order
    assert cluster.deleted == []


def test_failure_names_the_reason_and_shows_every_node_log_tail():
    cluster = FakeCluster([None, None, ("Failed", "JobFailed", "node 1 exited with code 1")],
                          tails={"job1-node-0-0-a": "waiting for rank 1", "job1-node-0-1-b": "CUDA out of memory"})
    with pytest.raises(TrainJobError) as failure:
        wait_for_trainjob("job1", "ns", clients(cluster), timeout_s=30, poll_s=0.01, sink=lambda line: None)
    message = str(failure.value)
    assert "TrainJob ns/job1 failed (JobFailed: node 1 exited with code 1)" in message
    assert message.index("node 0 (job1-node-0-0-a") < message.index("waiting for rank 1") < \
        message.index("node 1 (job1-node-0-1-b") < message.index("CUDA out of memory")
    assert "kubectl -n ns describe trainjob job1" in message


def test_timeout_deletes_the_job():
    cluster = FakeCluster([None])
    started = time.monotonic()
    with pytest.raises(TrainJobTimeout, match="did not finish within 0 s and was deleted"):
        wait_for_trainjob("job1", "ns", clients(cluster), timeout_s=0.2, poll_s=0.05, sink=lambda line: None)
    assert cluster.deleted == ["job1"] and time.monotonic() - started < 5


@pytest.mark.parametrize("status, hint", [(403, "Role alignprop-pipeline"), (404, "install Kubeflow Trainer v2"),
                                          (409, "exists already")])
def test_api_errors_become_clear_errors(status, hint):
    cluster = FakeCluster([None], create_error=ApiException(status=status, reason="Nope"))
    with pytest.raises(TrainJobError, match=hint):
        trainjob.submit(build_trainjob(two_node_spec()), clients(cluster))


# ---------------------------------------------------------------------------------------------------------------
# The node command, run for real: two "nodes" on this machine, published to S3, collected
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return helpers.tiny_model_dir(tmp_path_factory)


def test_collect_reports_a_missing_publication(s3_prefix, tmp_path):
    with pytest.raises(TrainJobError, match="nothing was published"):
        trainjob.collect_run(f"{s3_prefix}/never", tmp_path / "run")
    with pytest.raises(TrainJobError, match="holds no pytorch_lora_weights.safetensors"):
        trainjob.collect_run(str(tmp_path / "empty"), tmp_path / "run")


@pytest.mark.slow
def test_trainjob_command_trains_across_two_nodes_and_the_step_collects_the_adapter(tiny, s3_prefix, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na horse\na cow\n")
    config = TrainConfig(pretrained_model=str(tiny), prompts=str(prompts), reward="brightness", num_steps=2,
                         num_inference_steps=4, truncation_k=2, train_batch_size=1, tracking=False)
    spec = two_node_spec(config_json=config.to_json(), output_uri=s3_prefix, accelerators_per_node=0,
                         procs_per_node=1)
    job = build_trainjob(spec)
    trainer = job["spec"]["trainer"]
    port = free_ports(1)[0]
    # what the Trainer does: the trainer's command on every node, its plain env, secrets resolved, PET_* set
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "",
           **{e["name"]: e["value"] for e in trainer["env"] if "value" in e},
           **{e["name"]: os.environ[e["name"]] for e in trainer["env"] if "valueFrom" in e and e["name"] in os.environ},
           "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    assert env["AWS_SECRET_ACCESS_KEY"]  # the S3 test server's key reaches the nodes only through the secret refs
    command = [str(helpers.VENV_BIN / trainer["command"][0]), *trainer["command"][1:], *trainer["args"]]
    nodes = [subprocess.Popen(command + ["--output", str(tmp_path / f"node{rank}")], env={**env, "PET_NODE_RANK":
                              str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)

    collected = trainjob.collect_run(spec.run_uri, tmp_path / "collected")
    adapter = "pytorch_lora_weights.safetensors"
    assert (collected / adapter).read_bytes() == (tmp_path / "node0" / adapter).read_bytes()
    metrics = [json.loads(line) for line in (collected / "metrics.jsonl").read_text().splitlines()]
    assert [m["images_seen"] for m in metrics] == [2, 4]  # one process per node, both in every step
    assert not (tmp_path / "node1" / adapter).exists()  # only node 0 holds the main process


class ClusterThatTrains(FakeCluster):
    """Completes every TrainJob it is given by writing the run where the job's config says (a shared volume)."""

    def __init__(self):
        super().__init__([None, ("Complete", "JobsCompleted", "done")])

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        super().create_namespaced_custom_object(group, version, namespace, plural, body)
        env = env_of(body)
        config = TrainConfig.from_json(env["ALIGNPROP_TRAIN_CONFIG"]["value"])
        out = Path(config.output_dir)
        out.mkdir(parents=True)  # the nodes create it: it must not exist before
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
        (out / "config.json").write_text(config.to_json())
        (out / "checkpoints").mkdir()

    def list_namespaced_pod(self, namespace, label_selector):
        return SimpleNamespace(items=[])


def test_run_training_with_nodes_submits_a_trainjob_and_collects_its_run(tmp_path, monkeypatch):
    from alignprop.launch import LaunchError, run_training
    from alignprop.prompts import load_prompts

    cluster = ClusterThatTrains()
    monkeypatch.setattr(trainjob, "kube_clients", lambda: clients(cluster))
    shared = tmp_path / "shared"
    prompts = tmp_path / "local" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_text("a cat\na dog\n")
    config = TrainConfig(prompts=str(prompts), num_steps=3)
    settings = dict(output_uri=str(shared / "runs" / "r1"), image="img:1", volumes={"alignprop-shared": str(shared)},
                    name="alignprop-r1", namespace="ns")
    out = run_training(config, tmp_path / "adapter", nodes=2, procs_per_node=2, trainjob=settings, timeout_s=30,
                       poll_s=0.01)
    (_, _, namespace, plural, body) = cluster.created[0]
    assert (namespace, plural, body["spec"]["trainer"]["numNodes"]) == ("ns", "trainjobs", 2)
    sent = TrainConfig.from_json(env_of(body)["ALIGNPROP_TRAIN_CONFIG"]["value"])
    assert sent.num_steps == 3
    assert sent.prompts == str(shared / "runs" / "r1-inputs" / "prompts.txt")  # staged where the nodes can read
    assert load_prompts(sent.prompts) == ["a cat", "a dog"]
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"weights"
    assert not (out / "checkpoints").exists()  # the step collects the run, not its resumable state

    with pytest.raises(LaunchError, match="local path the TrainJob nodes cannot read"):
        run_training(TrainConfig(pretrained_model=str(tmp_path)), tmp_path / "x", nodes=2, trainjob=settings)
