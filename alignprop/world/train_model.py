"""`alignprop world train-model OUT`: train the world's tiny text-to-image model from scratch on CPU.

Diffusers' own components and the standard losses, in two stages:
  1. AutoencoderKL: reconstruction (MSE) + a small KL term; the latent scaling factor is set to 1 / std of the
     latents, as Stable Diffusion did (Rombach et al. 2022, arXiv 2112.10752, Sec. G);
  2. UNet2DConditionModel + CLIPTextModel, jointly: epsilon-prediction MSE at timesteps drawn uniformly from
     DDPMScheduler's 1000 (Ho et al. 2020, arXiv 2006.11239, Eq. 14), with the caption dropped 10% of the time so
     classifier-free guidance works (Ho & Salimans 2022, arXiv 2207.12598).
The result is saved with `StableDiffusionPipeline.save_pretrained` and a MANIFEST.json (command, seed, sha256 of
every file, quality figures measured by the exact ground-truth metrics).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignprop import models, storage
from alignprop.world import prompts as world_prompts
from alignprop.world.metrics import world_metrics
from alignprop.world.render import render_dataset

logger = logging.getLogger(__name__)


@dataclass
class WorldModelConfig:
    seed: int = 0  # seeds data, init and noise
    num_images: int = 24000  # rendered training images (train split only)
    vae_steps: int = 500  # autoencoder optimizer steps
    vae_lr: float = 1e-3  # autoencoder AdamW learning rate
    kl_weight: float = 1e-6  # weight of the KL term against per-pixel MSE
    unet_steps: int = 1500  # UNet + text encoder optimizer steps
    unet_lr: float = 1e-3  # AdamW learning rate, cosine-decayed to 10%
    batch_size: int = 32  # images per step
    uncond_prob: float = 0.1  # caption dropout for classifier-free guidance
    eval_images: int = 64  # generated images for the quality figures
    eval_steps: int = 20  # DDIM steps for the quality figures
    eval_guidance: float = 5.0  # guidance scale for the quality figures (and the `tiny` preset)
    tokenizer_max_length: int = 16  # captions are 3 words; 16 tokens leaves room for start/end and padding


def build_components(config: WorldModelConfig):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    tokenizer = models.build_word_tokenizer(list(world_prompts.VOCABULARY), config.tokenizer_max_length)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=config.tokenizer_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    ))
    return tokenizer, vae, unet, text_encoder


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    for _ in range(steps):
        yield rng.integers(0, n, size=batch_size)


def train_vae(vae, images: torch.Tensor, config: WorldModelConfig, rng) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    vae.train()
    for step, idx in enumerate(tqdm(_batches(len(images), config.batch_size, config.vae_steps, rng),
                                    total=config.vae_steps, desc="world vae")):
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, 2048, 256)])
    return float(1.0 / latents.std())


def latent_distribution(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std for images in [-1, 1], scaled by `vae.config.scaling_factor` (the latents
    the denoiser is trained on)."""
    scaling = vae.config.scaling_factor
    with torch.no_grad():
        dists = [vae.encode(images[i:i + 512]).latent_dist for i in range(0, len(images), 512)]
        return torch.cat([d.mean for d in dists]) * scaling, torch.cat([d.std for d in dists]) * scaling


def train_denoiser(unet, text_encoder, tokenizer, latents_dist, captions, config: WorldModelConfig, rng):
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**{k: v for k, v in models.SD_SCHEDULER_CONFIG.items()
                                       if k not in ("set_alpha_to_one", "steps_offset")})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / config.unet_steps))))
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    mean, std = latents_dist
    generator = torch.Generator().manual_seed(config.seed)
    unet.train()
    text_encoder.train()
    progress = tqdm(_batches(len(ids), config.batch_size, config.unet_steps, rng), total=config.unet_steps,
                    desc="world unet")
    for step, idx in enumerate(progress):
        latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        batch_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=generator) < config.uncond_prob
        batch_ids[drop] = empty
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        embeds = text_encoder(batch_ids)[0]
        noise_pred = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        loss = F.mse_loss(noise_pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    text_encoder.eval()


def sample_world(model_dir: str | Path, num_images: int = 64, steps: int = 20, guidance: float = 5.0,
                 seed: int = 1234, heldout: bool = False, adapter: str | Path | None = None
                 ) -> tuple[torch.Tensor, list[str]]:
    """`num_images` samples [N, 3, H, W] in [0, 1] and their captions, cycling over the train or held-out captions;
    fixed seeds, so two calls with the same arguments draw the same initial noise."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    if adapter:
        pipe.load_lora_weights(str(adapter))
        models.gate_lora(pipe.unet, models.adapter_min_timestep(adapter))  # the steps it was trained on
    pipe.set_progress_bar_config(disable=True)
    captions = world_prompts.heldout_captions() if heldout else world_prompts.train_captions()
    chosen = [captions[i % len(captions)] for i in range(num_images)]
    images = []
    for start in range(0, num_images, 16):
        batch = chosen[start:start + 16]
        out = pipe(batch, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                   generator=torch.Generator().manual_seed(seed + start)).images
        images.append(out)
    return torch.cat(images), chosen


def evaluate_model(model_dir: str | Path, num_images: int = 64, steps: int = 20, guidance: float = 5.0,
                   seed: int = 1234, heldout: bool = False, adapter: str | Path | None = None,
                   per_image: bool = False) -> dict:
    """Ground-truth count and colour accuracy of `num_images` samples, cycling over the captions. `per_image` keeps
    each image's exact count and its prompted count (`counts`, `targets`), for paired comparisons of two models
    sampled from the same noise."""
    images, chosen = sample_world(model_dir, num_images, steps, guidance, seed, heldout, adapter)
    metrics = world_metrics(images, chosen)
    metrics.pop("per_prompt")
    if per_image:
        metrics["targets"] = [world_prompts.parse_caption(c)[0] for c in chosen]
    else:
        metrics.pop("counts")
    return {**metrics, "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed,
            "prompts": "heldout" if heldout else "train"}


def write_manifest(directory: Path, extra: dict) -> dict:
    files = {str(p.relative_to(directory)): {"sha256": storage.sha256_file(p), "size": p.stat().st_size}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"}
    manifest = {**extra, "files": files}
    (directory / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def train_world_model(out: str | Path, config: WorldModelConfig | None = None, command: str | None = None) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    config = config or WorldModelConfig()
    out = Path(out)
    started = time.time()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    images_np, captions, _ = render_dataset(config.num_images, seed=config.seed)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2) * 2 - 1  # [-1, 1], as SD's VAE expects
    tokenizer, vae, unet, text_encoder = build_components(config)

    scaling = train_vae(vae, images, config, rng)
    vae.register_to_config(scaling_factor=scaling)
    vae.requires_grad_(False)
    train_denoiser(unet, text_encoder, tokenizer, latent_distribution(vae, images), captions, config, rng)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(**models.SD_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    train_seconds = time.time() - started
    quality = evaluate_model(tmp, config.eval_images, config.eval_steps, config.eval_guidance)
    heldout = evaluate_model(tmp, config.eval_images, config.eval_steps, config.eval_guidance, heldout=True)
    manifest = write_manifest(tmp, {
        "command": command or f"alignprop world train-model {out} --seed {config.seed}",
        "seed": config.seed, "config": asdict(config), "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__, "quality": quality, "quality_heldout": heldout,
        "quality_bar": {"color_accuracy_min": 0.9, "count_accuracy_chance": 0.25},
    })
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("world model written to %s: %s", out, quality)
    return manifest
