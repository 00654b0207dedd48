"""Align the shipped world model to `world_count` with AlignProp and with DDPO at the same image budget, and report
ground-truth count accuracy (exact counter) on held-out and training captions, before and after.

    .venv/bin/python benchmarks/world_alignment.py --images 960 --eval-images 512 --seeds 0,1,2,3,4

Each method trains once per seed on the same image budget, on the shipped world model or another one (--model). Gains
are paired: the tuned model and the base draw every evaluation image from the same initial noise. The last lines pool
both splits and all seeds.

AlignProp runs the tiny preset with ALIGNPROP_RECIPE below: batch 4, the full chain, the LoRA gated to the
high-noise steps, lr 3e-4, Adam beta1 0.99 (at lr 1e-3 two of five seeds collapsed). DDPO runs at the paper's settings (eta 1, lr 3e-4, PPO clip
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
from alignprop.runtime import read_metrics
from alignprop.train import train
from alignprop.world.train_model import evaluate_model


# AlignProp's recipe for counting on the world model: the full 20-step chain, the LoRA gated to the first 8 steps
# (timesteps >= 600, where the count is settled: benchmarks/count_timeline.py), and Adam's first moment averaged over
# about 100 steps (beta1 0.99), since one step's per-image gradients are nearly orthogonal. The earlier recipe, K=1 at
# lr 3e-3 without the gate, is `--alignprop-set truncation=fixed --alignprop-set learning_rate=3e-3
# --alignprop-set adam_beta1=0.9 --alignprop-set adapter_min_timestep=0`.
ALIGNPROP_RECIPE = {"train_batch_size": 4, "truncation": "full", "learning_rate": 3e-4, "adam_beta1": 0.99,
                    "adapter_min_timestep": 600}


def evaluate(model_ref, adapter, n):
    model = resolve_model_dir(model_ref)
    return {split: evaluate_model(model, n, heldout=(split == "heldout"), adapter=adapter, per_image=True)
            for split in ("heldout", "train")}


def paired_diffs(base: dict, tuned: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per image, on the same initial noise: the change in being counted right (-1, 0, 1) and in |count error|."""
    targets = np.array(base["targets"])
    base_counts, tuned_counts = np.array(base["counts"]), np.array(tuned["counts"])
    right = (tuned_counts == targets).astype(float) - (base_counts == targets)
    error = (np.abs(tuned_counts - targets) - np.abs(base_counts - targets)).astype(float)
    return right, error


def mean_se(diff: np.ndarray) -> tuple[float, float]:
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=960, help="images sampled by each method during training")
    parser.add_argument("--eval-images", type=int, default=64, help="generated images per split (held-out, train)")
    parser.add_argument("--out", default="outputs/bench-world")
    parser.add_argument("--seeds", default="0",
                        help="training seeds, comma-separated: each method trains once per seed, on the same budget")
    parser.add_argument("--alignprop-set", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig override for the AlignProp run, e.g. truncation=full (repeatable)")
    parser.add_argument("--ddpo-set", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig override for the DDPO run (repeatable)")
    parser.add_argument("--methods", default="alignprop,ddpo", help="which methods to run, comma-separated")
    parser.add_argument("--model", default="world",
                        help="the world model to align and score: 'world' (the shipped one) or a diffusers directory, "
                             "e.g. one from `alignprop world train-model` or benchmarks/world_count_ceiling.py --save")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes integers separated by commas, e.g. 0,1,2; got {args.seeds!r}")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds repeats a seed ({args.seeds}); a repeated seed would only repeat the same run")
    unknown = set(args.methods.split(",")) - {"alignprop", "ddpo"}
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)} in --methods; use alignprop and/or ddpo")
    if args.model != "world" and not (Path(args.model) / "model_index.json").is_file():
        parser.error(f"--model {args.model!r} is not a diffusers model directory (no model_index.json); pass 'world' "
                     "for the shipped world model or the directory `alignprop world train-model` wrote")
    logging.basicConfig(level=logging.INFO)
    out = Path(args.out)
    base = update(tiny(), {"pretrained_model": args.model})
    methods = {
        "alignprop": update(base, {"tracking": False, "overwrite": True, **ALIGNPROP_RECIPE,
                                   **parse_overrides(base, args.alignprop_set)}),
        # DDPO at the paper's settings (eta 1, clip 1e-4, lr 3e-4) and the same number of sampled images
        "ddpo": update(base, {"method": "ddpo", "tracking": False, "overwrite": True, "eta": 1.0,
                              "learning_rate": 3e-4, "train_batch_size": 4, "ddpo_samples_per_step": 16,
                              **parse_overrides(base, args.ddpo_set)}),
    }
    runs = {}  # run label -> (method, config); the label is the method alone when there is one seed
    for name, config in methods.items():
        if name not in args.methods.split(","):
            continue
        config = update(config, {"num_steps": max(1, args.images // config.images_per_step())}).validate()
        for seed in seeds:  # the same budget of sampled images for every run
            label = name if len(seeds) == 1 else f"{name}/seed{seed}"
            runs[label] = (name, update(config, {"seed": seed, "output_dir": str(out / label)}))
    results = {"budget_images": args.images, "eval_images": args.eval_images, "seeds": seeds,
               "model": args.model, "base": evaluate(args.model, None, args.eval_images)}
    for label, (name, config) in runs.items():
        started = time.perf_counter()
        adapter = (train_ddpo if name == "ddpo" else train)(config)  # validated above, before any sampling
        seconds = time.perf_counter() - started
        metrics = read_metrics(adapter / "metrics.jsonl")
        rows = [m for m in metrics if "reward_mean" in m]  # not the step-0 validation line
        validations = [m for m in metrics if "val_reward" in m]
        kept = json.loads((adapter / "kept.json").read_text()) if config.keep_best else {}
        results[label] = {"method": name, "seed": config.seed, "train_seconds": seconds,
                          "images_seen": rows[-1]["images_seen"], "final_train_reward": rows[-1]["reward_mean"],
                          "first_train_reward": rows[0]["reward_mean"],
                          "validation_images_scored": len(validations) * config.validation_images,
                          "kept_step": kept.get("step"), "val_rewards": kept.get("val_rewards"),
                          **evaluate(args.model, adapter, args.eval_images)}
        if kept:
            print(f"{label}: keep_best kept step {kept['step']} of {kept['last_step']}; validation rewards "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in kept["val_rewards"].items()), flush=True)

    print(f"\nworld_count alignment, {args.images} training images per run, {args.eval_images} eval images per split")
    print(f"{'model':>16} {'images':>7} {'train s':>8} {'held-out count acc':>19} {'gain +- SE (paired)':>20} "
          f"{'held-out MAE':>13} {'train-caption count acc':>24} {'gain +- SE (paired)':>20} "
          f"{'colour acc (held-out)':>22}")
    pooled = {name: {"right": [], "error": []} for name in methods}
    for label in ("base", *runs):
        r = results[label]
        right, error = {}, {}
        for split in ("heldout", "train"):
            right[split], error[split] = paired_diffs(results["base"][split], r[split])
            r[split]["gain_over_base"], r[split]["gain_se"] = mean_se(right[split])
        if label in runs:
            pooled[runs[label][0]]["right"].append(np.concatenate(list(right.values())))
            pooled[runs[label][0]]["error"].append(np.concatenate(list(error.values())))
        gains = {split: f"{r[split]['gain_over_base']:+.3f} +- {r[split]['gain_se']:.3f}"
                 for split in ("heldout", "train")}
        print(f"{label:>16} {r.get('images_seen', 0):>7} {r.get('train_seconds', 0):>8.0f} "
              f"{r['heldout']['count_accuracy']:>19.3f} {gains['heldout']:>20} {r['heldout']['count_mae']:>13.3f} "
              f"{r['train']['count_accuracy']:>24.3f} {gains['train']:>20} {r['heldout']['color_accuracy']:>22.3f}")

    # Both splits and every seed together. Each image's change is averaged over the seeds first (the seeds share
    # the base and the initial noise, so their changes on one image are not independent), then the standard error
    # is taken over the 2 x eval-images images.
    print(f"\nboth splits, {len(seeds)} training seed(s) ({2 * args.eval_images} paired images), change over the "
          "base +- SE:")
    results["both_splits"] = {}
    for name, diffs in pooled.items():
        if not diffs["right"]:
            continue
        (acc, acc_se), (mae, mae_se) = (mean_se(np.mean(diffs[k], axis=0)) for k in ("right", "error"))
        results["both_splits"][name] = {"count_accuracy_gain": [acc, acc_se], "count_mae_change": [mae, mae_se]}
        print(f"{name:>10}: count accuracy {acc:+.3f} +- {acc_se:.3f} ({acc / max(acc_se, 1e-12):+.1f} SE), "
              f"count MAE {mae:+.3f} +- {mae_se:.3f} ({mae / max(mae_se, 1e-12):+.1f} SE)")
        if len(diffs["right"]) > 1:
            # The SE above covers the images; this one covers the training seeds (one pooled gain per seed).
            per_seed = np.array([d.mean() for d in diffs["right"]])
            seed_mean, seed_se = mean_se(per_seed)
            results["both_splits"][name]["per_seed_count_accuracy_gain"] = per_seed.tolist()
            results["both_splits"][name]["count_accuracy_gain_over_seeds"] = [seed_mean, seed_se]
            print(f"{'':>10}  per seed {', '.join(f'{g:+.3f}' for g in per_seed)}: mean {seed_mean:+.3f} +- "
                  f"{seed_se:.3f} (SE over {len(per_seed)} seeds), lowest {per_seed.min():+.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
