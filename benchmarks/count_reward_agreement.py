"""Does the learned count reward agree with the exact counter on a model's samples, before and after alignment?

    .venv/bin/python benchmarks/count_reward_agreement.py --adapter outputs/bench-world/alignprop --images 128

Samples the world model (held-out captions, the evaluation stage's fixed noise) with and without the adapter and
prints, for each: the exact counter's count accuracy, the `world_count` regressor's accuracy (its prediction rounded),
and how often the two counts agree. A regressor accuracy that rises while the exact one does not means the adapter
pleases the reward model without changing the count (reward hacking). A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from alignprop import models
from alignprop.evaluate import AdapterLoaded, EvalConfig, generate
from alignprop.world import prompts as world_prompts
from alignprop.world.metrics import count_batch
from alignprop.world.rewards import load_count_regressor


def counts(adapter: str | None, captions: list[str], seeds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompted, exact, regressor-rounded) counts over captions x seeds."""
    parts = models.load_parts("world")
    regressor = load_count_regressor()
    prompted, exact, predicted = [], [], []
    with AdapterLoaded(parts, "adapter", adapter), torch.no_grad():
        for prompts, images in generate(parts, captions, seeds, EvalConfig(), "cpu"):
            prompted += [world_prompts.parse_caption(p)[0] for p in prompts]
            exact += count_batch(images).tolist()
            predicted += regressor(images).round().long().tolist()
    return np.array(prompted), np.array(exact), np.array(predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="an `alignprop train` output directory")
    parser.add_argument("--images", type=int, default=128, help="images per model (held-out captions x seeds)")
    args = parser.parse_args()
    captions = world_prompts.heldout_captions()
    seeds = list(range(-(-args.images // len(captions))))
    print(f"{'model':>8} {'images':>7} {'exact count acc':>16} {'regressor count acc':>20} {'exact == regressor':>19}")
    for name, adapter in (("base", None), ("adapter", args.adapter)):
        prompted, exact, predicted = counts(adapter, captions, seeds)
        print(f"{name:>8} {len(prompted):>7} {np.mean(exact == prompted):>16.3f} {np.mean(predicted == prompted):>20.3f} "
              f"{np.mean(exact == predicted):>19.3f}")


if __name__ == "__main__":
    main()
