"""Run under `accelerate launch --num_processes 2`: trains a few steps and writes, per rank, the LoRA weights
and the prompts that rank saw, so the test can check all-reduce (identical weights from different prompts), and
whether each step moved the LoRA (the learning-rate schedule must reach the optimizer that DeepSpeed wraps),
and whether the process group was still alive when the interpreter began to shut down."""

import atexit
import json
import os
import sys
from pathlib import Path

import torch

from alignprop import models, runtime, train
from alignprop.config import TrainConfig

config = TrainConfig.from_json(Path(sys.argv[1]).read_text())
# Registered before the run's own exit handler, so it runs after it (atexit is last in, first out).
atexit.register(lambda: (Path(config.output_dir) / f"rank{os.environ['RANK']}-group-alive-at-exit.json").write_text(
    json.dumps(torch.distributed.is_initialized())))
seen, snapshots = [], []
with runtime.setup_run(config) as run:
    original = run.prompts_for
    run.prompts_for = lambda *a, **k: seen.extend(p := original(*a, **k)) or p
    unet, checkpoint = run.accelerator.unwrap_model(run.unet), run.maybe_checkpoint

    def snapshot():
        snapshots.append({k: v.detach().clone() for k, v in models.lora_state_dict(unet).items()})

    snapshot()
    run.maybe_checkpoint = lambda: (snapshot(), checkpoint())[1]
    train.train_loop(run)
    rank = run.accelerator.process_index
    state = models.lora_state_dict(run.accelerator.unwrap_model(run.unet))
    torch.save({k: v.detach().cpu() for k, v in state.items()}, Path(config.output_dir) / f"rank{rank}.pt")
    (Path(config.output_dir) / f"rank{rank}-prompts.json").write_text(json.dumps(seen))
    moved = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    (Path(config.output_dir) / f"rank{rank}-moved.json").write_text(json.dumps(moved))
    run.finish()
