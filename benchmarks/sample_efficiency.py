"""AlignProp vs DDPO sample efficiency on the world model, measured on fresh samples: how many training images (and
seconds) each method needs to raise a reward by the amount DDPO gains over its whole budget.

    .venv/bin/python benchmarks/sample_efficiency.py --reward brightness --ddpo-images 64,128,256

`alignprop compare` reads this off the training curves, but a batch's reward is noisy (std 0.15 on `brightness`)
and DDPO's gain at CPU budgets is far smaller than that, so the curves only give bounds. Here every point of both
curves is an adapter scored on the same fixed initial and step noise as the base model (paired), so gains of a few
thousandths are resolved.

Both methods share the preset, prompts, reward, seed and sampler (`--steps` DDIM steps, eta 1, guidance 5). DDPO
runs at the paper's settings (lr 3e-4, PPO clip 1e-4, 16 samples per step in minibatches of 4; --ddpo-set changes
them); AlignProp at the tiny preset's (lr 1e-3, K=1) with one image per step, so its curve has one-image
resolution. A run of N steps is the first N steps of a longer one (the noise and prompts of a step depend only on
the seed and the step), so each point is a separate, shorter run.

The level L is DDPO's gain at its largest budget (the lower of the two final gains, as in `alignprop compare`;
AlignProp's points stop at the first one at or above it). Each method's images-to-L is interpolated linearly between the
two curve points around the first crossing, starting from (0 images, gain 0); the ratio DDPO / AlignProp of
images (and of training-step seconds, model loading excluded) is the figure the AlignProp paper puts at about
25x. A benchmark: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from alignprop import models
from alignprop.compare import analyse_fixed_noise
from alignprop.config import parse_overrides, tiny, update
from alignprop.ddpo import PAPER_DEFAULTS, train_ddpo
from alignprop.evaluate import EvalConfig, fixed_noise_rewards
from alignprop.prompts import load_prompts
from alignprop.rewards import load_reward
from alignprop.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--ddpo-images", default="64,128,256", help="DDPO budgets, comma-separated; the last sets L")
    parser.add_argument("--alignprop-images", default="1,2,4,8,16,32",
                        help="AlignProp budgets tried in order until one reaches L")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps, for training and evaluation")
    parser.add_argument("--eval-seeds", type=int, default=16, help="noise seeds per evaluation caption")
    parser.add_argument("--ddpo-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--alignprop-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="outputs/bench-efficiency")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    shared = update(tiny(), {"reward": args.reward, "eta": 1.0, "num_inference_steps": args.steps,
                             "tracking": False, "overwrite": True})
    ddpo = update(shared, {"method": "ddpo", **PAPER_DEFAULTS, "ddpo_samples_per_step": 16, "train_batch_size": 4})
    ddpo = update(ddpo, parse_overrides(ddpo, args.ddpo_set))
    alignprop = update(shared, {"train_batch_size": 1})
    alignprop = update(alignprop, parse_overrides(alignprop, args.alignprop_set))
    captions = load_prompts(shared.prompts)[::3]  # 12 training captions, every count and colour
    seeds = list(range(300, 300 + args.eval_seeds))  # never drawn by training (seed 0's streams)

    parts, reward = models.load_parts("world"), load_reward(args.reward)
    sampler = EvalConfig(num_inference_steps=shared.num_inference_steps, guidance_scale=shared.guidance_scale,
                         eta=shared.eta)

    def score(adapter) -> torch.Tensor:
        return fixed_noise_rewards(parts, adapter, reward, captions, seeds, sampler)

    base = score(None)

    def point(config, images: int) -> dict:
        config = update(config, {"num_steps": images // config.images_per_step(),
                                 "output_dir": str(out / f"{config.method}-{images}")}).validate()
        adapter = (train_ddpo if config.method == "ddpo" else train)(config)
        rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
        seconds = sum(row["step_time_s"] for row in rows)  # the training steps only: no model loading or saving
        gain = score(adapter) - base
        result = {"images": images, "seconds": seconds, "gain": float(gain.mean()),
                  "se": float(gain.std() / len(gain) ** 0.5)}
        print(f"{config.method:>9} {images:>6} images {seconds:>7.1f} s   "
              f"gain {result['gain']:+.4f} +- {result['se']:.4f}", flush=True)
        return result

    curves = {"ddpo": [point(ddpo, int(n)) for n in args.ddpo_images.split(",")]}
    curves["alignprop"] = []
    for n in args.alignprop_images.split(","):  # stop at the first point at or above DDPO's final gain
        curves["alignprop"].append(point(alignprop, int(n)))
        if curves["alignprop"][-1]["gain"] >= curves["ddpo"][-1]["gain"]:
            break
    summary = {"reward": args.reward, "base_mean": float(base.mean()), "eval_images": len(base),
               **analyse_fixed_noise(curves)}  # the level: the lower final gain (DDPO's, once AlignProp reaches it)
    print(f"\n{args.reward}: base {base.mean():.4f} on {len(base)} fixed-noise images; L = {summary['level_from']}'s "
          f"final gain = {summary['level']:+.4f} +- {summary['level_se']:.4f}")
    if summary["no_common_level"]:
        print("that gain is within two standard errors of zero: no level to compare at; raise the budgets")
    else:
        print(f"to reach L: DDPO {summary['ddpo']['images']:.1f} images, {summary['ddpo']['seconds']:.1f} s; "
              f"AlignProp {summary['alignprop']['images']:.2f} images, {summary['alignprop']['seconds']:.2f} s")
        print(f"DDPO / AlignProp: {summary['ddpo_over_alignprop_images']:.0f}x the images, "
              f"{summary['ddpo_over_alignprop_seconds']:.0f}x the training time (the paper: about 25x the time)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
