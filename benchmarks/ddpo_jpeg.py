"""Does DDPO raise `jpeg_compressibility` on fresh samples of the world model? Before/after on fixed noise.

    .venv/bin/python benchmarks/ddpo_jpeg.py --set num_steps=10 --set ddpo_samples_per_step=16 \
        --set train_batch_size=16 --set learning_rate=3e-3 --set num_inference_steps=10

Trains DDPO (tiny preset, eta 1, reward jpeg_compressibility, plus your --set values), then samples 12 training
captions x 4 seeds from the same initial noise with and without the adapter (DDIM, eta 0) and prints the mean
reward of each and the paired gain with its standard error. A benchmark: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from alignprop import models, runtime, sampling
from alignprop.config import parse_overrides, tiny, update
from alignprop.ddpo import train_ddpo
from alignprop.rewards import load_reward
from alignprop.world import prompts as world_prompts

CAPTIONS = world_prompts.train_captions()[::3]


def fixed_noise_rewards(adapter, steps: int, guidance: float, seeds) -> torch.Tensor:
    parts = models.load_parts("world")
    if adapter is not None:
        parts.unet.load_lora_adapter(str(adapter / runtime.ADAPTER_FILE), prefix="unet", adapter_name="ddpo")
    reward = load_reward("jpeg_compressibility")
    scores = []
    with torch.no_grad():
        negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], "cpu")
        embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, CAPTIONS, "cpu")
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            latents = sampling.initial_latents(len(CAPTIONS), parts.unet.config, parts.scheduler, generator, "cpu")
            latents = sampling.denoise(parts.unet, parts.scheduler, latents, embeds, negative, steps, guidance,
                                       generator=generator)
            scores.append(reward(sampling.decode(parts.vae, latents), CAPTIONS))
    return torch.cat(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    parser.add_argument("--out", default="outputs/bench-ddpo-jpeg")
    parser.add_argument("--seeds", default="200,201,202,203", help="evaluation noise seeds")
    args = parser.parse_args()
    base = update(tiny(), {"method": "ddpo", "output_dir": args.out, "tracking": False, "overwrite": True,
                           "reward": "jpeg_compressibility", "eta": 1.0})
    config = update(base, parse_overrides(base, args.set)).validate()
    seeds = [int(s) for s in args.seeds.split(",")]
    before = fixed_noise_rewards(None, config.num_inference_steps, config.guidance_scale, seeds)
    started = time.perf_counter()
    adapter = train_ddpo(config)
    seconds = time.perf_counter() - started
    after = fixed_noise_rewards(adapter, config.num_inference_steps, config.guidance_scale, seeds)
    gain = after - before
    rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    print(f"DDPO on jpeg_compressibility: {rows[-1]['images_seen']} images sampled in {seconds:.0f} s")
    print(f"training batch reward, first -> last step: {rows[0]['reward_mean']:.4f} -> {rows[-1]['reward_mean']:.4f}")
    print(f"fresh samples ({len(gain)} images, fixed noise): {before.mean():.4f} -> {after.mean():.4f}, "
          f"gain {gain.mean():.4f} +- {gain.std() / len(gain) ** 0.5:.4f} (standard error)")


if __name__ == "__main__":
    main()
