"""The maths of DDPO (Black et al. 2023, arXiv 2305.13301), as pure tensor-in/tensor-out functions.

- `ddim_step_with_logprob`: one stochastic DDIM step (eta > 0) and the log-density of the step it took. The
  update is diffusers' `DDIMScheduler.step` (formulas (12) and (16) of DDIM, arXiv 2010.02502), built from the
  scheduler's own `alphas_cumprod`, so a trajectory sampled here is the one `scheduler.step` would sample.
- `ppo_clipped_loss`: PPO's clipped surrogate objective (Schulman et al. 2017, arXiv 1707.06347, Eq. 7).
- `PerPromptStatTracker`: advantages = rewards standardised per prompt (DDPO Sec. 4.3 / App. "stat tracking").
"""

from __future__ import annotations

import math
from collections import defaultdict, deque

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] for broadcasting over latents; scalars stay scalars."""
    return values.reshape(values.shape + (1,) * (ndim - 1)) if values.ndim == 1 else values


def ddim_step_with_logprob(scheduler, noise_pred: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor,
                           eta: float, prev_latents: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} with its log-probability under the policy N(mean, std^2 I).

    `timestep` is a scalar or one timestep per sample ([B]). When `prev_latents` is None a sample is drawn
    (mean + std * noise, noise from `generator` on the CPU, so draws do not depend on the device); otherwise the
    log-probability of the given `prev_latents` is computed (this is how PPO re-scores a stored trajectory).
    Returns (prev_latents, log_prob [B]): the Gaussian log-density averaged over the latent dimensions, as DDPO
    does (a per-dimension mean keeps the PPO ratio on the same scale for any latent size).
    """
    config = scheduler.config
    if eta <= 0:
        raise ValueError(f"eta={eta}: the log-probability of a deterministic (eta=0) DDIM step is undefined; "
                         "DDPO needs eta > 0 (the paper uses 1.0)")
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {config.prediction_type!r}")
    if getattr(config, "thresholding", False):
        raise ValueError("dynamic thresholding is not supported by the DDPO step; disable it in the scheduler config")
    ndim = latents.ndim
    timestep = torch.as_tensor(timestep, device=latents.device)
    prev_timestep = timestep - config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(latents.device, torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=latents.device)
    alpha_t = _per_sample(alphas_cumprod[timestep], ndim)
    alpha_prev = _per_sample(torch.where(prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final), ndim)
    beta_t = 1 - alpha_t

    if config.prediction_type == "epsilon":
        pred_x0, pred_eps = (latents - beta_t.sqrt() * noise_pred) / alpha_t.sqrt(), noise_pred
    elif config.prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * latents - beta_t.sqrt() * noise_pred
        pred_eps = alpha_t.sqrt() * noise_pred + beta_t.sqrt() * latents
    else:
        pred_x0 = noise_pred
        pred_eps = (latents - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    if config.clip_sample:
        pred_x0 = pred_x0.clamp(-config.clip_sample_range, config.clip_sample_range)

    variance = (1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)  # sigma_t^2 / eta^2, formula (16) of DDIM
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).sqrt() * pred_eps  # formula (12) of DDIM
    if prev_latents is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        prev_latents = mean + std * noise
    # log N(x; mean, std^2) = -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)
    log_prob = (-((prev_latents.detach() - mean) ** 2) / (2 * std**2) - torch.log(std)
                - math.log(math.sqrt(2 * math.pi)))
    return prev_latents, log_prob.mean(dim=tuple(range(1, ndim)))


def ppo_clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                     clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a loss to minimise, and the importance ratio r = p_new / p_old:

        loss = mean( max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) )
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


class PerPromptStatTracker:
    """Advantages = (reward - mean) / std over the same prompt's last `buffer_size` rewards; until a prompt has
    `min_count` rewards, the statistics of the whole batch are used instead. The buffers persist across steps
    (and across checkpoints: `state_dict` / `load_state_dict`)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        prompts_array = np.array(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):  # unique, in order
            mask = prompts_array == prompt
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
