"""Exact ground truth for world images: object count, shape colour, and the accuracies derived from them.

Generated images drift in background colour, so the counter does not threshold brightness: it takes the image's
own dominant background colour (the median of its border pixels), marks pixels far from it as foreground, and
counts connected components (scipy.ndimage.label) above a minimum area.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from scipy import ndimage

from alignprop.world.prompts import COLORS, parse_caption
from alignprop.world.render import PALETTE

FOREGROUND_DISTANCE = 0.25  # RGB distance from the background colour above which a pixel is foreground
MIN_AREA = 6  # components smaller than this many pixels are noise, not objects


def background_color(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0)


def foreground_mask(image: np.ndarray) -> np.ndarray:
    distance = np.linalg.norm(image - background_color(image), axis=-1)
    return distance > FOREGROUND_DISTANCE


def count_objects(image: np.ndarray) -> int:
    """Number of objects in one [H, W, 3] image in [0, 1]."""
    labels, n = ndimage.label(foreground_mask(image))
    if n == 0:
        return 0
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    return int((areas >= MIN_AREA).sum())


def classify_color(image: np.ndarray) -> str | None:
    """The palette colour nearest to the median foreground colour; None when there is no foreground."""
    mask = foreground_mask(image)
    if mask.sum() < MIN_AREA:
        return None
    mean = np.median(image[mask], axis=0)
    return min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(PALETTE[c])))


def _to_numpy(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()  # [B, 3, H, W] -> [B, H, W, 3]
    return np.asarray(images, dtype=np.float32)


def count_batch(images) -> np.ndarray:
    """Object counts [B] of a batch: Tensor [B, 3, H, W] or array [B, H, W, 3], values in [0, 1]."""
    return np.array([count_objects(image) for image in _to_numpy(images)], dtype=np.int64)


def world_metrics(images, prompts: list[str]) -> dict:
    """Count accuracy, colour accuracy and mean absolute count error, overall and per prompt.

    `images`: Tensor [B, 3, H, W] or array [B, H, W, 3], values in [0, 1]; `prompts`: world captions.
    """
    images = _to_numpy(images)
    per_prompt = defaultdict(lambda: {"n": 0, "count_correct": 0, "color_correct": 0, "abs_error": 0.0})
    counts = count_batch(images).tolist()
    for image, prompt, n in zip(images, prompts, counts):
        target, color, _ = parse_caption(prompt)
        row = per_prompt[prompt]
        row["n"] += 1
        row["count_correct"] += int(n == target)
        row["color_correct"] += int(classify_color(image) == color)
        row["abs_error"] += abs(n - target)
    total = len(prompts)
    summary = {
        "count_accuracy": sum(r["count_correct"] for r in per_prompt.values()) / total,
        "color_accuracy": sum(r["color_correct"] for r in per_prompt.values()) / total,
        "count_mae": sum(r["abs_error"] for r in per_prompt.values()) / total,
        "n_images": total,
        "counts": counts,
        "per_prompt": {p: {"count_accuracy": r["count_correct"] / r["n"], "color_accuracy": r["color_correct"] / r["n"],
                           "count_mae": r["abs_error"] / r["n"], "n": r["n"]} for p, r in per_prompt.items()},
    }
    return summary
