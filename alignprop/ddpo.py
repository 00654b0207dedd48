"""DDPO, the policy-gradient baseline (Black et al. 2023, arXiv 2305.13301), on the same run machinery as AlignProp.

Each optimizer step:
  1. sample trajectories with stochastic DDIM (eta > 0) and record each step's log-probability (no gradient);
  2. score the images; advantages = rewards normalised per prompt (stat tracking), clipped;
  3. for each inner epoch, for a random fraction of the timesteps: recompute the step's log-probability under the
     current LoRA weights and minimise the PPO clipped objective (Schulman et al. 2017, Eq. 7):
         L = mean( max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) ),  r = exp(logp_new - logp_old).
The reward never needs a gradient, so non-differentiable rewards such as `jpeg_compressibility` work.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignprop import runtime, sampling
from alignprop.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Pure maths
# ---------------------------------------------------------------------------------------------------------------
def ddim_step_with_logprob(scheduler, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, eta: float,
                           prev_latents: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """One DDIM step (formula (12) of arXiv 2010.02502, the same maths as `DDIMScheduler.step`) that also returns
    log N(prev_latents; mean, std^2), averaged over the non-batch dimensions. Draws prev_latents when not given."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = t - step
    alphas = scheduler.alphas_cumprod.to(latents.device)
    alpha_t = alphas[t]
    alpha_prev = alphas[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod.to(latents.device)
    pred_x0 = (latents - (1 - alpha_t).sqrt() * noise_pred) / alpha_t.sqrt()
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)  # sigma_t^2 of DDIM, Eq. (16)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).sqrt() * noise_pred
    if prev_latents is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        prev_latents = mean + std * noise
    log_prob = (-((prev_latents.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi)))
    return prev_latents, log_prob.mean(dim=tuple(range(1, latents.ndim)))


def ppo_clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                     clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (as a loss to minimise) and the importance ratio."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


class PerPromptStatTracker:
    """Normalise rewards by the mean/std of the same prompt's recent rewards (DDPO Sec. 4.3); fall back to the
    batch's statistics until a prompt has `min_count` rewards."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        advantages = np.empty_like(rewards, dtype=np.float64)
        for prompt in set(prompts):
            mask = np.array([p == prompt for p in prompts])
            self.history[prompt].extend(rewards[mask].tolist())
            if len(self.history[prompt]) < self.min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(self.history[prompt]), np.std(self.history[prompt]) + 1e-6
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        for k, v in state["history"].items():
            self.history[k].extend(v)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def train_ddpo(config: TrainConfig) -> Path:
    config.validate()
    if config.eta <= 0:
        raise ConfigError(f"invalid eta={config.eta}: DDPO needs a stochastic sampler; use eta > 0 (the paper uses 1.0)")
    if config.gradient_accumulation_steps != 1:
        raise ConfigError("DDPO accumulates gradients over its own timesteps and minibatches; keep "
                          "gradient_accumulation_steps=1 and set ddpo_samples_per_step / train_batch_size")
    if config.ddpo_samples_per_step % config.train_batch_size:
        raise ConfigError(f"ddpo_samples_per_step={config.ddpo_samples_per_step} must be a multiple of "
                          f"train_batch_size={config.train_batch_size}")
    tracker = PerPromptStatTracker(config.ddpo_stat_tracking_buffer, config.ddpo_stat_tracking_min_count)
    with runtime.setup_run(config, checkpointed=[tracker]) as run:
        ddpo_loop(run, tracker)
        return run.finish()


@torch.no_grad()
def sample_trajectories(run: runtime.Run, prompts: list[str], negative_embeds, generator):
    config, parts, acc = run.config, run.parts, run.accelerator
    embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, prompts, acc.device)
    latents = sampling.initial_latents(len(prompts), parts.unet.config, parts.scheduler, generator, acc.device,
                                       embeds.dtype)
    cond = _with_negative(embeds, negative_embeds, config.guidance_scale)
    parts.scheduler.set_timesteps(config.num_inference_steps, device=acc.device)
    states, log_probs = [latents], []
    with acc.autocast():
        for t in parts.scheduler.timesteps:
            noise_pred = sampling.predict_noise(run.unet, latents, t, cond, config.guidance_scale, use_checkpoint=False)
            latents, log_prob = ddim_step_with_logprob(parts.scheduler, noise_pred.float(), t, latents.float(),
                                                       config.eta, generator=generator)
            states.append(latents)
            log_probs.append(log_prob)
        images = sampling.decode(parts.vae, latents.to(parts.vae.dtype))
    return embeds, torch.stack(states, 1), torch.stack(log_probs, 1), images.float()


def _with_negative(embeds, negative, guidance_scale):
    if guidance_scale <= 1.0:
        return embeds
    return torch.cat([negative.expand(embeds.shape[0], -1, -1), embeds])


def ddpo_loop(run: runtime.Run, tracker: PerPromptStatTracker) -> None:
    config, parts, acc = run.config, run.parts, run.accelerator
    negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], acc.device)
    progress = tqdm(range(run.state.step, config.num_steps), initial=run.state.step, total=config.num_steps,
                    desc="ddpo", disable=not acc.is_local_main_process)
    for step in progress:
        started = time.perf_counter()
        prompts = run.prompts_for(step, 0, batch_size=config.ddpo_samples_per_step)
        generator = sampling.step_generator(config.seed, step, 0, acc.process_index)
        embeds, states, old_log_probs, images = sample_trajectories(run, prompts, negative, generator)
        rewards = run.reward(images, prompts).detach()
        if not torch.isfinite(rewards).all():
            from alignprop.train import TrainingError

            raise TrainingError(f"reward {config.reward!r} returned a non-finite value at step {step}; "
                                "no adapter was written")
        all_rewards = acc.gather(rewards.float())
        all_prompts = _gather_prompts(acc, prompts)
        advantages = tracker.update(all_prompts, all_rewards.cpu().numpy())
        mine = slice(acc.process_index * len(prompts), (acc.process_index + 1) * len(prompts))
        advantages = torch.as_tensor(advantages[mine], dtype=torch.float32, device=acc.device)
        advantages = advantages.clamp(-config.ddpo_adv_clip_max, config.ddpo_adv_clip_max)
        stats = ppo_update(run, embeds, negative, states, old_log_probs, advantages,
                           sampling.step_rng(config.seed, step, 1))
        run.state.step = step + 1
        metrics = {"reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
                   **stats, "step_time_s": time.perf_counter() - started, "images_seen": run.state.step * run.images_per_step,
                   "peak_mem_gib": runtime.peak_memory_gib(acc.device)}
        run.log(metrics, images=images if run.wants_samples(step + 1) else None)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.4f}")
        run.maybe_checkpoint()


def _gather_prompts(acc, prompts: list[str]) -> list[str]:
    if acc.num_processes == 1:
        return list(prompts)
    from accelerate.utils import gather_object

    return list(gather_object(list(prompts)))


def ppo_update(run, embeds, negative, states, old_log_probs, advantages, rng) -> dict:
    """Inner epochs of PPO over the sampled trajectories; one optimizer step per epoch."""
    config, parts, acc = run.config, run.parts, run.accelerator
    timesteps = parts.scheduler.timesteps
    n_train = max(1, int(round(len(timesteps) * config.ddpo_timestep_fraction)))
    batch = config.train_batch_size
    losses, ratios, clipfracs, grad_norm = [], [], [], None
    for _ in range(config.ddpo_num_inner_epochs):
        chosen = sorted(rng.sample(range(len(timesteps)), n_train))
        order = list(range(len(advantages)))
        rng.shuffle(order)
        work = [(mb, j) for mb in range(0, len(order), batch) for j in chosen]
        for i, (mb, j) in enumerate(work):
            idx = torch.tensor(order[mb:mb + batch], device=states.device)
            cond = _with_negative(embeds[idx], negative, config.guidance_scale)
            last = i == len(work) - 1
            context = acc.no_sync(run.unet) if not last else contextlib.nullcontext()
            with context, acc.autocast():
                noise_pred = sampling.predict_noise(run.unet, states[idx, j], timesteps[j], cond,
                                                    config.guidance_scale, use_checkpoint=False)
                _, log_prob = ddim_step_with_logprob(parts.scheduler, noise_pred.float(), timesteps[j],
                                                     states[idx, j].float(), config.eta, prev_latents=states[idx, j + 1])
                loss, ratio = ppo_clipped_loss(log_prob, old_log_probs[idx, j], advantages[idx], config.ddpo_clip_range)
                acc.backward(loss / len(work))
            losses.append(loss.item())
            ratios.append(ratio.detach().mean().item())
            clipfracs.append(((ratio - 1).abs() > config.ddpo_clip_range).float().mean().item())
        if config.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(run.lora_params, config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return {"loss": float(np.mean(losses)), "approx_ratio": float(np.mean(ratios)),
            "clipfrac": float(np.mean(clipfracs)), "grad_norm": float(grad_norm) if grad_norm is not None else None}
