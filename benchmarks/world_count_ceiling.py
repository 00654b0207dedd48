"""How much can the world model's counting still rise? Continue its own training on exactly captioned renders.

    .venv/bin/python benchmarks/world_count_ceiling.py --steps 400,1200 --eval-images 256

A calibration for the count-alignment figures: it fine-tunes a copy of the shipped world model (UNet and text encoder)
with the diffusion loss it was trained with, on fresh renders whose captions are exact (the training colour-shape pairs;
8,000 renders, batch 32, lr 3e-4, seed 7), once per entry of --steps. Each copy is scored like the alignment benchmark:
exact count accuracy on held-out and training captions, paired with the base model on the same initial noise.

--undercount P captions a scene of n >= 2 objects as n - 1 with probability P, so the copy learns to overcount: a model
with a systematic count bias, to see whether alignment corrects one. --save keeps the copies in --out/steps-N, e.g. to
align one with `benchmarks/world_alignment.py --model DIR`. A benchmark: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from alignprop.models import resolve_model_dir
from alignprop.world import prompts as world_prompts
from alignprop.world.render import render_dataset
from alignprop.world.train_model import WorldModelConfig, evaluate_model, latent_distribution, train_denoiser
from world_alignment import mean_se, paired_diffs  # this directory is on sys.path when the script runs

SEED = 7
RENDERS = 8000


def renders(undercount: float) -> tuple[torch.Tensor, list[str], int]:
    """Images in [-1, 1], their captions (undercounted with probability `undercount` where n >= 2), and how many
    captions were changed."""
    images, captions, counts = render_dataset(RENDERS, seed=SEED)
    rng = np.random.default_rng(SEED)
    changed = 0
    for i, n in enumerate(counts):
        if n >= 2 and rng.random() < undercount:
            _, color, shape = world_prompts.parse_caption(captions[i])
            captions[i] = world_prompts.caption(int(n) - 1, color, shape)
            changed += 1
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1, captions, changed


def load_world():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(resolve_model_dir("world"))


def fine_tune(latents: tuple[torch.Tensor, torch.Tensor], captions: list[str], steps: int, out: Path) -> float:
    """Continue the shipped model's denoiser training for `steps` steps; save the copy to `out`; return seconds."""
    torch.manual_seed(SEED)
    pipe = load_world()  # a fresh copy for each run
    config = dataclasses.replace(WorldModelConfig(), unet_steps=steps, unet_lr=3e-4, seed=SEED)
    started = time.perf_counter()
    train_denoiser(pipe.unet, pipe.text_encoder, pipe.tokenizer, latents, captions, config,
                   np.random.default_rng(SEED))
    seconds = time.perf_counter() - started
    pipe.save_pretrained(out)
    return seconds


def paired(base: dict, tuned: dict) -> dict:
    targets, before, after = (np.array(x) for x in (base["targets"], base["counts"], tuned["counts"]))
    gain, se = mean_se(paired_diffs(base, tuned)[0])
    per_count = {int(k): round(float(np.mean(after[targets == k] == k)), 3) for k in sorted(set(targets.tolist()))}
    return {"count_accuracy": tuned["count_accuracy"], "gain": gain, "se": se, "count_mae": tuned["count_mae"],
            "color_accuracy": tuned["color_accuracy"], "fixed": int(((after == targets) & (before != targets)).sum()),
            "broken": int(((after != targets) & (before == targets)).sum()), "count_accuracy_by_count": per_count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="400,1200", help="fine-tuning steps, one copy each, comma-separated")
    parser.add_argument("--eval-images", type=int, default=256, help="generated images per split (held-out, train)")
    parser.add_argument("--undercount", type=float, default=0.0,
                        help="probability that a scene of n >= 2 objects is captioned n - 1 (0 = exact captions)")
    parser.add_argument("--out", default="outputs/bench-world-ceiling", help="results.json and, with --save, models")
    parser.add_argument("--save", action="store_true", help="keep each fine-tuned copy in --out/steps-N")
    args = parser.parse_args()
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps takes integers separated by commas, e.g. 400,1200; got {args.steps!r}")
    if min(steps) < 1:
        parser.error(f"--steps must be positive; got {args.steps!r}")
    if not 0.0 <= args.undercount <= 1.0:
        parser.error(f"--undercount is a probability in [0, 1]; got {args.undercount}")
    if args.eval_images < 2:
        parser.error(f"--eval-images must be at least 2 for a standard error; got {args.eval_images}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    images, captions, changed = renders(args.undercount)
    print(f"{RENDERS} renders, {changed} captions undercounted")
    latents = latent_distribution(load_world().vae, images)  # once: the VAE is frozen, every copy shares it
    splits = {"heldout": True, "train": False}
    base = {s: evaluate_model(resolve_model_dir("world"), args.eval_images, heldout=h, per_image=True)
            for s, h in splits.items()}
    results = {"undercount": args.undercount, "renders": RENDERS, "seed": SEED, "eval_images": args.eval_images,
               "base": {s: {k: base[s][k] for k in ("count_accuracy", "count_mae", "color_accuracy")} for s in splits},
               "runs": []}
    print(f"{'steps':>6} {'images':>7} {'time (s)':>9} {'split':>8} {'count acc':>10} {'gain +- SE':>16} "
          f"{'fixed':>6} {'broken':>7} {'colour acc':>11}")
    for s in splits:
        print(f"{0:>6} {0:>7} {0:>9} {s:>8} {base[s]['count_accuracy']:>10.3f} {'':>16} {'':>6} {'':>7} "
              f"{base[s]['color_accuracy']:>11.3f}")
    scratch = tempfile.TemporaryDirectory(prefix="world-ceiling-")  # unsaved copies: never over a saved one
    for n in steps:
        model = (out if args.save else Path(scratch.name)) / f"steps-{n}"
        seconds = fine_tune(latents, captions, n, model)
        run = {"steps": n, "images": n * WorldModelConfig().batch_size, "train_seconds": round(seconds)}
        for s, h in splits.items():
            run[s] = paired(base[s], evaluate_model(model, args.eval_images, heldout=h, per_image=True))
            r = run[s]
            print(f"{n:>6} {run['images']:>7} {seconds:>9.0f} {s:>8} {r['count_accuracy']:>10.3f} "
                  f"{r['gain']:>+8.3f} +- {r['se']:.3f} {r['fixed']:>6} {r['broken']:>7} {r['color_accuracy']:>11.3f}",
                  flush=True)
        results["runs"].append(run)
    scratch.cleanup()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
