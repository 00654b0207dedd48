"""Weight-free differentiable rewards: they need no download, so the demo and the tests can align to them.

Each factory returns a closure `reward(images, prompts) -> Tensor[B]`, images in [0, 1], higher is better.
"""

from __future__ import annotations

import torch

# ITU-R BT.601 luma weights.
LUMA = (0.299, 0.587, 0.114)


def brightness(**_):
    """Mean luma of the image, in [0, 1]."""

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
        return (images * weights).sum(1).mean(dim=(1, 2))

    return reward


def saturation(**_):
    """Mean HSV-style saturation (max - min over channels) per pixel, in [0, 1]."""

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (images.amax(1) - images.amin(1)).mean(dim=(1, 2))

    return reward


def target_color(color=(1.0, 0.0, 0.0), **_):
    """Closeness of every pixel to a target RGB colour: 1 - mean distance / sqrt(3), in [0, 1]."""

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        target = images.new_tensor(color).view(1, 3, 1, 1)
        distance = (images - target).pow(2).sum(1).add(1e-12).sqrt()
        return 1.0 - distance.mean(dim=(1, 2)) / 3**0.5

    return reward
