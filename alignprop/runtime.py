"""Run machinery shared by the AlignProp trainer and the DDPO baseline: the Accelerator, the output directory,
models + LoRA + optimizer, the prompt stream, metrics, checkpoints and the final adapter.

Output directory contract (`--output DIR`):
  config.json                          the resolved config (written at start)
  metrics.jsonl                        one line per optimizer step: step, reward_mean, ... (appended as it runs)
  checkpoints/checkpoint-NNNNNN/       resumable state (LoRA, optimizer, RNG, step); written to a temp dir, renamed
  pytorch_lora_weights.safetensors     the adapter, written LAST and atomically: present means finished
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignprop import models, tracking
from alignprop.config import ConfigError, TrainConfig
from alignprop.errors import UserError

logger = logging.getLogger(__name__)

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class OutputDirError(UserError):
    """The output directory would lose finished work; the message says how to proceed."""


@dataclass
class TrainState:
    """What accelerate's save_state does not know: the optimizer-step counter (the prompt position and every
    random draw are derived from it) and the wall time already spent."""

    step: int = 0
    wall_time: float = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "wall_time": self.wall_time}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.wall_time = int(state["step"]), float(state["wall_time"])


@dataclass
class Run:
    config: TrainConfig
    accelerator: object
    parts: models.DiffusionParts
    unet: torch.nn.Module  # the prepared (DDP/DeepSpeed-wrapped) UNet: always run the forward through this
    lora_params: list
    optimizer: object
    reward: object
    prompts: list[str]
    tracker: object
    state: TrainState = field(default_factory=TrainState)
    lr_scheduler: object = None  # stepped once per run step (an AlignProp optimizer step, a DDPO epoch)
    started: float = field(default_factory=time.perf_counter)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def images_per_step(self) -> int:
        return self.config.images_per_step(self.accelerator.num_processes)

    # --- prompts -------------------------------------------------------------------------------------------
    def prompts_for(self, step: int, micro: int, batch_size: int | None = None) -> list[str]:
        """This process's prompts for (step, micro-step): consecutive slices of a seeded, per-epoch shuffled
        stream, so different processes see different prompts and the position follows from the step."""
        c, acc = self.config, self.accelerator
        batch_size = batch_size or c.train_batch_size
        global_batch = acc.num_processes * batch_size
        start = (step * c.gradient_accumulation_steps + micro) * global_batch + acc.process_index * batch_size
        return [self._prompt_at(p) for p in range(start, start + batch_size)]

    def _prompt_at(self, position: int) -> str:
        epoch, index = divmod(position, len(self.prompts))
        return self.prompts[epoch_order(len(self.prompts), self.config.seed, epoch)[index]]

    # --- metrics ---------------------------------------------------------------------------------------------
    def log(self, metrics: dict, images: torch.Tensor | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        metrics = {"step": self.state.step, **metrics, "wall_time_s": self.wall_time()}
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                 step=self.state.step)
        if images is not None:
            self.tracker.log_images("samples", images.detach().float().cpu(), step=self.state.step)

    def wall_time(self) -> float:
        return self.state.wall_time + time.perf_counter() - self.started

    def advance_lr(self) -> float:
        """End of a run step: step the learning-rate schedule; returns the rate that step used (for its metrics)."""
        used = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        return used

    def wants_samples(self, step: int) -> bool:
        every = self.config.sample_every
        return step == self.config.num_steps or (every > 0 and step % every == 0)

    # --- checkpoints -----------------------------------------------------------------------------------------
    def maybe_checkpoint(self) -> None:
        every = self.config.checkpoint_every
        if every and self.state.step % every == 0 and self.state.step < self.config.num_steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Every process takes part (accelerate writes its RNG state per process); a temp dir renamed into
        place by the main process means a checkpoint directory either is complete or does not exist."""
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.state.step:06d}"
        tmp = root / f".tmp-{final.name}"
        self.state.wall_time = self.wall_time()
        self.started = time.perf_counter()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(self.output_dir)[:-self.config.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def resume(self) -> None:
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            logger.info("no checkpoint in %s; starting from step 0", self.output_dir / "checkpoints")
            return
        self.accelerator.load_state(str(checkpoints[-1]))
        self.started = time.perf_counter()
        logger.info("resumed from %s at step %d", checkpoints[-1], self.state.step)
        if self.accelerator.is_main_process:  # drop metrics logged after the checkpoint by the interrupted run
            truncate_metrics(self.output_dir / "metrics.jsonl", self.state.step)

    # --- the end ---------------------------------------------------------------------------------------------
    def finish(self) -> Path:
        acc = self.accelerator
        self.check_replicas_in_sync()
        if acc.is_main_process:
            models.save_lora(acc.unwrap_model(self.unet), self.output_dir)  # last: its presence means finished
            self.tracker.finish(self.output_dir, status="FINISHED")
        acc.wait_for_everyone()
        logger.info("adapter written to %s", self.output_dir / ADAPTER_FILE)
        return self.output_dir

    def check_replicas_in_sync(self) -> None:
        """Every process must hold the same LoRA weights; if not, gradients were not all-reduced (e.g. a
        forward pass through the unwrapped module) and the adapter would be one rank's arbitrary copy."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.num_processes == 1:
            return
        weights = torch.cat([p.detach().float().flatten() for p in self.lora_params]).to(acc.device)
        replicas = acc.gather(weights[None]).cpu()  # LoRA weights are small: a few MB even for SD
        if not all(torch.equal(replicas[0], r) for r in replicas[1:]):
            raise RuntimeError("LoRA weights differ across processes; gradients were not all-reduced "
                               f"(distributed type {acc.distributed_type})")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            _exit_cleanup["failed"] = True
            if self.accelerator.is_main_process:
                self.tracker.finish(None, status="FAILED")
        return False


@functools.lru_cache(maxsize=4)
def epoch_order(num_prompts: int, seed: int, epoch: int) -> list[int]:
    """The prompt order of one epoch: a seeded shuffle, the same on every process."""
    order = list(range(num_prompts))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def truncate_metrics(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def peak_memory_gib(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------
def prepare_output_dir(config: TrainConfig) -> Path:
    out = Path(config.output_dir)
    adapter = out / ADAPTER_FILE
    if adapter.exists():
        if config.overwrite:
            adapter.unlink()  # a failed rerun must not leave the old adapter looking like its result
        else:
            raise OutputDirError(f"{out} already holds a finished adapter ({ADAPTER_FILE}); pick a new --output, "
                                 "or pass --set overwrite=true to replace it")
    if not config.resume and (out / "metrics.jsonl").exists():
        if not config.overwrite:
            raise OutputDirError(f"{out} holds an unfinished run; pass --set resume=true to continue it, or "
                                 "--set overwrite=true to start over")
        (out / "metrics.jsonl").unlink()
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # The device is accelerate's choice: CUDA when visible (force CPU with CUDA_VISIBLE_DEVICES=""). Without CUDA,
    # accelerate only wraps the model in DDP when told cpu=True (else DistributedType.NO: no all-reduce at all),
    # and leaves the process-group backend unset, which DeepSpeed cannot use: gloo is the CPU backend.
    no_cuda = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if no_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=no_cuda and not deepspeed,
                              gradient_accumulation_steps=config.gradient_accumulation_steps, kwargs_handlers=handlers)
    if torch.distributed.is_initialized():
        atexit.unregister(_destroy_process_group_at_exit)  # once per process, however many runs it trains
        atexit.register(_destroy_process_group_at_exit)
    return accelerator


# A process that exits with its process group alive can abort at interpreter shutdown ("terminate called without
# an active exception", SIGABRT): gloo's worker threads outlive the interpreter (pytorch/pytorch#179291). The
# launcher then reports a finished run as failed. So the group is destroyed at exit, while Python is still alive;
# at exit, not at the end of a run, because one process may train several runs (`alignprop compare`). Skipped
# after a failed run: destroying a group that another rank still waits on can hang instead of exiting.
_exit_cleanup = {"failed": False}


def _destroy_process_group_at_exit() -> None:
    from accelerate import PartialState

    if not _exit_cleanup["failed"]:
        PartialState().destroy_process_group()  # a no-op when no group is initialized


def _register_lora_checkpoint_hooks(accelerator) -> None:
    """Checkpoints hold the LoRA weights only (a few MB), not the whole frozen UNet (GBs for SD)."""
    from accelerate.utils import DistributedType
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return  # DeepSpeed writes its own (sharded) model and optimizer state

    def save_hook(models_, weights, output_dir):
        if accelerator.is_main_process:
            for model in models_:
                state = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()},
                          os.path.join(output_dir, "lora.safetensors"))
        while weights:
            weights.pop()

    def load_hook(models_, input_dir):
        while models_:
            model = accelerator.unwrap_model(models_.pop())
            state = load_file(os.path.join(input_dir, "lora.safetensors"))
            result = set_peft_model_state_dict(model, state)
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"checkpoint {input_dir} does not match the LoRA config: unexpected keys "
                                f"{result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def setup_run(config: TrainConfig, checkpointed: list = ()) -> Run:
    """Everything before the first step. Cheap checks (prompts, reward name, output dir) come first, so bad input
    fails before any model is loaded. `checkpointed`: extra objects with state_dict/load_state_dict that go into
    every checkpoint (e.g. DDPO's per-prompt statistics)."""
    from alignprop.prompts import load_prompts
    from alignprop.rewards import load_reward, parse_mix

    parse_mix(config.reward)  # unknown reward names fail here, before any model is loaded
    accelerator = make_accelerator(config)
    if accelerator.is_main_process:
        prepare_output_dir(config)
    accelerator.wait_for_everyone()
    torch.manual_seed(config.seed)
    parts = models.load_parts(config.pretrained_model, config.revision, device=accelerator.device,
                              dtype=DTYPES[config.mixed_precision])
    check_adapter_gate(config, parts.scheduler)
    prompts = load_prompts(config.prompts, tokenizer=parts.tokenizer)
    if config.resolution is not None and config.resolution != parts.resolution:
        raise UserError(f"resolution={config.resolution} differs from the model's native {parts.resolution}; "
                        "omit it or set it to the native size")
    reward = load_reward(config.reward, device=accelerator.device, weights_dir=config.reward_weights_dir)
    lora_params = models.add_lora(parts.unet, config.lora_rank, config.lora_alpha, config.lora_target_modules)
    models.gate_lora(parts.unet, config.adapter_min_timestep)
    optimizer = torch.optim.AdamW(lora_params, lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    _configure_deepspeed_batch(accelerator, config)
    unet, optimizer = accelerator.prepare(parts.unet, optimizer)
    _register_lora_checkpoint_hooks(accelerator)
    state = TrainState()
    accelerator.register_for_checkpointing(state, *checkpointed)
    tracker = tracking.NullTracker()
    if accelerator.is_main_process:
        (Path(config.output_dir) / "config.json").write_text(config.to_json())
        tracker = tracking.start_run(config.to_dict(), run_type=config.method, tracking_uri=config.tracking_uri,
                                     enabled=config.tracking, experiment_name=config.experiment_name,
                                     output_dir=config.output_dir)
    run = Run(config, accelerator, parts, unet, lora_params, optimizer, reward, prompts, tracker, state)
    if config.resume:
        run.resume()
    run.lr_scheduler = make_lr_scheduler(config, optimizer, run.state.step)
    return run


def make_lr_scheduler(config: TrainConfig, optimizer, start_step: int = 0):
    """diffusers' schedule for `config.lr_scheduler` over `config.num_steps`, positioned at `start_step`.

    The schedule is a pure function of the step, so a resumed run rebuilds it at the checkpoint's step rather than
    storing it: checkpoints stay the same whatever the schedule, and the learning rate of every step matches the
    uninterrupted run's."""
    from diffusers.optimization import get_scheduler

    for group in optimizer.param_groups:
        group["initial_lr"] = config.learning_rate  # the peak; a resumed optimizer holds the last decayed value
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.num_steps, last_epoch=start_step - 1)


def check_adapter_gate(config: TrainConfig, scheduler) -> None:
    """A gated LoRA (adapter_min_timestep > 0) must act on some denoising step and, for AlignProp, on a step whose
    graph is kept, or it would never receive a gradient."""
    if not config.adapter_min_timestep:
        return
    scheduler.set_timesteps(config.num_inference_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    steps = len(timesteps)
    active = sum(t >= config.adapter_min_timestep for t in timesteps)
    if not active:
        raise ConfigError(f"invalid adapter_min_timestep={config.adapter_min_timestep}: above every timestep of the "
                          f"{steps} DDIM steps (the first is {timesteps[0]}), so the LoRA would act on no step; "
                          f"set it at most {timesteps[0]}")
    if config.method == "alignprop":
        most_k = {"fixed": config.truncation_k, "uniform": config.truncation_max}.get(config.truncation, steps)
        if steps - most_k >= active:
            raise ConfigError(
                f"invalid adapter_min_timestep={config.adapter_min_timestep}: the LoRA acts on the first {active} of "
                f"{steps} steps only, but truncation={config.truncation} keeps the graph of the last {most_k} at most, "
                f"so the LoRA would get no gradient; use --set truncation=full or a K above {steps - active}")


def _configure_deepspeed_batch(accelerator, config: TrainConfig) -> None:
    """No dataloader goes through prepare(), so DeepSpeed must be told the micro-batch size."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
