"""`alignprop train`: reward backpropagation into LoRA adapters (AlignProp, arXiv 2310.03739).

One optimizer step, read top to bottom:
  1. every process draws its own slice of the step's prompts and its own initial noise (from seed + step);
  2. DDIM-sample through the prepared (DDP-wrapped) UNet, keeping the graph for the last K steps only;
  3. decode with the VAE, score with the reward, loss = -coefficient * reward;
  4. backward into the LoRA weights (all-reduced across processes), clip, AdamW.
Every random draw is a function of (seed, step, rank, micro-step), so a resumed run repeats exactly what an
uninterrupted run would have done.

The shared run machinery (accelerator, output directory, checkpoints, metrics) lives in `alignprop.runtime`
and is used by the DDPO baseline too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignprop import runtime, sampling
from alignprop.config import ConfigError, TrainConfig
from alignprop.errors import UserError
from alignprop.rewards import REWARDS, parse_mix

logger = logging.getLogger(__name__)


class TrainingError(UserError):
    """The run diverged (e.g. a NaN reward or loss); nothing finished-looking is written."""


def train(config: TrainConfig) -> Path:
    """Train an adapter; return the output directory holding `pytorch_lora_weights.safetensors`."""
    config.validate()
    if not all(REWARDS[name].differentiable for name, _ in parse_mix(config.reward)):
        raise ConfigError(f"reward {config.reward!r} is not differentiable, so AlignProp cannot backpropagate it; "
                          "use a differentiable reward (see `alignprop rewards list`) or --method ddpo")
    with runtime.setup_run(config) as run:
        train_loop(run)
        return run.finish()


def train_loop(run: runtime.Run) -> None:
    """Optimizer steps from `run.state.step` to `config.num_steps`."""
    config = run.config
    parts, accelerator = run.parts, run.accelerator
    negative_embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], accelerator.device)

    progress = tqdm(range(run.state.step, config.num_steps), initial=run.state.step, total=config.num_steps,
                    desc="alignprop", disable=not accelerator.is_local_main_process)
    run.validate_base()
    for step in progress:
        started = time.perf_counter()
        rewards, loss_value, truncation_k, grad_norm = [], 0.0, [], None
        for micro in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(run.unet):
                prompts = run.prompts_for(step, micro)
                generator = sampling.step_generator(config.seed, step, micro, accelerator.process_index)
                k = sampling.draw_truncation_k(
                    config.truncation, config.num_inference_steps, sampling.step_rng(config.seed, step, micro),
                    config.truncation_k, config.truncation_min, config.truncation_max,
                    config.truncation_mean, config.truncation_std)
                images = generate_with_grad(run, prompts, negative_embeds, generator, k)
                reward = run.reward(images.float(), prompts)
                if not torch.isfinite(reward).all():
                    raise TrainingError(f"reward {config.reward!r} returned a non-finite value at step {step} "
                                        f"(values {reward.detach().cpu().tolist()}); lower learning_rate or check "
                                        "the reward; no adapter was written")
                loss = -config.reward_loss_coefficient * reward.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(run.lora_params, config.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            rewards.append(reward.detach())
            loss_value += loss.item() / config.gradient_accumulation_steps  # a CPU-GPU sync point, once per micro-step
            truncation_k.append(k)

        all_rewards = accelerator.gather(torch.cat(rewards)).float()
        lr = run.advance_lr()
        run.state.step = step + 1
        metrics = {
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std().item() if all_rewards.numel() > 1 else 0.0,
            "loss": accelerator.reduce(torch.tensor(loss_value, device=accelerator.device), "mean").item(),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": lr,
            "truncation_k": sum(truncation_k) / len(truncation_k),
            "step_time_s": time.perf_counter() - started,
            "images_seen": run.state.step * run.images_per_step,
            "peak_mem_gib": runtime.peak_memory_gib(accelerator.device),
        }
        if run.wants_validation():
            metrics.update(run.validate())
        run.log(metrics, images=images if run.wants_samples(step + 1) else None)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.4f}")
        run.maybe_checkpoint()


def generate_with_grad(run: runtime.Run, prompts: list[str], negative_embeds: torch.Tensor,
                       generator: torch.Generator, grad_steps: int) -> torch.Tensor:
    """Images in [0, 1] with the autograd graph of the last `grad_steps` DDIM steps and the VAE decode."""
    config, parts, accelerator = run.config, run.parts, run.accelerator
    prompt_embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, prompts, accelerator.device)
    latents = sampling.initial_latents(len(prompts), parts.unet.config, parts.scheduler, generator,
                                       accelerator.device, prompt_embeds.dtype)
    with accelerator.autocast():
        latents = sampling.denoise(
            run.unet, parts.scheduler, latents, prompt_embeds, negative_embeds, config.num_inference_steps,
            config.guidance_scale, eta=config.eta, grad_steps=grad_steps,
            use_checkpoint=config.gradient_checkpointing, generator=generator)
        return sampling.decode(parts.vae, latents.to(parts.vae.dtype), use_checkpoint=config.gradient_checkpointing)
