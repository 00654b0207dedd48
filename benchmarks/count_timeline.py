"""When, in the DDIM chain, does the world model settle how many objects it draws?

    .venv/bin/python benchmarks/count_timeline.py --images 128

Samples the world model with the tiny preset's sampler (DDIM, guidance, eta). After each denoising step it decodes
the scheduler's prediction of the clean latent x_0 from that step (DDIMScheduler's `pred_original_sample`) and
counts its objects with the exact counter. It prints, per step, how often that early count already equals the final
image's count, and the exact count accuracy of the early image.

A reward gradient that reaches only the last steps (truncation K=1) cannot move a count settled many steps before.

A benchmark: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from alignprop import models, sampling
from alignprop.config import ConfigError, tiny, update
from alignprop.world import prompts as world_prompts
from alignprop.world.metrics import count_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="samples (captions cycled)")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout", help="which captions")
    parser.add_argument("--model", default="world", help="'world' (the shipped model) or a diffusers directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images must be at least 1; got {args.images}")
    try:
        config = update(tiny(), {"pretrained_model": args.model}).validate()
        parts = models.load_parts(config.pretrained_model)
    except (ConfigError, models.ModelError) as e:
        parser.error(str(e))

    captions = world_prompts.heldout_captions() if args.split == "heldout" else world_prompts.train_captions()
    captions = [captions[i % len(captions)] for i in range(args.images)]
    targets = np.array([world_prompts.parse_caption(c)[0] for c in captions])
    generator = torch.Generator().manual_seed(args.seed)
    scheduler = parts.scheduler
    with torch.no_grad():
        embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, captions, "cpu")
        if config.guidance_scale > 1.0:
            negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], "cpu")
            embeds = torch.cat([negative.expand(len(captions), -1, -1), embeds])
        latents = sampling.initial_latents(len(captions), parts.unet.config, scheduler, generator, "cpu")
        scheduler.set_timesteps(config.num_inference_steps)
        early_counts = []
        for t in scheduler.timesteps:
            noise_pred = sampling.predict_noise(parts.unet, latents, t, embeds, config.guidance_scale,
                                                use_checkpoint=False)
            out = scheduler.step(noise_pred, t, latents, eta=config.eta, generator=generator)
            latents = out.prev_sample
            early_counts.append(count_batch(sampling.decode(parts.vae, out.pred_original_sample)))
        final = count_batch(sampling.decode(parts.vae, latents))

    print(f"{args.images} samples, {args.split} captions, {config.num_inference_steps} DDIM steps, guidance "
          f"{config.guidance_scale}, eta {config.eta}; final exact count accuracy {np.mean(final == targets):.3f}")
    print(f"{'step':>4}  {'timestep':>8}  {'x0 count = final count':>22}  {'x0 count accuracy':>17}")
    for i, (t, counts) in enumerate(zip(scheduler.timesteps, early_counts), start=1):
        print(f"{i:>4}  {int(t):>8}  {np.mean(counts == final):>22.3f}  {np.mean(counts == targets):>17.3f}")


if __name__ == "__main__":
    main()
