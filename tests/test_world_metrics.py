"""Exact ground truth: the object counter and colour classifier, and the metrics built on them."""

import numpy as np
import pytest
import torch

from alignprop.world import prompts as wp
from alignprop.world.metrics import MIN_AREA, classify_color, count_objects, world_metrics
from alignprop.world.render import IMAGE_SIZE, PALETTE, render, render_dataset, shape_mask

ALL_COMBOS = wp.combinations(False) + wp.combinations(True)


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("any_background", [False, True])
def test_exact_counter_and_colour_classifier_are_exact_on_renders(noisy, any_background):
    rng = np.random.default_rng(3)
    for _ in range(3):
        for count, color, shape in ALL_COMBOS:
            image = render(count, color, shape, rng, noisy=noisy, any_background=any_background)
            assert count_objects(image) == count, (count, color, shape)
            assert classify_color(image) == color, (count, color, shape)


def test_counter_uses_the_images_own_background():
    """A drifted, dark or bright background is separated by its own colour, not by a brightness threshold."""
    rng = np.random.default_rng(0)
    image = render(3, "yellow", "circle", rng, noisy=False)
    shifted = np.clip(image * 0.5 + np.array([0.3, 0.0, 0.4]), 0, 1)  # a strong global colour cast
    assert count_objects(shifted) == 3
    for grey in (0.05, 0.4, 0.95):
        assert count_objects(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), grey, dtype=np.float32)) == 0
        assert classify_color(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), grey, dtype=np.float32)) is None


def _canvas(*squares, color="red", background=(0.9, 0.9, 0.9)):
    image = np.broadcast_to(np.array(background, dtype=np.float32), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    for y, x, size in squares:
        image[y:y + size, x:x + size][shape_mask("square", size)] = PALETTE[color]
    return image


def test_counter_counts_what_is_visibly_separate():
    assert count_objects(_canvas((4, 4, 6), (4, 12, 6))) == 2  # two pixels apart: two objects
    assert count_objects(_canvas((4, 4, 6), (4, 10, 6))) == 1  # touching: one blob
    assert count_objects(_canvas((4, 4, 6), (20, 20, 2))) == 1  # a speck below MIN_AREA is not an object
    assert 2 * 2 < MIN_AREA <= 3 * 3
    faint = _canvas((4, 4, 6))
    faint[20:26, 20:26] = 0.8 * faint[20:26, 20:26] + 0.2 * np.array(PALETTE["red"])  # 20% red on the grey
    assert count_objects(faint) == 1  # a shape too close to the background colour is not counted


def test_world_metrics_per_prompt():
    images, captions, counts = render_dataset(40, seed=1)
    wrong = [wp.caption(1 if n > 1 else 2, c, s) for n, c, s in map(wp.parse_caption, captions)]
    right = world_metrics(torch.from_numpy(images).permute(0, 3, 1, 2), captions)
    assert right["count_accuracy"] == 1.0 and right["color_accuracy"] == 1.0 and right["count_mae"] == 0
    assert right["counts"] == list(counts)
    assert sum(v["n"] for v in right["per_prompt"].values()) == 40
    bad = world_metrics(images, wrong)  # numpy [B, H, W, 3] is accepted too
    assert bad["count_accuracy"] == 0.0 and bad["color_accuracy"] == 1.0
    assert bad["count_mae"] == pytest.approx(np.mean([abs(wp.parse_caption(w)[0] - n) for w, n in zip(wrong, counts)]))
    recoloured = [wp.caption(n, "green" if c != "green" else "red", s) for n, c, s in map(wp.parse_caption, captions)]
    assert world_metrics(images, recoloured)["color_accuracy"] == 0.0
