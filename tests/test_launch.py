"""`alignprop launch`: PET_* variables -> `accelerate launch` argv, checked with accelerate's own parser, and the
publication of a finished run."""

import json
import shlex
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from alignprop import cli, launch
from alignprop.config import ConfigError, TrainConfig
from alignprop.launch import LaunchError, Topology, accelerate_argv, topology_from_env
from servers import free_ports


def pet_env(nnodes=2, rank=1, nproc="4", addr="alignprop-x-node-0-0.alignprop-x", port="29400"):
    return {"PET_NNODES": str(nnodes), "PET_NODE_RANK": str(rank), "PET_NPROC_PER_NODE": str(nproc),
            "PET_MASTER_ADDR": addr, "PET_MASTER_PORT": str(port)}


def torchrun_view(argv: list[str]):
    """What accelerate 1.15 hands torchrun for this argv (its parser, its validation, its env preparation)."""
    assert argv[1] == "launch" and argv[0].endswith("accelerate")
    args = launch_command_parser().parse_args(argv[2:])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


@pytest.fixture(autouse=True)
def no_user_accelerate_config(monkeypatch):
    monkeypatch.setattr("accelerate.commands.launch.default_config_file", "/nonexistent/default_config.yaml")


def test_topology_from_trainer_variables():
    assert topology_from_env({}) is None  # not a TrainJob node
    topology = topology_from_env(pet_env(nnodes=3, rank=2, nproc="8", addr="head", port=23456))
    assert topology == Topology(num_machines=3, machine_rank=2, procs_per_machine=8, main_process_ip="head",
                                main_process_port=23456)
    assert topology.num_processes == 24
    assert topology_from_env(pet_env(nproc="auto")).procs_per_machine >= 1  # torchrun's word: one per GPU (CPU: 1)


@pytest.mark.parametrize("change, message", [
    ({"PET_MASTER_ADDR": ""}, "PET_MASTER_ADDR missing"),
    ({"PET_NODE_RANK": "one"}, "PET_NODE_RANK='one' is not an integer"),
    ({"PET_NODE_RANK": "2"}, "node rank 2 is outside [0, 1]"),
    ({"PET_NPROC_PER_NODE": "many"}, "PET_NPROC_PER_NODE='many'"),
    ({"PET_NNODES": "0", "PET_NODE_RANK": "0"}, "number of nodes must be at least 1"),
])
def test_bad_trainer_variables_are_named(change, message):
    with pytest.raises(LaunchError, match=message.replace("[", r"\[")):
        topology_from_env({**pet_env(), **change})


def test_multi_node_argv_gives_torchrun_the_trainer_topology():
    argv = accelerate_argv(topology_from_env(pet_env(nnodes=2, rank=1, nproc="4")), ["train", "--config", "c.json"])
    i = argv.index("-m")
    assert argv[i:] == ["-m", "alignprop.cli", "train", "--config", "c.json"]
    args, env = torchrun_view(argv)
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 8)  # processes on ALL machines
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("4", "2", 1)
    assert (args.master_addr, args.master_port) == ("alignprop-x-node-0-0.alignprop-x", "29400")
    assert args.rdzv_backend == "static" and args.multi_gpu and args.module
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_deepspeed_strategy_uses_the_shipped_config_with_the_same_topology():
    port = free_ports(1)[0]  # node 0's launcher checks that its rendezvous port is free
    argv = accelerate_argv(topology_from_env(pet_env(nnodes=2, rank=0, nproc="2", port=port)), ["train"],
                           strategy="deepspeed_zero2", mixed_precision="bf16")
    assert "--multi_gpu" not in argv
    args, env = torchrun_view(argv)
    assert args.use_deepspeed and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert (args.nproc_per_node, args.nnodes, args.node_rank, args.master_port) == ("2", "2", 0, str(port))
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_one_machine():
    one = accelerate_argv(Topology(), ["train"])
    assert "--multi_gpu" not in one and "--same_network" not in one  # a single process: accelerate's simple launcher
    two = accelerate_argv(Topology(procs_per_machine=2, main_process_port=free_ports(1)[0]), ["train"])
    args, _ = torchrun_view(two)
    assert args.multi_gpu and args.nproc_per_node == "2" and args.num_machines == 1
    with pytest.raises(LaunchError, match="unknown strategy 'zero9'"):
        accelerate_argv(Topology(), ["train"], strategy="zero9")


def test_cli_dry_run_on_a_trainjob_node(monkeypatch, capsys, tmp_path):
    """What a TrainJob node runs: the config from ALIGNPROP_TRAIN_CONFIG, the topology from PET_*."""
    for name, value in pet_env(nnodes=2, rank=1, nproc="1", port="29412").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(launch.CONFIG_ENV, TrainConfig(num_steps=3, output_dir=str(tmp_path / "run")).to_json())
    assert cli.main(["launch", "--dry-run", "--set", "learning_rate=0.01"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    args, _ = torchrun_view(argv)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "1")
    assert args.training_script == "alignprop.cli" and args.training_script_args[:2] == ["train", "--config"]


def test_config_from_env_errors():
    with pytest.raises(LaunchError, match="is not valid JSON"):
        launch.config_from_env({launch.CONFIG_ENV: "{not json"})
    with pytest.raises(ConfigError, match="unknown config key"):
        launch.config_from_env({launch.CONFIG_ENV: json.dumps({"num_stepz": 3})})
    with pytest.raises(ConfigError, match="num_steps"):
        launch.config_from_env({launch.CONFIG_ENV: json.dumps({"num_steps": 0})})


def test_failed_training_is_reported_with_its_status(monkeypatch, tmp_path):
    class Done:
        returncode = 3

    monkeypatch.setattr(launch.subprocess, "run", lambda argv: Done())
    config = TrainConfig(output_dir=str(tmp_path / "run"))
    with pytest.raises(LaunchError, match="training exited with status 3 on node 0"):
        launch.launch(config, Topology(), publish=str(tmp_path / "published"))
    assert not (tmp_path / "published").exists()  # nothing published after a failure


def test_publish_run_leaves_checkpoints_out(tmp_path):
    from alignprop.cache import load_manifest

    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-000001").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-000001" / "optimizer.bin").write_bytes(b"x" * 100)
    with pytest.raises(LaunchError, match="did not finish"):
        launch.publish_run(run, str(tmp_path / "out"))
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"adapter")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    launch.publish_run(run, str(tmp_path / "out"))
    files = {f["path"] for f in load_manifest(str(tmp_path / "out"))["files"]}
    assert files == {"pytorch_lora_weights.safetensors", "metrics.jsonl"}


def test_run_training_dispatch_on_one_node(monkeypatch, tmp_path):
    """One node: N processes go through accelerate launch on this machine, one process trains in this process."""
    launched, trained = [], []
    monkeypatch.setattr(launch, "launch", lambda config, topology, strategy: launched.append((config, topology)))
    monkeypatch.setattr("alignprop.train.train", lambda config: trained.append(config) or Path(config.output_dir))
    config = TrainConfig(output_dir="ignored")
    assert launch.run_training(config, tmp_path / "a", procs_per_node=3) == tmp_path / "a"
    (sent, topology), = launched
    assert sent.output_dir == str(tmp_path / "a") and topology.procs_per_machine == 3 and topology.num_machines == 1
    assert launch.run_training(config, tmp_path / "b") == tmp_path / "b" and trained[0].output_dir == str(tmp_path / "b")
    with pytest.raises(LaunchError, match="needs the TrainJob settings"):
        launch.run_training(config, tmp_path / "c", nodes=2)
    with pytest.raises(LaunchError, match="must both be at least 1"):
        launch.run_training(config, tmp_path / "c", nodes=0)
