"""`alignprop train --method ddpo`: DDPO, the policy-gradient baseline (Black et al. 2023, arXiv 2305.13301), on
the same run machinery as AlignProp (model loading, prompts, rewards, LoRA, accelerate, checkpoints, outputs).

One step (`num_steps` counts these; DDPO calls them epochs), read top to bottom:
  1. sample `ddpo_samples_per_step` trajectories per process with stochastic DDIM (eta > 0), recording every
     step's latents and log-probability (no gradient);
  2. score the final images with the reward (no gradient needed: `jpeg_compressibility` works);
     advantages = rewards standardised per prompt over a history buffer (stat tracking), clipped to
     [-ddpo_adv_clip_max, ddpo_adv_clip_max];
  3. `ddpo_num_inner_epochs` times: shuffle the samples; for each minibatch of `train_batch_size` samples,
     re-score a random `ddpo_timestep_fraction` of its denoising steps under the current LoRA weights and
     accumulate the gradient of the PPO clipped objective over those steps; clip; one AdamW update.
So a step makes `ddpo_num_inner_epochs * ddpo_samples_per_step / train_batch_size` optimizer updates, and the
importance ratio is exactly 1 at the first update of a step (the weights that sampled are the weights scored).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignprop import runtime, sampling
from alignprop.config import PRESETS, ConfigError, TrainConfig, parse_overrides, update
from alignprop.ddpo_math import PerPromptStatTracker, ddim_step_with_logprob, ppo_clipped_loss

logger = logging.getLogger(__name__)

# The paper's settings that differ from AlignProp's defaults (kvablack/ddpo-pytorch config/base.py, the authors'
# LoRA release): lr 3e-4, eta 1.0, guidance 5.0. Clip range 1e-4, advantage clip 5, one inner epoch, all
# timesteps, stat-tracking buffer 16 / min count 16 are TrainConfig's ddpo_* defaults.
PAPER_DEFAULTS = {"learning_rate": 3e-4, "eta": 1.0, "guidance_scale": 5.0, "gradient_accumulation_steps": 1}


def load_ddpo_config(preset: str = "tiny", config_file: str | None = None,
                     overrides: list[str] | None = None) -> TrainConfig:
    """Like `config.load_config`, with DDPO's paper defaults between the preset and the user's values:
    preset -> method=ddpo + PAPER_DEFAULTS -> JSON file -> `key=value` overrides."""
    import json

    from alignprop.config import load_config

    load_config(preset, config_file, overrides)  # the same checks and messages for bad input
    config = update(PRESETS[preset](), {"method": "ddpo", **PAPER_DEFAULTS})
    if config_file:
        config = update(config, json.loads(Path(config_file).read_text()))
    if overrides:
        config = update(config, parse_overrides(config, overrides))
    return config.validate()


def validate_ddpo(config: TrainConfig) -> None:
    config.validate()
    if config.eta <= 0:
        raise ConfigError(f"invalid eta={config.eta}: DDPO needs a stochastic sampler to have log-probabilities; "
                          "use eta > 0 (the paper uses 1.0): --set eta=1.0")
    if config.gradient_accumulation_steps != 1:
        raise ConfigError(f"invalid gradient_accumulation_steps={config.gradient_accumulation_steps}: DDPO already "
                          "accumulates over denoising steps; set it to 1 and choose train_batch_size (samples per "
                          "update) and ddpo_samples_per_step (samples per step)")
    if config.ddpo_samples_per_step % config.train_batch_size:
        raise ConfigError(f"invalid ddpo_samples_per_step={config.ddpo_samples_per_step}: must be a multiple of "
                          f"train_batch_size={config.train_batch_size} (the PPO minibatch)")


def train_ddpo(config: TrainConfig) -> Path:
    """Train a DDPO adapter; return the output directory (same contract as `alignprop.train.train`)."""
    validate_ddpo(config)
    tracker = PerPromptStatTracker(config.ddpo_stat_tracking_buffer, config.ddpo_stat_tracking_min_count)
    with runtime.setup_run(config, checkpointed=[tracker]) as run:
        from accelerate.utils import DistributedType

        if run.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError("DDPO does not run under DeepSpeed here (the engine steps on every backward, but DDPO "
                              "accumulates over denoising steps); launch it with plain DDP (accelerate --multi_gpu)")
        ddpo_loop(run, tracker)
        return run.finish()


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Trajectories:
    prompts: list[str]
    prompt_embeds: torch.Tensor  # [B, L, D]
    latents: torch.Tensor  # [B, T + 1, C, h, w]: x_T ... x_0
    log_probs: torch.Tensor  # [B, T]: log p(x_{t-1} | x_t) under the sampling weights
    timesteps: torch.Tensor  # [T]
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]


def with_negative(prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """[uncond; cond] embeddings for classifier-free guidance (just `prompt_embeds` when guidance is off)."""
    if guidance_scale <= 1.0:
        return prompt_embeds
    return torch.cat([negative_embeds.expand(prompt_embeds.shape[0], -1, -1), prompt_embeds])


@torch.no_grad()
def sample_trajectories(run: runtime.Run, prompts: list[str], negative_embeds: torch.Tensor,
                        generator: torch.Generator) -> Trajectories:
    """Stochastic DDIM through the prepared UNet, keeping every x_t and log p(x_{t-1} | x_t)."""
    config, parts, device = run.config, run.parts, run.accelerator.device
    embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, prompts, device)
    latents = sampling.initial_latents(len(prompts), parts.unet.config, parts.scheduler, generator, device,
                                       embeds.dtype).float()
    cond = with_negative(embeds, negative_embeds, config.guidance_scale)
    parts.scheduler.set_timesteps(config.num_inference_steps, device=device)
    states, log_probs = [latents], []
    with run.accelerator.autocast():
        for t in parts.scheduler.timesteps:
            noise_pred = sampling.predict_noise(run.unet, latents.to(embeds.dtype), t, cond, config.guidance_scale,
                                                use_checkpoint=False)
            latents, log_prob = ddim_step_with_logprob(parts.scheduler, noise_pred.float(), t, latents, config.eta,
                                                       generator=generator)
            states.append(latents)
            log_probs.append(log_prob)
        images = sampling.decode(parts.vae, latents.to(parts.vae.dtype)).float()
    return Trajectories(list(prompts), embeds, torch.stack(states, 1), torch.stack(log_probs, 1),
                        parts.scheduler.timesteps.clone(), images)


def cat_trajectories(chunks: list[Trajectories]) -> Trajectories:
    return Trajectories([p for c in chunks for p in c.prompts], torch.cat([c.prompt_embeds for c in chunks]),
                        torch.cat([c.latents for c in chunks]), torch.cat([c.log_probs for c in chunks]),
                        chunks[0].timesteps, torch.cat([c.images for c in chunks]))


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def ddpo_loop(run: runtime.Run, tracker: PerPromptStatTracker) -> None:
    """Steps from `run.state.step` to `config.num_steps`."""
    config, parts, acc = run.config, run.parts, run.accelerator
    negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], acc.device)
    progress = tqdm(range(run.state.step, config.num_steps), initial=run.state.step, total=config.num_steps,
                    desc="ddpo", disable=not acc.is_local_main_process)
    run.validate_base()
    for step in progress:
        started = time.perf_counter()
        trajectories = collect(run, step, negative)
        rewards = score(run, trajectories, step)
        advantages, all_rewards = compute_advantages(run, tracker, trajectories.prompts, rewards)
        stats = ppo_update(run, trajectories, negative, advantages,
                           sampling.step_generator(config.seed, step, 1, acc.process_index))
        lr = run.advance_lr()
        run.state.step = step + 1
        metrics = {"reward_mean": all_rewards.mean().item(),
                   "reward_std": all_rewards.std().item() if all_rewards.numel() > 1 else 0.0,
                   **stats, "lr": lr, "step_time_s": time.perf_counter() - started,
                   "images_seen": run.state.step * run.images_per_step,
                   "peak_mem_gib": runtime.peak_memory_gib(acc.device)}
        if run.wants_validation():
            metrics.update(run.validate())
        run.log(metrics, images=trajectories.images if run.wants_samples(step + 1) else None)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.4f}")
        run.maybe_checkpoint()


def collect(run: runtime.Run, step: int, negative: torch.Tensor) -> Trajectories:
    """This process's samples of `step`, drawn in chunks of `train_batch_size` (bounded memory); every draw is a
    function of (seed, step, chunk, rank), so a resumed run samples exactly what an uninterrupted one would."""
    config, acc = run.config, run.accelerator
    prompts = run.prompts_for(step, 0, batch_size=config.ddpo_samples_per_step)
    chunks = []
    for i, start in enumerate(range(0, len(prompts), config.train_batch_size)):
        generator = sampling.step_generator(config.seed, step, 0, acc.process_index, i)
        chunks.append(sample_trajectories(run, prompts[start:start + config.train_batch_size], negative, generator))
    return cat_trajectories(chunks)


def score(run: runtime.Run, trajectories: Trajectories, step: int) -> torch.Tensor:
    with torch.no_grad():
        rewards = run.reward(trajectories.images, trajectories.prompts).detach().float()
    if not torch.isfinite(rewards).all():
        from alignprop.train import TrainingError

        raise TrainingError(f"reward {run.config.reward!r} returned a non-finite value at step {step} (values "
                            f"{rewards.cpu().tolist()}); check the reward; no adapter was written")
    return rewards


def compute_advantages(run: runtime.Run, tracker: PerPromptStatTracker, prompts: list[str],
                       rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt standardised, clipped advantages of this process's samples, from every process's rewards."""
    acc, config = run.accelerator, run.config
    all_rewards = acc.gather(rewards)
    all_prompts = list(prompts)
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        all_prompts = list(gather_object(list(prompts)))
    advantages = tracker.update(all_prompts, all_rewards.cpu().numpy())
    mine = slice(acc.process_index * len(prompts), (acc.process_index + 1) * len(prompts))
    advantages = torch.as_tensor(advantages[mine], dtype=torch.float32, device=rewards.device)
    return advantages.clamp(-config.ddpo_adv_clip_max, config.ddpo_adv_clip_max), all_rewards


def ppo_update(run: runtime.Run, trajectories: Trajectories, negative: torch.Tensor, advantages: torch.Tensor,
               generator: torch.Generator) -> dict:
    """The inner epochs of PPO over one step's samples. Returns mean loss, importance ratio, clip fraction and
    approximate KL, the gradient norm of the last update, the number of updates, and `ratio_first_update`: the
    mean |ratio - 1| of the first update (0 up to float error: the same weights sampled and score)."""
    config, acc = run.config, run.accelerator
    num_samples, num_timesteps = trajectories.log_probs.shape
    num_train = max(1, int(num_timesteps * config.ddpo_timestep_fraction))
    history = {"loss": [], "ratio": [], "clipfrac": [], "approx_kl": []}
    grad_norm, first_deviation, updates = None, None, 0
    for _ in range(config.ddpo_num_inner_epochs):
        order = torch.randperm(num_samples, generator=generator)
        # every sample trains on its own random subset of denoising steps (all of them when the fraction is 1)
        chosen = torch.stack([torch.randperm(num_timesteps, generator=generator)[:num_train]
                              for _ in range(num_samples)])
        for start in range(0, num_samples, config.train_batch_size):
            idx = order[start:start + config.train_batch_size]
            ratios = []
            for j in range(num_train):
                sync = j == num_train - 1  # all-reduce once per update, on its last backward
                with acc.no_sync(run.unet) if not sync else contextlib.nullcontext():
                    loss, ratio = _timestep_loss(run, trajectories, negative, advantages, idx, chosen[idx, j])
                    acc.backward(loss / num_train)
                ratios.append(ratio.detach())
                history["loss"].append(loss.item())  # a CPU-GPU sync point, once per UNet call
            ratio = torch.cat(ratios)
            history["ratio"].append(ratio.mean().item())
            history["clipfrac"].append(((ratio - 1).abs() > config.ddpo_clip_range).float().mean().item())
            history["approx_kl"].append((0.5 * torch.log(ratio) ** 2).mean().item())
            if first_deviation is None:
                first_deviation = (ratio - 1).abs().mean().item()
            if config.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(run.lora_params, config.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            updates += 1
    return {**{k: float(np.mean(v)) for k, v in history.items()}, "ratio_first_update": first_deviation,
            "grad_norm": float(grad_norm) if grad_norm is not None else None, "updates": updates}


def _timestep_loss(run, trajectories: Trajectories, negative, advantages, idx: torch.Tensor,
                   step_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO loss of denoising step `step_index[i]` of sample `idx[i]`, re-scored under the current weights."""
    config, device = run.config, run.accelerator.device
    idx, step_index = idx.to(device), step_index.to(device)
    latents = trajectories.latents[idx, step_index]
    prev_latents = trajectories.latents[idx, step_index + 1]
    timesteps = trajectories.timesteps.to(device)[step_index]
    embeds = trajectories.prompt_embeds[idx]
    cond = with_negative(embeds, negative, config.guidance_scale)
    unet_timesteps = torch.cat([timesteps, timesteps]) if config.guidance_scale > 1.0 else timesteps
    with run.accelerator.autocast():
        noise_pred = sampling.predict_noise(run.unet, latents.to(embeds.dtype), unet_timesteps, cond,
                                            config.guidance_scale, use_checkpoint=False)
    _, log_prob = ddim_step_with_logprob(run.parts.scheduler, noise_pred.float(), timesteps, latents, config.eta,
                                         prev_latents=prev_latents)
    return ppo_clipped_loss(log_prob, trajectories.log_probs[idx, step_index], advantages[idx],
                            config.ddpo_clip_range)
