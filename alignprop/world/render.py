"""Procedural renders: 1-4 circles, squares or triangles of one colour on a plain or noisy background.

Deterministic by seed; shapes never touch each other or the border, so connected components count them exactly.
"""

from __future__ import annotations

import numpy as np

from alignprop.world.prompts import COLORS, SHAPES, caption, combinations

IMAGE_SIZE = 32
PALETTE = {  # RGB in [0, 1]
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.75, 0.20),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
}
BACKGROUNDS = ((0.95, 0.95, 0.95), (0.80, 0.80, 0.80), (0.55, 0.55, 0.55), (0.20, 0.20, 0.20), (0.92, 0.88, 0.78))
SHAPE_SIZE = (6, 9)  # side of a shape's bounding box in pixels, inclusive range
GAP = 2  # minimum free pixels between two shapes and between a shape and the border


def shape_mask(shape: str, size: int) -> np.ndarray:
    """A boolean size x size mask of the shape."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        r = size / 2
        return (yy - r) ** 2 + (xx - r) ** 2 <= r * r
    if shape == "triangle":  # apex up, base at the bottom
        return np.abs(xx - size / 2) <= yy / 2
    raise ValueError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, sizes: list[int]) -> list[tuple[int, int]] | None:
    boxes: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(200):
            y, x = rng.integers(GAP, IMAGE_SIZE - GAP - size + 1, size=2)
            if all(y + size + GAP <= by or by + bs + GAP <= y or x + size + GAP <= bx or bx + bs + GAP <= x
                   for by, bx, bs in boxes):
                boxes.append((int(y), int(x), size))
                break
        else:
            return None
    return [(y, x) for y, x, _ in boxes]


def render(count: int, color: str, shape: str, rng: np.random.Generator, noisy: bool | None = None) -> np.ndarray:
    """One image, float32 [H, W, 3] in [0, 1]."""
    background = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float32)
    background = np.clip(background + rng.normal(0, 0.03, 3), 0, 1)  # a little colour drift
    image = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    while True:
        sizes = list(rng.integers(SHAPE_SIZE[0], SHAPE_SIZE[1] + 1, size=count))
        positions = _place(rng, sizes)
        if positions is not None:
            break
    fill = np.array(PALETTE[color], dtype=np.float32)
    for (y, x), size in zip(positions, sizes):
        mask = shape_mask(shape, int(size))
        jitter = np.clip(fill + rng.normal(0, 0.03, 3), 0, 1)
        image[y:y + size, x:x + size][mask] = jitter
    if noisy if noisy is not None else rng.random() < 0.5:
        image = image + rng.normal(0, 0.04, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def render_dataset(n: int, seed: int, heldout: bool = False) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`n` images [n, H, W, 3], their captions and counts; the (colour, shape) pairs of the chosen split only."""
    rng = np.random.default_rng(seed)
    combos = combinations(heldout)
    images, captions, counts = [], [], []
    for i in range(n):
        count, color, shape = combos[rng.integers(len(combos))]
        images.append(render(count, color, shape, rng))
        captions.append(caption(count, color, shape))
        counts.append(count)
    return np.stack(images), captions, np.array(counts)


__all__ = ["render", "render_dataset", "shape_mask", "PALETTE", "COLORS", "SHAPES", "IMAGE_SIZE"]
