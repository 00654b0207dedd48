"""`alignprop launch`: run `alignprop train` under `accelerate launch`, on one machine or on every node of a
Kubeflow Trainer TrainJob.

On a TrainJob node the Trainer (v2, `trainer.kubeflow.org/v1alpha1`, torch runtime) sets five variables and
nothing else: PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT. `accelerate_argv`
turns them into accelerate's multi-machine flags, without a shell:

    accelerate launch --num_machines $PET_NNODES --machine_rank $PET_NODE_RANK \
        --main_process_ip $PET_MASTER_ADDR --main_process_port $PET_MASTER_PORT \
        --num_processes $((PET_NNODES * PET_NPROC_PER_NODE)) --same_network --rdzv_backend static \
        --multi_gpu --mixed_precision no --dynamo_backend no -m alignprop.cli train --config FILE

accelerate's `--num_processes` counts processes on ALL machines; it hands torchrun `nproc_per_node =
num_processes // num_machines`. `--multi_gpu` selects accelerate's torchrun launcher; on a machine without CUDA
the processes train on the CPU over gloo (alignprop.runtime.make_accelerator). With `--strategy deepspeed_zero2`
the shipped DeepSpeed config replaces `--multi_gpu`; its `deepspeed_multinode_launcher: standard` keeps torchrun.

Without PET_* variables, `--num-processes N` runs N processes on this machine (N CPU processes where there is no
GPU). After a successful run, node 0 can publish the run directory to `--publish` (s3://... or a path, see
alignprop.cache.publish_dir), which is how the KFP train step collects a multi-node run's adapter.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from alignprop.errors import UserError

logger = logging.getLogger(__name__)

PET_VARS = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
CONFIG_ENV = "ALIGNPROP_TRAIN_CONFIG"  # the TrainConfig JSON text, when no --config file is given
CONFIGS_DIR = Path(__file__).parent / "configs"
STRATEGIES = {  # name -> accelerate config file (None: plain DDP flags)
    "ddp": None,
    "deepspeed_zero2": CONFIGS_DIR / "accelerate_deepspeed_zero2.yaml",
}
DEFAULT_PORT = 29500  # torch.distributed's customary rendezvous port


class LaunchError(UserError):
    """The launch environment or arguments are wrong; the message names the variable and the fix."""


@dataclass(frozen=True)
class Topology:
    """Where this process tree sits in the job."""

    num_machines: int = 1  # nodes in the job
    machine_rank: int = 0  # this node's index; node 0 hosts the main process
    procs_per_machine: int = 1  # training processes per node (one per GPU; on CPU, any number)
    main_process_ip: str = "127.0.0.1"  # node 0's address, reachable from every node
    main_process_port: int = DEFAULT_PORT  # rendezvous port on node 0

    @property
    def num_processes(self) -> int:
        """Processes on all machines together (accelerate's --num_processes)."""
        return self.num_machines * self.procs_per_machine

    def validate(self) -> "Topology":
        if self.num_machines < 1:
            raise LaunchError(f"number of nodes must be at least 1, got {self.num_machines}")
        if not 0 <= self.machine_rank < self.num_machines:
            raise LaunchError(f"node rank {self.machine_rank} is outside [0, {self.num_machines - 1}]")
        if self.procs_per_machine < 1:
            raise LaunchError(f"processes per node must be at least 1, got {self.procs_per_machine}")
        if not 0 < self.main_process_port < 65536:
            raise LaunchError(f"main process port {self.main_process_port} is not a TCP port")
        if self.num_machines > 1 and not self.main_process_ip:
            raise LaunchError("a multi-node run needs the main node's address (PET_MASTER_ADDR)")
        return self


def resolve_procs_per_node(value: str) -> int:
    """PET_NPROC_PER_NODE as an integer: a number, or torchrun's words `auto`/`gpu` (the visible GPUs, at least 1)
    and `cpu` (the CPU cores)."""
    value = str(value).strip().lower()
    if value in ("auto", "gpu"):
        import torch

        return max(torch.cuda.device_count(), 1)
    if value == "cpu":
        return os.cpu_count() or 1
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"PET_NPROC_PER_NODE={value!r} is not a number, 'auto', 'gpu' or 'cpu'") from None


def topology_from_env(env: Mapping[str, str] | None = None) -> Topology | None:
    """The Topology the Kubeflow Trainer describes in PET_* variables; None when PET_NNODES is not set (not a
    TrainJob node). Every variable the Trainer sets must be present and well formed."""
    env = os.environ if env is None else env
    if "PET_NNODES" not in env:
        return None
    missing = [name for name in PET_VARS if not env.get(name)]
    if missing:
        raise LaunchError(f"PET_NNODES is set but {', '.join(missing)} missing: run inside a Kubeflow Trainer "
                          "torch runtime, or unset PET_NNODES to launch on this machine only")

    def integer(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise LaunchError(f"{name}={env[name]!r} is not an integer") from None

    return Topology(num_machines=integer("PET_NNODES"), machine_rank=integer("PET_NODE_RANK"),
                    procs_per_machine=resolve_procs_per_node(env["PET_NPROC_PER_NODE"]),
                    main_process_ip=env["PET_MASTER_ADDR"], main_process_port=integer("PET_MASTER_PORT")).validate()


def accelerate_executable() -> str:
    """The `accelerate` script next to this interpreter (a venv or the image's conda), else the one on PATH."""
    beside = Path(sys.executable).parent / "accelerate"
    return str(beside) if beside.exists() else "accelerate"


def accelerate_argv(topology: Topology, train_args: list[str], strategy: str = "ddp",
                    mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` argv for `python -m alignprop.cli <train_args>` on this node (no shell involved)."""
    topology.validate()
    argv = [accelerate_executable(), "launch"]
    config_file = strategy_config(strategy)
    if config_file is not None:
        argv += ["--config_file", str(config_file)]
    argv += ["--num_machines", str(topology.num_machines), "--machine_rank", str(topology.machine_rank),
             "--main_process_ip", topology.main_process_ip, "--main_process_port", str(topology.main_process_port),
             "--num_processes", str(topology.num_processes)]
    if topology.num_machines > 1:
        # every node reaches PET_MASTER_ADDR directly: a static rendezvous on node 0, no etcd/c10d store needed
        argv += ["--same_network", "--rdzv_backend", "static"]
    if config_file is None and topology.num_processes > 1:
        argv.append("--multi_gpu")  # accelerate's name for its torchrun launcher; on CPU the processes use gloo
    argv += ["--mixed_precision", mixed_precision, "--dynamo_backend", "no", "-m", "alignprop.cli", *train_args]
    return argv


def strategy_config(strategy: str) -> Path | None:
    """The accelerate config file of a strategy name (`ddp`, `deepspeed_zero2`) or of a path to a YAML file."""
    if strategy in STRATEGIES:
        return STRATEGIES[strategy]
    if Path(strategy).is_file():
        return Path(strategy)
    raise LaunchError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)} or an accelerate "
                      "config file")


def config_from_env(env: Mapping[str, str] | None = None):
    """The TrainConfig whose JSON is in $ALIGNPROP_TRAIN_CONFIG (how a TrainJob passes it); validated."""
    from alignprop.config import ConfigError, TrainConfig

    env = os.environ if env is None else env
    text = env.get(CONFIG_ENV)
    if not text:
        raise LaunchError(f"{CONFIG_ENV} is empty: set it to the TrainConfig JSON, or pass --config FILE.json")
    try:
        return TrainConfig.from_json(text).validate()
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise LaunchError(f"{CONFIG_ENV} is not valid JSON: {e}") from None


def launch(config, topology: Topology, strategy: str = "ddp", publish: str | None = None,
           dry_run: bool = False) -> list[str]:
    """Run `alignprop train` on this node under accelerate; on node 0, publish the run directory afterwards.
    Returns the accelerate argv. A failed training run raises LaunchError with the exit status."""
    with tempfile.TemporaryDirectory(prefix="alignprop-launch-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(config.to_json())
        argv = accelerate_argv(topology, ["train", "--config", str(config_path)], strategy=strategy,
                               mixed_precision=config.mixed_precision)
        logger.info("node %d of %d: %s", topology.machine_rank, topology.num_machines, " ".join(argv))
        if dry_run:
            return argv
        status = subprocess.run(argv).returncode
    if status != 0:
        raise LaunchError(f"training exited with status {status} on node {topology.machine_rank} (its log is "
                          "above); fix the cause and rerun, with --set resume=true to continue from a checkpoint")
    if publish and topology.machine_rank == 0:
        publish_run(config.output_dir, publish)
    return argv


def publish_run(output_dir: str | Path, destination: str) -> dict:
    """Publish a finished run directory without its checkpoints/ (resumable state, GBs under DeepSpeed): the
    adapter, config.json, metrics.jsonl and whatever else the trainer wrote at the top. Returns the manifest."""
    import shutil

    from alignprop.cache import publish_dir
    from alignprop.runtime import ADAPTER_FILE

    output_dir = Path(output_dir)
    if not (output_dir / ADAPTER_FILE).is_file():
        raise LaunchError(f"{output_dir} holds no {ADAPTER_FILE}: the run did not finish, nothing to publish")
    with tempfile.TemporaryDirectory(prefix="alignprop-publish-") as staging:
        for path in output_dir.rglob("*"):
            relative = path.relative_to(output_dir)
            if path.is_file() and relative.parts[0] != "checkpoints":
                (Path(staging) / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, Path(staging) / relative)
        manifest = publish_dir(staging, destination)
    logger.info("published %s to %s (%d files)", output_dir, destination, len(manifest["files"]))
    return manifest


def run_training(config, destination: str | Path, nodes: int = 1, procs_per_node: int = 1,
                 trainjob: dict | None = None, timeout_s: float = 24 * 3600, strategy: str = "ddp",
                 poll_s: float = 10.0) -> Path:
    """Train `config` (AlignProp or DDPO, by config.method) and leave the finished run in `destination`:
      nodes == 1, one process  -> in this process;
      nodes == 1, N processes  -> `accelerate launch` on this machine (N CPU processes where there is no GPU);
      nodes > 1                -> a Kubeflow Trainer TrainJob (alignprop.trainjob), `trainjob` holding the other
                                  TrainJobSpec fields (image, output_uri, namespace, accelerators...).
    Returns `destination`."""
    from alignprop.config import update

    if nodes < 1 or procs_per_node < 1:
        raise LaunchError(f"nodes={nodes} and procs_per_node={procs_per_node} must both be at least 1")
    destination = Path(destination)
    if nodes > 1:
        from alignprop.trainjob import TrainJobSpec, run_trainjob

        if not trainjob:
            raise LaunchError(f"nodes={nodes} needs the TrainJob settings (image, output_uri); or train with nodes=1")
        spec = TrainJobSpec(config_json=config.to_json(), nodes=nodes, procs_per_node=procs_per_node,
                            strategy=strategy, **trainjob)
        spec.config_json = stage_inputs_for_nodes(config, spec).to_json()
        return run_trainjob(spec, destination, timeout_s=timeout_s, poll_s=poll_s)
    config = update(config, {"output_dir": str(destination)})
    if procs_per_node > 1:
        import socket

        with socket.socket() as s:  # a free rendezvous port: several launches may share this machine
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch(config, Topology(procs_per_machine=procs_per_node, main_process_port=port), strategy=strategy)
        return destination
    if config.method == "ddpo":
        from alignprop.ddpo import train_ddpo as train
    else:
        from alignprop.train import train
    return Path(train(config))


def stage_inputs_for_nodes(config, spec):
    """The config with local input files moved where every TrainJob node can read them: a local prompt file is
    copied beside the run (<run>-inputs/, on S3 or on the shared volume). A local base model or
    reward-weights directory cannot be shipped this way: it must be in the model cache (its s3:// manifest)."""
    from alignprop import storage
    from alignprop.config import update
    from alignprop.prompts import builtin

    values = {}
    if builtin(config.prompts) is None and not storage.is_s3(config.prompts):
        inputs = f"{spec.run_uri.rstrip('/')}-inputs"  # beside the run directory, on S3 or the shared volume
        target = f"{inputs}/{Path(config.prompts).name}"
        storage.upload_file(config.prompts, target)
        values["prompts"] = target
    for field in ("pretrained_model", "reward_weights_dir"):
        value = getattr(config, field)
        if value and Path(value).expanduser().exists() and not any(
                Path(value).resolve().is_relative_to(Path(m)) for m in spec.volumes.values()):
            raise LaunchError(f"{field}={value!r} is a local path the TrainJob nodes cannot read; put it in the "
                              "model cache (`alignprop cache add`, cache root on S3) and pass its manifest URI")
        if value and (value.endswith(".json") or value.startswith(("cache://", "s3://"))):
            prefetch(value)
    return update(config, values) if values else config


def prefetch(reference: str) -> None:
    """Fetch a cached model into ALIGNPROP_MODELS_DIR before the nodes start. On the model-cache volume the nodes
    share, they then find every file verified instead of all downloading the same files into one directory."""
    from alignprop.cache import materialize

    logger.info("prefetched %s into %s", reference, materialize(reference))


def run_summary(run_dir: str | Path) -> dict:
    """Headline figures of a finished run from its metrics.jsonl: steps, first and last reward, wall time."""
    import json

    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    lines = [m for m in lines if "reward_mean" in m]  # training steps, not the step-0 validation line
    if not lines:
        return {}
    first, last = lines[0], lines[-1]
    return {"steps": last["step"], "reward_first": first.get("reward_mean"), "reward_last": last.get("reward_mean"),
            "images_seen": last.get("images_seen"), "wall_time_s": last.get("wall_time_s")}


def pipeline_train_step(method: str, config_json: str, base_model_ref: str, reward_weights_ref: str,
                        prompts_path: str, destination: str, nodes: int, procs_per_node: int, runs_uri: str,
                        trainjob_json: str, timeout_s: float, pipeline_run_id: str):
    """The body of the pipeline's train steps (AlignProp and DDPO): the step's config from the validated one, with
    the cached model and prompts; train in place or as a TrainJob; return (config, run_summary)."""
    import json

    from alignprop.config import TrainConfig, update

    base = TrainConfig.from_json(config_json)
    values = {"method": method, "pretrained_model": base_model_ref or base.pretrained_model,
              "reward_weights_dir": reward_weights_ref or base.reward_weights_dir, "prompts": prompts_path}
    if method == "ddpo":
        from alignprop.ddpo import PAPER_DEFAULTS

        values = {**PAPER_DEFAULTS, **values}
    config = update(base, values).validate()
    os.environ["ALIGNPROP_PIPELINE_RUN_ID"] = pipeline_run_id  # alignprop.tracking tags the MLflow run with it
    settings = {**json.loads(trainjob_json or "{}"), "output_uri": runs_uri,
                "env": {"ALIGNPROP_PIPELINE_RUN_ID": pipeline_run_id}}
    run_training(config, destination, nodes=nodes, procs_per_node=procs_per_node, trainjob=settings,
                 timeout_s=timeout_s)
    return config, run_summary(destination)
