"""Does the gradient of `world_count` point towards the prompted count? Three probes, scored by the exact counter.

    .venv/bin/python benchmarks/count_reward_gradient.py --images 32

1. Pixels. Start from the world model's samples (held-out captions) and run gradient ascent on the reward with
   respect to the pixels themselves. A reward whose gradient carries the count changes the exact count; a reward
   that can be fooled reaches its own target while the exact count stays where it was.
2. Initial noise. Optimise each sample's initial latent x_T (its norm held fixed) through the whole DDIM chain and
   the VAE decoder, as AlignProp's full-chain gradient does, but per sample and without touching the weights. If the
   exact count follows the reward here, the reward's gradient seen through the generator is sound, and what limits
   AlignProp is turning many such per-sample gradients into one shared LoRA update. A control moves each x_T as
   far in a random direction.
3. One LoRA. Fit a single LoRA adapter (the tiny preset's, or another shape with `--set lora_rank=8` and
   `--set lora_target_modules=...`) to those same samples through the full chain, the initial noise fixed, and
   score it on them and on three fresh draws of noise for the same captions: how much of what the per-sample probe
   reaches one shared update can reach, and whether it carries over to new noise.

Prints accuracy by the regressor (its prediction rounded) and by the exact counter, their agreement and the size
of the change. A benchmark: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from alignprop import models, sampling
from alignprop.config import ConfigError, parse_overrides, tiny, update
from alignprop.world import prompts as world_prompts
from alignprop.world.metrics import count_batch
from alignprop.world.rewards import load_count_regressor


def on_sphere(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """`x` rescaled so that each sample has the L2 norm given in `norm` ([B, 1, 1, 1])."""
    return x * norm / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def report(label: str, regressor, images: torch.Tensor, targets: torch.Tensor, extra: str = "") -> None:
    with torch.no_grad():
        predicted = regressor(images).round()
    exact = count_batch(images)
    print(f"{label:>28}  regressor acc {(predicted == targets).float().mean():.3f}  exact acc "
          f"{np.mean(exact == targets.numpy()):.3f}  agree {np.mean(exact == predicted.numpy()):.3f}  {extra}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="samples probed (held-out captions, cycled)")
    parser.add_argument("--weights", default=None, help="a world_count weights directory (default: the shipped one)")
    parser.add_argument("--pixel-lrs", default="0.003,0.01", help="Adam learning rates of the pixel probe")
    parser.add_argument("--pixel-iters", type=int, default=60)
    parser.add_argument("--noise-lr", type=float, default=0.05, help="Adam learning rate on x_T")
    parser.add_argument("--noise-iters", type=int, default=15)
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="AdamW learning rate of the LoRA probe")
    parser.add_argument("--lora-iters", type=int, default=15)
    parser.add_argument("--probes", default="pixels,noise,lora", help="which probes to run, comma-separated")
    parser.add_argument("--seed", type=int, default=7, help="seed of the initial noise and the LoRA's initialisation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="tiny-preset override, e.g. lora_rank=8 (repeatable; the sampler keys change every probe)")
    args = parser.parse_args()
    if args.images < 1 or min(args.pixel_iters, args.noise_iters, args.lora_iters) < 0:
        parser.error("--images must be at least 1 and the iteration counts non-negative")
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    unknown = set(probes) - {"pixels", "noise", "lora"}
    if unknown or not probes:
        parser.error(f"--probes takes pixels, noise and/or lora, comma-separated; got {args.probes!r}")
    try:
        pixel_lrs = [float(lr) for lr in args.pixel_lrs.split(",") if lr.strip()]
    except ValueError:
        parser.error(f"--pixel-lrs takes numbers separated by commas, e.g. 0.003,0.01; got {args.pixel_lrs!r}")

    try:  # the sampler AlignProp trains with (DDIM steps, guidance, eta) and the LoRA's shape
        config = tiny()
        config = update(config, parse_overrides(config, args.overrides)).validate()
    except ConfigError as e:
        parser.error(str(e))
    parts = models.load_parts(config.pretrained_model)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.requires_grad_(False)
    regressor = load_count_regressor(args.weights)
    captions = world_prompts.heldout_captions()
    captions = [captions[i % len(captions)] for i in range(args.images)]
    targets = torch.tensor([world_prompts.parse_caption(c)[0] for c in captions], dtype=torch.float32)
    embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, captions, "cpu")
    negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], "cpu")
    generator = torch.Generator().manual_seed(args.seed)
    noise = sampling.initial_latents(args.images, parts.unet.config, parts.scheduler, generator, "cpu")
    norm = noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def generate(x_t: torch.Tensor) -> torch.Tensor:
        latents = sampling.denoise(parts.unet, parts.scheduler, x_t, embeds, negative, config.num_inference_steps,
                                   config.guidance_scale, eta=config.eta, use_checkpoint=True)
        return sampling.decode(parts.vae, latents, use_checkpoint=True)

    with torch.no_grad():
        samples = generate(noise)
    print(f"{args.images} samples of the world model, held-out captions, {config.num_inference_steps} DDIM steps")
    report("samples", regressor, samples, targets)

    if "pixels" in probes:
        pixel_probe(args, pixel_lrs, regressor, samples, targets)
    if "noise" in probes:
        noise_probe(args, generate, regressor, noise, norm, samples, targets, generator, config)
    if "lora" in probes:
        lora_probe(args, generate, regressor, noise, targets, parts, config)


def pixel_probe(args, pixel_lrs, regressor, samples, targets) -> None:
    print(f"\n1. gradient ascent on the pixels, {args.pixel_iters} Adam steps")
    for lr in pixel_lrs:
        pixels = samples.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([pixels], lr=lr)
        for _ in range(args.pixel_iters):
            loss = (regressor(pixels.clamp(0, 1)) - targets).abs().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        changed = pixels.detach().clamp(0, 1)
        change = (changed - samples).pow(2).mean().sqrt()
        report(f"lr {lr}", regressor, changed, targets, f"rms pixel change {change:.3f}")


def noise_probe(args, generate, regressor, noise, norm, samples, targets, generator, config) -> None:
    print(f"\n2. the initial noise x_T through the {config.num_inference_steps}-step chain and the decoder, "
          f"Adam lr {args.noise_lr}, |x_T| held fixed")
    x_t = noise.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x_t], lr=args.noise_lr)
    for it in range(1, args.noise_iters + 1):
        images = generate(on_sphere(x_t, norm))
        loss = (regressor(images) - targets).abs().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if it % 5 == 0 or it == args.noise_iters:
            with torch.no_grad():
                images = generate(on_sphere(x_t, norm))
            report(f"after {it} steps", regressor, images, targets,
                   f"rms pixel change {(images - samples).pow(2).mean().sqrt():.3f}")
    # Control: a random move of x_T as large as the optimised one, per sample. Any change of x_T reshuffles the
    # image; only a move along the reward's gradient should raise the exact count accuracy.
    with torch.no_grad():
        step = (x_t - noise).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        direction = torch.randn(noise.shape, generator=generator)
        moved = noise + on_sphere(direction, step)
        images = generate(on_sphere(moved, norm))
    report("control: random move", regressor, images, targets,
           f"rms pixel change {(images - samples).pow(2).mean().sqrt():.3f}")


def lora_probe(args, generate, regressor, noise, targets, parts, config) -> None:
    print(f"\n3. one LoRA (rank {config.lora_rank}, {', '.join(config.lora_target_modules)}) fitted to these "
          f"{args.images} samples through the full chain, AdamW lr {args.lora_lr}, {args.images} images per step")
    torch.manual_seed(args.seed)  # LoRA's A matrices start random: the same seed, the same adapter
    params = models.add_lora(parts.unet, config.lora_rank, config.lora_alpha, config.lora_target_modules)
    optimizer = torch.optim.AdamW(params, lr=args.lora_lr, weight_decay=config.adam_weight_decay)
    fresh = [sampling.initial_latents(len(targets), parts.unet.config, parts.scheduler,
                                      torch.Generator().manual_seed(args.seed + k), "cpu") for k in (1, 2, 3)]

    def score(it: int) -> None:
        with torch.no_grad():
            fixed = np.mean(count_batch(generate(noise)) == targets.numpy())
            new = np.mean([np.mean(count_batch(generate(x)) == targets.numpy()) for x in fresh])
        print(f"{f'after {it} steps':>28}  exact acc on these samples {fixed:.3f}  on fresh noise {new:.3f} "
              f"({3 * len(targets)} images)", flush=True)

    score(0)
    for it in range(1, args.lora_iters + 1):
        loss = (regressor(generate(noise)) - targets).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        if it % 5 == 0 or it == args.lora_iters:
            score(it)


if __name__ == "__main__":
    main()
