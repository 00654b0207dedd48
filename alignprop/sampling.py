"""The differentiable DDIM sampler of AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739, Sec. 4).

Pure tensor-in/tensor-out functions. The update rule is diffusers' `DDIMScheduler.step` (formula (12) of the
DDIM paper, arXiv 2010.02502), which is built from differentiable tensor ops, so gradients flow through it.

Truncated backprop keeps the autograd graph for the contiguous last K denoising steps only: the first T - K
steps run under `no_grad`, the latents are cut there, and every UNet call after the cut is checkpointed
(recomputed in the backward pass) so memory does not grow with K.
"""

from __future__ import annotations

import random

import torch
from torch.utils.checkpoint import checkpoint


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """`prompt_embeds` [B, 77, D], exactly as `StableDiffusionPipeline.encode_prompt` computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    with torch.no_grad():  # the text encoder is frozen
        return text_encoder(ids)[0]


def draw_truncation_k(mode: str, num_steps: int, rng: random.Random, k: int = 1, k_min: int = 1,
                      k_max: int = 1, mean: float = 1.0, std: float = 0.0) -> int:
    """Number of final denoising steps that keep their graph: all ("full"), fixed K (DRaFT-K), or drawn once
    per batch from U{k_min..k_max} ("uniform") or round(N(mean, std)) clipped to [1, T] ("gaussian")."""
    if mode == "full":
        return num_steps
    if mode == "fixed":
        return k
    if mode == "uniform":
        return rng.randint(k_min, k_max)
    if mode == "gaussian":
        return min(num_steps, max(1, round(rng.gauss(mean, std))))
    raise ValueError(f"unknown truncation mode {mode!r}")


def predict_noise(unet, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                  guidance_scale: float, use_checkpoint: bool) -> torch.Tensor:
    """`noise_pred` with classifier-free guidance; `prompt_embeds` holds [uncond; cond] when guidance > 1."""
    do_cfg = guidance_scale > 1.0
    model_input = torch.cat([latents, latents]) if do_cfg else latents

    def call(x, emb):
        return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]

    if use_checkpoint:  # non-reentrant: works with DDP and with inputs that do not require grad
        noise_pred = checkpoint(call, model_input, prompt_embeds, use_reentrant=False)
    else:
        noise_pred = call(model_input, prompt_embeds)
    if do_cfg:
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
    return noise_pred


def denoise(unet, scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor,
            negative_prompt_embeds: torch.Tensor | None, num_inference_steps: int, guidance_scale: float,
            eta: float = 0.0, grad_steps: int | None = None, use_checkpoint: bool = True,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Run DDIM from `latents` (already scaled by init_noise_sigma) to x_0.

    Only the last `grad_steps` steps (default: all) keep their graph, and only if grad is enabled by the
    caller. Pass the accelerate-prepared UNet so that DDP all-reduces the LoRA gradients.
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    grad_steps = len(timesteps) if grad_steps is None else grad_steps
    if not 0 <= grad_steps <= len(timesteps):
        raise ValueError(f"grad_steps={grad_steps} must lie in [0, {len(timesteps)}]")
    first_grad_step = len(timesteps) - grad_steps
    grad_enabled = torch.is_grad_enabled()
    if guidance_scale > 1.0:
        negative = negative_prompt_embeds.expand(prompt_embeds.shape[0], -1, -1)
        prompt_embeds = torch.cat([negative, prompt_embeds])
    for i, t in enumerate(timesteps):
        keep_graph = grad_enabled and i >= first_grad_step
        if i == first_grad_step and i > 0:
            latents = latents.detach()  # the cut: nothing before the last K steps receives gradient
        with torch.set_grad_enabled(keep_graph):
            noise_pred = predict_noise(unet, latents, t, prompt_embeds, guidance_scale,
                                       use_checkpoint=use_checkpoint and keep_graph)
            latents = scheduler.step(noise_pred, t, latents, eta=eta, generator=generator).prev_sample
    return latents


def decode(vae, latents: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
    """VAE decode with gradient; returns images in [0, 1]. This is the one and only normalisation."""
    latents = latents / vae.config.scaling_factor
    if use_checkpoint and torch.is_grad_enabled():
        images = checkpoint(lambda z: vae.decode(z, return_dict=False)[0], latents, use_reentrant=False)
    else:
        images = vae.decode(latents, return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1)


def initial_latents(batch_size: int, unet_config, scheduler, generator: torch.Generator, device,
                    dtype=torch.float32) -> torch.Tensor:
    """Gaussian x_T, drawn like `StableDiffusionPipeline.prepare_latents` (so the same generator gives the same
    images), scaled by the scheduler's init_noise_sigma."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (batch_size, unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype) * scheduler.init_noise_sigma


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, rank, ...): every draw of a run is a function of its position,
    so a resumed run repeats exactly the draws of an uninterrupted one."""
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key) % (2**63 - 1)
    return torch.Generator("cpu").manual_seed(value)


def step_rng(seed: int, *keys: int) -> random.Random:
    return random.Random(step_generator(seed, *keys).initial_seed())
