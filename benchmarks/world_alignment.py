"""Align the shipped world model to `world_count` with AlignProp and with DDPO at the same image budget, and report
ground-truth count accuracy (exact counter) on held-out and training captions, before and after.

    .venv/bin/python benchmarks/world_alignment.py --images 640 --eval-images 128 --out outputs/bench-world

AlignProp runs the tiny preset with batch 4 and lr 3e-3 (over 20-30 steps these gained more count reward than the
preset's batch 2, lr 1e-3; see tests/test_learning.py). DDPO runs at the paper's settings (eta 1, lr 3e-4, PPO clip
1e-4) with 16 samples per step in minibatches of 4, on the same prompts, reward, seed and DDIM steps.

Prints a table and writes results.json in --out. A benchmark: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from alignprop.config import parse_overrides, tiny, update
from alignprop.ddpo import train_ddpo
from alignprop.models import resolve_model_dir
from alignprop.train import train
from alignprop.world.train_model import evaluate_model


def evaluate(adapter, n):
    model = resolve_model_dir("world")
    return {split: evaluate_model(model, n, heldout=(split == "heldout"), adapter=adapter, per_image=True)
            for split in ("heldout", "train")}


def paired_gain(base: dict, tuned: dict) -> tuple[float, float]:
    """Count-accuracy gain over the base model on the same initial noise, and its standard error (paired)."""
    def right(r: dict) -> np.ndarray:
        return (np.array(r["counts"]) == np.array(r["targets"])).astype(float)

    diff = right(tuned) - right(base)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160, help="images sampled by each method during training")
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--out", default="outputs/bench-world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alignprop-set", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig override for the AlignProp run, e.g. truncation=full (repeatable)")
    parser.add_argument("--ddpo-set", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig override for the DDPO run (repeatable)")
    parser.add_argument("--methods", default="alignprop,ddpo", help="which methods to run, comma-separated")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    out = Path(args.out)
    base = tiny()
    results = {"budget_images": args.images, "eval_images": args.eval_images, "base": evaluate(None, args.eval_images)}

    runs = {
        "alignprop": update(base, {"output_dir": str(out / "alignprop"), "seed": args.seed, "tracking": False,
                                   "overwrite": True, "train_batch_size": 4, "learning_rate": 3e-3}),
        # DDPO at the paper's settings (eta 1, clip 1e-4, lr 3e-4) and the same number of sampled images
        "ddpo": update(base, {"method": "ddpo", "output_dir": str(out / "ddpo"), "seed": args.seed, "tracking": False,
                              "overwrite": True, "eta": 1.0, "learning_rate": 3e-4, "train_batch_size": 4,
                              "ddpo_samples_per_step": 16}),
    }
    extra = {"alignprop": parse_overrides(base, args.alignprop_set), "ddpo": parse_overrides(base, args.ddpo_set)}
    runs = {name: update(config, extra[name]) for name, config in runs.items() if name in args.methods.split(",")}
    for name, config in runs.items():  # the same budget of sampled images for both
        runs[name] = update(config, {"num_steps": max(1, args.images // config.images_per_step())})
    for name, config in runs.items():
        started = time.perf_counter()
        adapter = (train_ddpo if name == "ddpo" else train)(config.validate())
        seconds = time.perf_counter() - started
        rows = [json.loads(l) for l in (adapter / "metrics.jsonl").read_text().splitlines()]
        results[name] = {"train_seconds": seconds, "images_seen": rows[-1]["images_seen"],
                         "final_train_reward": rows[-1]["reward_mean"], "first_train_reward": rows[0]["reward_mean"],
                         **evaluate(adapter, args.eval_images)}

    print(f"\nworld_count alignment, {args.images} training images per method, {args.eval_images} eval images per split")
    print(f"{'model':>10} {'images':>7} {'train s':>8} {'held-out count acc':>19} {'gain +- SE (paired)':>20} "
          f"{'held-out MAE':>13} {'train-caption count acc':>24} {'gain +- SE (paired)':>20} "
          f"{'colour acc (held-out)':>22}")
    for name in ("base", *runs):
        r = results[name]
        for split in ("heldout", "train"):
            r[split]["gain_over_base"], r[split]["gain_se"] = paired_gain(results["base"][split], r[split])
        gains = {split: f"{r[split]['gain_over_base']:+.3f} +- {r[split]['gain_se']:.3f}"
                 for split in ("heldout", "train")}
        print(f"{name:>10} {r.get('images_seen', 0):>7} {r.get('train_seconds', 0):>8.0f} "
              f"{r['heldout']['count_accuracy']:>19.3f} {gains['heldout']:>20} {r['heldout']['count_mae']:>13.3f} "
              f"{r['train']['count_accuracy']:>24.3f} {gains['train']:>20} {r['heldout']['color_accuracy']:>22.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
