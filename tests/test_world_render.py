"""The world's renderer and captions: deterministic by seed, held-out pairs kept out, CLI output."""

import json

import numpy as np
import pytest
from PIL import Image

from alignprop.cli import main
from alignprop.world import prompts as wp
from alignprop.world.render import IMAGE_SIZE, render, render_dataset, render_varied


def test_renderer_is_deterministic_by_seed():
    a, caps_a, counts_a = render_dataset(32, seed=7, any_background=0.5)
    b, caps_b, counts_b = render_dataset(32, seed=7, any_background=0.5)
    c, _, _ = render_dataset(32, seed=8, any_background=0.5)
    assert np.array_equal(a, b) and caps_a == caps_b and np.array_equal(counts_a, counts_b)
    assert not np.array_equal(a, c)
    assert a.shape == (32, IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    combos = wp.combinations(False)
    v1 = [render_varied(np.random.default_rng(3), combos) for _ in range(2)]
    v2 = [render_varied(np.random.default_rng(3), combos) for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(v1, v2))


def test_captions_match_counts_and_cover_every_combination():
    _, captions, counts = render_dataset(300, seed=0)
    assert [wp.parse_caption(c)[0] for c in captions] == list(counts)
    assert set(captions) == set(wp.train_captions())  # 300 draws over 36 captions reach them all


def test_heldout_pairs_never_appear_in_training_renders():
    _, captions, _ = render_dataset(500, seed=0)
    heldout = set(wp.heldout_captions())
    assert len(heldout) == 4 * len(wp.HELDOUT_PAIRS) and not heldout & set(captions)
    assert set(wp.train_captions()) | heldout == {wp.caption(n, c, s) for n in range(1, 5)
                                                  for c in wp.COLORS for s in wp.SHAPES}
    _, held, _ = render_dataset(50, seed=0, heldout=True)
    assert set(held) <= heldout


def test_backgrounds_plain_noisy_and_any_colour():
    rng = np.random.default_rng(0)
    plain = render(2, "red", "circle", rng, noisy=False)
    noisy = render(2, "red", "circle", rng, noisy=True)
    corner = slice(0, 2)
    assert plain[corner, corner].std(axis=(0, 1)).max() == 0 and noisy[corner, corner].std(axis=(0, 1)).min() > 0
    corners = {tuple(render(1, "blue", "square", rng, noisy=False, any_background=True)[0, 0]) for _ in range(20)}
    assert len(corners) == 20  # a fresh background colour each time


def test_parse_caption():
    assert wp.parse_caption("two red circles") == (2, "red", "circle")
    assert wp.parse_caption("one blue square") == (1, "blue", "square")
    for text in wp.train_captions() + wp.heldout_captions():
        assert wp.caption(*wp.parse_caption(text)) == text
    for bad in ("a photo of a cat", "five red circles", "two purple squares", "two red"):
        with pytest.raises(wp.CaptionError, match="not a world caption"):
            wp.parse_caption(bad)


def test_cli_render_writes_pngs_and_captions(tmp_path, capsys):
    main(["world", "render", str(tmp_path / "out"), "--n", "6", "--seed", "4"])
    records = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    images, captions, _ = render_dataset(6, seed=4)
    assert [r["prompt"] for r in records] == captions
    for record, image in zip(records, images):
        png = np.asarray(Image.open(tmp_path / "out" / record["file"]), dtype=np.float32) / 255
        assert png.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and np.abs(png - image).max() <= 0.5 / 255 + 1e-6
