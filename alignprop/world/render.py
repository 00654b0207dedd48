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
MIN_CONTRAST = 0.45  # minimum RGB distance between a random background and the shapes' colour


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


def _place(rng: np.random.Generator, sizes: list[int], gap: int = GAP) -> list[tuple[int, int]] | None:
    """Top-left corners for boxes of `sizes`, at least `gap` pixels apart (a negative gap lets them overlap)
    and GAP from the border; None when 200 tries do not fit one."""
    boxes: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(200):
            y, x = rng.integers(GAP, IMAGE_SIZE - GAP - size + 1, size=2)
            if all(y + size + gap <= by or by + bs + gap <= y or x + size + gap <= bx or bx + bs + gap <= x
                   for by, bx, bs in boxes):
                boxes.append((int(y), int(x), size))
                break
        else:
            return None
    return [(y, x) for y, x, _ in boxes]


def random_background(rng: np.random.Generator, color: str) -> np.ndarray:
    """A uniformly random RGB colour at least MIN_CONTRAST away from the shapes' colour."""
    while True:
        background = rng.random(3)
        if np.linalg.norm(background - np.array(PALETTE[color])) >= MIN_CONTRAST:
            return background


def render(count: int, color: str, shape: str, rng: np.random.Generator, noisy: bool | None = None,
           any_background: bool = False) -> np.ndarray:
    """One image, float32 [H, W, 3] in [0, 1].

    The background is one of BACKGROUNDS with a little colour drift, or with `any_background` a random colour
    (still MIN_CONTRAST from the shapes); `noisy` adds pixel noise (None: a coin flip)."""
    if any_background:
        background = random_background(rng, color)
    else:
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


def render_varied(rng: np.random.Generator, combos: list[tuple[int, str, str]]) -> np.ndarray:
    """A harder image for training the count reward: any background, shapes that may touch, overlap, fade into
    the background, mix shape types or come with small specks. Its count is whatever the exact counter says
    (alignprop.world.metrics.count_objects), so a reward fit to these agrees with the ground truth on exactly
    the cases a generator gets wrong."""
    count, color, shape = combos[rng.integers(len(combos))]
    count = int(rng.choice([0, count, 5], p=[0.04, 0.92, 0.04]))
    background = random_background(rng, color) if rng.random() < 0.6 else \
        np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))]) + rng.normal(0, 0.03, 3)
    image = np.broadcast_to(np.clip(background, 0, 1), (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    gap = int(rng.integers(-4, 2)) if rng.random() < 0.3 else GAP
    positions = None
    while positions is None:
        sizes = list(rng.integers(SHAPE_SIZE[0] - 1, SHAPE_SIZE[1] + 2, size=count))
        positions = _place(rng, sizes, gap)
    faint = rng.random() < 0.2  # some shapes blend into the background, below the counter's threshold or not
    for (y, x), size in zip(positions, sizes):
        kind = SHAPES[rng.integers(len(SHAPES))] if rng.random() < 0.3 else shape
        fill = np.clip(np.array(PALETTE[color]) + rng.normal(0, 0.06, 3), 0, 1)
        alpha = rng.uniform(0.1, 1.0) if faint else 1.0
        region = image[y:y + size, x:x + size]
        mask = shape_mask(kind, int(size))
        region[mask] = alpha * fill + (1 - alpha) * region[mask]
    for _ in range(rng.integers(0, 4) if rng.random() < 0.3 else 0):  # specks smaller than the counter's minimum
        h, w = rng.integers(1, 3, size=2)
        y, x = rng.integers(0, IMAGE_SIZE - 2, size=2)
        image[y:y + h, x:x + w] = rng.random(3)
    if rng.random() < 0.5:
        image = image + rng.normal(0, rng.uniform(0.01, 0.06), image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def render_dataset(n: int, seed: int, heldout: bool = False, any_background: float = 0.0
                   ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`n` images [n, H, W, 3], their captions and counts; the (colour, shape) pairs of the chosen split only.

    `any_background`: the fraction of images drawn on a random background colour (see `render`)."""
    rng = np.random.default_rng(seed)
    combos = combinations(heldout)
    images, captions, counts = [], [], []
    for i in range(n):
        count, color, shape = combos[rng.integers(len(combos))]
        images.append(render(count, color, shape, rng, any_background=bool(any_background)
                             and rng.random() < any_background))
        captions.append(caption(count, color, shape))
        counts.append(count)
    return np.stack(images), captions, np.array(counts)


__all__ = ["render", "render_dataset", "shape_mask", "PALETTE", "COLORS", "SHAPES", "IMAGE_SIZE"]
