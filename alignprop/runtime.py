"""Run machinery shared by the AlignProp trainer and the DDPO baseline: the Accelerator, the output directory,
models + LoRA + optimizer, the prompt stream, metrics, checkpoints and the final adapter.

Output directory contract (`--output DIR`):
  config.json                          the resolved config (written at start)
  metrics.jsonl                        one line per optimizer step: step, reward_mean, ... (appended as it runs)
  checkpoints/checkpoint-NNNNNN/       resumable state (LoRA, optimizer, RNG, step); written to a temp dir, renamed
  best/                                with keep_best: the adapter of the best validation reward so far
  kept.json                            with keep_best: which step's adapter was kept, and the validation rewards
  pytorch_lora_weights.safetensors     the adapter, written LAST and atomically: present means finished
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignprop import models, sampling, tracking
from alignprop.config import ConfigError, TrainConfig
from alignprop.errors import UserError

logger = logging.getLogger(__name__)

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"
BEST_DIR = "best"
BEST_IN_CHECKPOINT = "best_lora.safetensors"  # the best adapter as of the checkpoint, restored on resume
VALIDATION_SEED = 271_828  # validation noise is the same for every training seed, and differs from evaluation's
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class OutputDirError(UserError):
    """The output directory would lose finished work; the message says how to proceed."""


@dataclass
class TrainState:
    """What accelerate's save_state does not know: the optimizer-step counter (the prompt position and every
    random draw are derived from it), the wall time already spent, and the best validation reward so far."""

    step: int = 0
    wall_time: float = 0.0
    best_step: int = -1  # -1: no validation yet
    best_reward: float = float("-inf")

    def state_dict(self) -> dict:
        return {"step": self.step, "wall_time": self.wall_time, "best_step": self.best_step,
                "best_reward": self.best_reward}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.wall_time = int(state["step"]), float(state["wall_time"])
        self.best_step = int(state.get("best_step", -1))  # checkpoints written before validation existed
        self.best_reward = float(state.get("best_reward", float("-inf")))


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
    validation_prompts: list[str] = field(default_factory=list)
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

    # --- validation ------------------------------------------------------------------------------------------
    def validation_reward(self) -> float:
        """Mean reward of `validation_images` samples of the current adapter: fixed prompts (cycling over the
        validation prompts) and fixed initial noise, one draw per image index, so every call, process count and
        training seed scores the same samples. The full DDIM chain at eta 0, no graph; images are split across the
        processes and the mean is all-reduced."""
        c, parts, acc = self.config, self.parts, self.accelerator
        mine = list(range(acc.process_index, c.validation_images, acc.num_processes))
        negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], acc.device)
        total = torch.zeros((), device=acc.device, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, len(mine), c.train_batch_size):
                index = mine[start:start + c.train_batch_size]
                prompts = [self.validation_prompts[i % len(self.validation_prompts)] for i in index]
                embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, prompts, acc.device)
                latents = torch.cat([sampling.initial_latents(1, parts.unet.config, parts.scheduler,
                                                              sampling.step_generator(VALIDATION_SEED, i),
                                                              acc.device, embeds.dtype) for i in index])
                with acc.autocast():
                    latents = sampling.denoise(self.unet, parts.scheduler, latents, embeds, negative,
                                               c.num_inference_steps, c.guidance_scale, eta=0.0, use_checkpoint=False)
                    images = sampling.decode(parts.vae, latents.to(parts.vae.dtype))
                total += self.reward(images.float(), prompts).double().sum()
        return (acc.reduce(total, "sum") / c.validation_images).item()

    def wants_validation(self) -> bool:
        every, step = self.config.validation_every, self.state.step
        return bool(every) and (step % every == 0 or step == self.config.num_steps)

    def validate(self) -> dict:
        """Score the adapter as of `state.step`; with keep_best, a new best is written to best/ (atomically).
        Returns the metrics to log with the step."""
        value = self.validation_reward()
        if not math.isfinite(value):
            raise UserError(f"the validation reward is {value} at step {self.state.step}; lower learning_rate or "
                            "check the reward; no adapter was written")
        metrics = {"val_reward": value}
        if self.config.keep_best and value > self.state.best_reward:
            self.state.best_step, self.state.best_reward = self.state.step, value
            if self.accelerator.is_main_process:
                models.save_lora(self.accelerator.unwrap_model(self.unet), self.output_dir / BEST_DIR)
            self.accelerator.wait_for_everyone()
        if self.config.keep_best:
            metrics.update(val_best_reward=self.state.best_reward, val_best_step=self.state.best_step)
        return metrics

    def validate_base(self) -> None:
        """Before the first step of a fresh run: score the base model (the LoRA starts as a no-op), the bar an
        adapter kept by keep_best must beat."""
        if self.config.validation_every and self.state.step == 0:
            self.log(self.validate())

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
            best = self.output_dir / BEST_DIR / ADAPTER_FILE
            if self.config.keep_best and best.is_file():
                shutil.copy2(best, tmp / BEST_IN_CHECKPOINT)
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
        if self.accelerator.is_main_process and self.config.keep_best:
            # best/ may hold a later step's adapter than the checkpoint knows of: put back the checkpoint's own
            restore_file(checkpoints[-1] / BEST_IN_CHECKPOINT, self.output_dir / BEST_DIR / ADAPTER_FILE)
        self.accelerator.wait_for_everyone()
        logger.info("resumed from %s at step %d", checkpoints[-1], self.state.step)
        if self.accelerator.is_main_process:  # drop metrics logged after the checkpoint by the interrupted run
            truncate_metrics(self.output_dir / "metrics.jsonl", self.state.step)

    # --- the end ---------------------------------------------------------------------------------------------
    def finish(self) -> Path:
        acc = self.accelerator
        self.check_replicas_in_sync()
        if acc.is_main_process:
            if self.config.keep_best:
                self.write_kept()
                restore_file(self.output_dir / BEST_DIR / ADAPTER_FILE, self.output_dir / ADAPTER_FILE)
            else:
                models.save_lora(acc.unwrap_model(self.unet), self.output_dir)  # last: its presence means finished
            self.tracker.finish(self.output_dir, status="FINISHED")
        acc.wait_for_everyone()
        logger.info("adapter written to %s", self.output_dir / ADAPTER_FILE)
        return self.output_dir

    def write_kept(self) -> None:
        """kept.json: the step whose adapter keep_best keeps, with every validation reward of the run."""
        history = [(m["step"], m["val_reward"]) for m in read_metrics(self.output_dir / "metrics.jsonl")
                   if "val_reward" in m]
        if self.state.best_step < 0 or not (self.output_dir / BEST_DIR / ADAPTER_FILE).is_file():
            raise UserError(f"keep_best found no validated adapter in {self.output_dir / BEST_DIR}; rerun with "
                            "--set overwrite=true")
        kept = {"step": self.state.best_step, "val_reward": self.state.best_reward,
                "last_step": self.state.step, "last_val_reward": history[-1][1] if history else None,
                "val_rewards": {str(step): value for step, value in history}}
        (self.output_dir / "kept.json").write_text(json.dumps(kept, indent=2) + "\n")
        self.tracker.log_metrics({"kept_step": kept["step"], "kept_val_reward": kept["val_reward"]},
                                 step=self.state.step)
        logger.info("keep_best: kept the step-%d adapter (validation reward %.4f; the last step's: %s)",
                    kept["step"], kept["val_reward"], kept["last_val_reward"])

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


def restore_file(source: Path, target: Path) -> None:
    """Copy `source` over `target` atomically (a temp file beside it, then a rename); no source: remove target."""
    if not source.is_file():
        target.unlink(missing_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    if path.is_file():
        path.write_text("".join(json.dumps(m) + "\n" for m in read_metrics(path) if m["step"] <= last_step))


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
    if not config.resume:  # a fresh run: the previous run's keep_best choice is not this run's
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
        (out / "kept.json").unlink(missing_ok=True)
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
    validation_prompts = prompts
    if config.validation_every and config.validation_prompts:
        validation_prompts = load_prompts(config.validation_prompts, tokenizer=parts.tokenizer)
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
    run = Run(config, accelerator, parts, unet, lora_params, optimizer, reward, prompts, tracker, state,
              validation_prompts)
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
