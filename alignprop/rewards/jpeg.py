"""`jpeg_compressibility` / `jpeg_incompressibility`: the JPEG file size at quality 95, in kB, as in DDPO
(arXiv 2305.13301, kvablack/ddpo-pytorch rewards.py): -size and +size. Not differentiable (the encoder is PIL's
libjpeg); for DDPO and for evaluation. `compressibility` is the differentiable stand-in.
"""

from __future__ import annotations

import io

import numpy as np
import torch

QUALITY = 95


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8, rounded as an image file would store it."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_sizes_kb(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """JPEG size of each image in kB (1 kB = 1000 bytes), as a float tensor on the images' device."""
    from PIL import Image

    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(device="cpu", weights_dir=None, quality: int = QUALITY):
    """-(JPEG size in kB): higher is more compressible."""

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -jpeg_sizes_kb(images, quality)

    return reward


def jpeg_incompressibility(device="cpu", weights_dir=None, quality: int = QUALITY):
    """+(JPEG size in kB): higher is less compressible."""

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return jpeg_sizes_kb(images, quality)

    return reward
