"""`alignprop world train-model OUT`: train the world's tiny text-to-image model from scratch on CPU.

Diffusers' own components and the standard losses, in two stages:
  1. AutoencoderKL: reconstruction (MSE) + a small KL term; the latent scaling factor is set to 1 / std of the
     latents, as Stable Diffusion did (Rombach et al. 2022, arXiv 2112.10752, Sec. G);
  2. UNet2DConditionModel + CLIPTextModel, jointly: epsilon-prediction MSE at timesteps drawn uniformly from
     DDPMScheduler's 1000 (Ho et al. 2020, arXiv 2006.11239, Eq. 14), with the caption dropped 10% of the time so
     classifier-free guidance works (Ho & Salimans 2022, arXiv 2207.12598); an exponential moving average of the
     weights is what gets saved (diffusers' EMAModel, as its train_text_to_image example does).
The result is saved with `StableDiffusionPipeline.save_pretrained` and a MANIFEST.json (command, seed, sha256 of
every file, quality figures measured by the exact ground-truth metrics).

The UNet keeps cross-attention at its 8x8 level only (and in the mid block): the downstream trainer
differentiates through 20 DDIM steps of it, and attention at 16x16 would triple the cost of each step.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignprop import models
from alignprop.world import prompts as world_prompts
from alignprop.world.manifest import write_manifest
from alignprop.world.metrics import world_metrics
from alignprop.world.render import IMAGE_SIZE, render_dataset

logger = logging.getLogger(__name__)

QUALITY_BAR = {"color_accuracy_min": 0.9, "count_accuracy_chance": 0.25}


@dataclass
class WorldModelConfig:
    seed: int = 0  # seeds data, init and noise
    num_images: int = 20000  # rendered training images (train split only)
    # --- autoencoder -------------------------------------------------------------------------
    vae_channels: tuple[int, ...] = (16, 32)  # AutoencoderKL block_out_channels; 2 levels: 32x32 -> 16x16 latents
    vae_steps: int = 400  # autoencoder optimizer steps
    vae_batch_size: int = 32  # images per autoencoder step
    vae_lr: float = 2e-3  # autoencoder AdamW learning rate, cosine-decayed to 10%
    kl_weight: float = 1e-6  # weight of the KL term against per-pixel MSE
    # --- UNet + text encoder -----------------------------------------------------------------
    unet_channels: tuple[int, ...] = (32, 64)  # UNet block_out_channels (16x16 and 8x8 levels)
    cross_attention_dim: int = 64  # text embedding width = CLIP hidden size
    text_layers: int = 2  # CLIP text encoder layers
    unet_steps: int = 1500  # UNet + text encoder optimizer steps
    unet_lr: float = 1e-3  # AdamW learning rate: 200-step warm-up, cosine-decayed to 10%
    batch_size: int = 32  # images per UNet step
    uncond_prob: float = 0.1  # caption dropout for classifier-free guidance
    ema_decay: float = 0.995  # EMA of UNet + text encoder weights (with warm-up); 0 saves the raw weights
    # --- quality figures ---------------------------------------------------------------------
    eval_images: int = 64  # generated images for the quality figures
    eval_steps: int = 20  # DDIM steps for the quality figures
    eval_guidance: float = 5.0  # guidance scale for the quality figures (the `tiny` preset's guidance_scale)
    tokenizer_max_length: int = 16  # captions are 3 words; 16 tokens leaves room for start/end and padding


def build_components(config: WorldModelConfig):
    """Seeded, untrained tokenizer, AutoencoderKL, UNet2DConditionModel and CLIPTextModel."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    tokenizer = models.build_word_tokenizer(list(world_prompts.VOCABULARY), config.tokenizer_max_length)
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(config.vae_channels),
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, sample_size=IMAGE_SIZE,
    )
    n = len(config.unet_channels)  # plain blocks at 16x16, cross-attention below it
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (levels - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(config.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=config.cross_attention_dim, attention_head_dim=8, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.cross_attention_dim,
        intermediate_size=2 * config.cross_attention_dim, num_hidden_layers=config.text_layers,
        num_attention_heads=4, max_position_embeddings=config.tokenizer_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=config.cross_attention_dim,
    ))
    return tokenizer, vae, unet, text_encoder


def warmup_cosine(total_steps: int, warmup: int = 0, floor: float = 0.1):
    """LR multiplier: linear warm-up, then cosine decay from 1 to `floor`."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(warmup, 1)) * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * step / total_steps)))
    return factor


def train_vae(vae, images: torch.Tensor, config: WorldModelConfig, rng: np.random.Generator) -> float:
    """Fit the autoencoder on `images` in [-1, 1]; return the latent scaling factor 1 / std."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.vae_steps))
    vae.train()
    progress = tqdm(range(config.vae_steps), desc="world vae")
    for step in progress:
        x = images[rng.integers(0, len(images), size=config.vae_batch_size)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, 2048, 256)])
    return float(1.0 / latents.std())


def encode_latents(vae, images: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, scaled to unit variance: the denoiser samples from them."""
    with torch.no_grad():
        dists = [vae.encode(images[i:i + 512]).latent_dist for i in range(0, len(images), 512)]
    return torch.cat([d.mean for d in dists]) * scaling, torch.cat([d.std for d in dists]) * scaling


def train_denoiser(unet, text_encoder, tokenizer, latents_dist, captions, config: WorldModelConfig, rng) -> float:
    """Joint epsilon-prediction training; returns the mean loss of the last 100 steps."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    noise_scheduler = DDPMScheduler(**{k: v for k, v in models.SD_SCHEDULER_CONFIG.items()
                                       if k not in ("set_alpha_to_one", "steps_offset")})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.unet_steps, warmup=200))
    ema = EMAModel(params, decay=config.ema_decay, use_ema_warmup=True) if config.ema_decay else None
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    mean, std = latents_dist
    generator = torch.Generator().manual_seed(config.seed)
    unet.train()
    text_encoder.train()
    losses = []
    progress = tqdm(range(config.unet_steps), desc="world unet")
    for step in progress:
        idx = torch.from_numpy(rng.integers(0, len(ids), size=config.batch_size))
        latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(len(idx), generator=generator) < config.uncond_prob] = empty
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        prompt_embeds = text_encoder(batch_ids)[0]
        noise_pred = unet(noisy_latents, timesteps, encoder_hidden_states=prompt_embeds).sample
        loss = F.mse_loss(noise_pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.step(params)
        losses.append(loss.item())
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    if ema is not None:
        ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    return float(np.mean(losses[-100:]))


def generate(pipe, captions: list[str], steps: int, guidance: float, seed: int, batch_size: int = 32) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] for `captions`; batch i is seeded with seed + its first index."""
    images = []
    for start in range(0, len(captions), batch_size):
        images.append(pipe(captions[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                           output_type="pt", generator=torch.Generator().manual_seed(seed + start)).images)
    return torch.cat(images)


def evaluate_model(model_dir: str | Path, num_images: int = 64, steps: int = 20, guidance: float = 5.0,
                   seed: int = 1234, heldout: bool = False, adapter: str | Path | None = None) -> dict:
    """Ground-truth count and colour accuracy of `num_images` samples, cycling over the captions
    (train or held-out split), plus the count accuracy per prompted count and how often the world_count
    reward's rounded prediction agrees with the exact counter on these samples."""
    from diffusers import StableDiffusionPipeline

    from alignprop.world.rewards import load_count_regressor

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    if adapter:
        pipe.load_lora_weights(str(adapter))
    pipe.set_progress_bar_config(disable=True)
    captions = world_prompts.heldout_captions() if heldout else world_prompts.train_captions()
    chosen = [captions[i % len(captions)] for i in range(num_images)]
    images = generate(pipe, chosen, steps, guidance, seed)
    metrics = world_metrics(images, chosen)
    targets = np.array([world_prompts.parse_caption(c)[0] for c in chosen])
    exact = np.array(metrics.pop("counts"))
    metrics.pop("per_prompt")
    with torch.no_grad():
        predicted = np.rint(load_count_regressor()(images).numpy())
    return {**metrics,
            "count_accuracy_by_count": {int(n): float((exact[targets == n] == n).mean()) for n in np.unique(targets)},
            "count_reward_agreement": float((predicted == exact).mean()),
            "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed,
            "prompts": "heldout" if heldout else "train"}


def train_world_model(out: str | Path, config: WorldModelConfig | None = None, command: str | None = None) -> dict:
    """Render, train the autoencoder, then the denoiser; save a diffusers pipeline with its MANIFEST.json.

    The directory appears complete or not at all (written to OUT.tmp, then renamed)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    config = config or WorldModelConfig()
    out = Path(out)
    timings = {}
    started = time.time()
    rng = np.random.default_rng(config.seed)
    images_np, captions, _ = render_dataset(config.num_images, seed=config.seed)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2) * 2 - 1  # [-1, 1], as SD's VAE expects
    tokenizer, vae, unet, text_encoder = build_components(config)
    timings["render_s"] = time.time() - started

    scaling = train_vae(vae, images, config, rng)
    vae.register_to_config(scaling_factor=scaling)
    vae.requires_grad_(False)
    latents_dist = encode_latents(vae, images, scaling)
    timings["vae_s"] = time.time() - started - timings["render_s"]

    final_loss = train_denoiser(unet, text_encoder, tokenizer, latents_dist, captions, config, rng)
    timings["unet_s"] = time.time() - started - timings["render_s"] - timings["vae_s"]

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(**models.SD_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    timings["train_s"] = time.time() - started
    quality = evaluate_model(tmp, config.eval_images, config.eval_steps, config.eval_guidance)
    heldout = evaluate_model(tmp, config.eval_images, config.eval_steps, config.eval_guidance, heldout=True)
    timings["total_s"] = time.time() - started
    manifest = write_manifest(tmp, {
        "command": command or f"alignprop world train-model {out} --seed {config.seed}",
        "seed": config.seed, "config": asdict(config), "final_unet_loss": round(final_loss, 5),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "quality": quality, "quality_heldout": heldout, "quality_bar": QUALITY_BAR,
    })
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("world model written to %s: %s", out, quality)
    return manifest
