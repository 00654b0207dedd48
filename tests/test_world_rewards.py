"""world_count and world_color: they prefer the prompted count / colour on true renders, and are differentiable."""

import json

import numpy as np
import pytest
import torch

from alignprop.errors import UserError
from alignprop.rewards import REWARDS, load_reward
from alignprop.world import prompts as wp
from alignprop.world.manifest import verify_manifest
from alignprop.world.render import render
from alignprop.world.rewards import COUNT_REWARD_DIR, CountRegressor, train_count_regressor

ALL_COMBOS = wp.combinations(False) + wp.combinations(True)


def _renders(combos, seed, **kwargs):
    rng = np.random.default_rng(seed)
    arrays = [render(*combo, rng, **kwargs) for combo in combos]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _recaption(combos, count=None, color=None):
    return [wp.caption(count(n) if count else n, color(c) if color else c, s) for n, c, s in combos]


def test_both_are_registered_as_differentiable():
    assert REWARDS["world_count"].differentiable and REWARDS["world_color"].differentiable


@pytest.mark.parametrize("kwargs", [dict(noisy=False), dict(noisy=True, any_background=True)])
def test_world_count_scores_the_right_count_highest(kwargs):
    reward = load_reward("world_count")
    images = _renders(ALL_COMBOS, seed=11, **kwargs)  # held-out (colour, shape) pairs included
    with torch.no_grad():
        scores = torch.stack([reward(images, _recaption(ALL_COMBOS, count=lambda n, k=k: k)) for k in range(1, 5)])
    right = torch.tensor([n - 1 for n, _, _ in ALL_COMBOS])
    assert torch.equal(scores.argmax(dim=0), right)  # every image: the true count beats each wrong one


def test_world_count_is_differentiable_towards_the_prompted_count():
    reward = load_reward("world_count")
    combos = [(1, "red", "circle"), (3, "blue", "square")]
    images = _renders(combos, seed=5, noisy=False).requires_grad_(True)
    asked_more = _recaption(combos, count=lambda n: n + 1)
    reward(images, asked_more).sum().backward()
    assert images.grad.abs().sum() > 0
    with torch.no_grad():  # a small step up the gradient moves the prediction towards the asked-for count
        before = reward(images, asked_more)
        after = reward(images + 0.02 * images.grad.sign(), asked_more)
    assert (after > before).all()


def test_shipped_count_reward_matches_its_manifest_and_figures():
    manifest = verify_manifest(COUNT_REWARD_DIR)
    assert {"model.safetensors", "config.json"} <= set(manifest["files"])
    assert manifest["command"].startswith("alignprop world train-count-reward")
    for split, figures in manifest["held_out"].items():
        assert figures["accuracy"] >= 0.9, split


def test_count_reward_trains_and_loads_from_weights_dir(tmp_path):
    manifest = train_count_regressor(tmp_path / "world_count", steps=2, num_images=32, width=8)
    assert json.loads((tmp_path / "world_count" / "config.json").read_text())["width"] == 8
    verify_manifest(tmp_path / "world_count")
    assert set(manifest["held_out"]) == {"train_pairs", "heldout_pairs", "varied_train_pairs", "varied_heldout_pairs"}
    images = _renders([(2, "red", "circle")], seed=0)
    own = load_reward("world_count", weights_dir=str(tmp_path))(images, ["two red circles"])
    shipped = load_reward("world_count")(images, ["two red circles"])
    assert not torch.allclose(own, shipped)  # the 2-step model, not the shipped one
    with pytest.raises(UserError, match="train-count-reward"):
        from alignprop.world.rewards import load_count_regressor
        load_count_regressor(tmp_path / "missing")
    assert CountRegressor(8).features[0].out_channels == 8


@pytest.mark.parametrize("kwargs", [dict(noisy=False), dict(noisy=True, any_background=True)])
def test_world_color_scores_the_right_colour_highest(kwargs):
    reward = load_reward("world_color")
    images = _renders(ALL_COMBOS, seed=12, **kwargs)
    with torch.no_grad():
        scores = torch.stack([reward(images, _recaption(ALL_COMBOS, color=lambda c, k=k: k)) for k in wp.COLORS])
    right = torch.tensor([wp.COLORS.index(c) for _, c, _ in ALL_COMBOS])
    assert torch.equal(scores.argmax(dim=0), right)


def test_world_color_is_differentiable_and_pays_nothing_for_erasing_shapes():
    reward = load_reward("world_color")
    images = _renders([(2, "red", "circle"), (3, "blue", "square")], seed=0, noisy=False).requires_grad_(True)
    prompts = ["two green circles", "three yellow squares"]
    score = reward(images, prompts)
    score.sum().backward()
    assert images.grad.abs().sum() > 0
    with torch.no_grad():
        after = reward(images + 0.02 * images.grad.sign(), prompts)
        blank = reward(torch.full_like(images, 0.8), prompts)
    assert (after > score).all() and (blank < 0.05).all() and (score > blank).all()
