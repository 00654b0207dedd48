"""Rewards in the world, both differentiable, with the reward signature
`reward(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]`:

- `world_count`: a learned count regressor (a small CNN trained on renders) scores -|predicted - prompted count|;
  the same role as the detector-based count reward of AlignProp's controllability experiment.
- `world_color`: weight-free; how close the foreground pixels are to the prompt's colour.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from alignprop.errors import UserError
from alignprop.world.prompts import parse_caption
from alignprop.world.render import PALETTE, render_dataset

logger = logging.getLogger(__name__)

COUNT_REWARD_DIR = Path(__file__).parent / "assets" / "count_reward"
WEIGHTS_FILE = "model.safetensors"


class CountRegressor(nn.Module):
    """Predicts a density map and sums it: the count of a sum of local detections generalises across layouts."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(2 * width, 1, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.features(images * 2 - 1)).sum(dim=(1, 2, 3)) / 16.0


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, contrast and noise of the kind a small generator produces, so the reward scores objects, not pixels."""
    b = images.shape[0]
    blur = torch.rand(b, 1, 1, 1, generator=generator) * 0.7
    smooth = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = images * (1 - blur) + smooth * blur
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean
    images = images + torch.randn(images.shape, generator=generator) * 0.05 * torch.rand(b, 1, 1, 1, generator=generator)
    return images.clamp(0, 1)


def train_count_regressor(out: str | Path, steps: int = 1500, batch_size: int = 64, seed: int = 0,
                          num_images: int = 20000) -> dict:
    """`alignprop world train-count-reward OUT`: fit the regressor on renders; report held-out accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    started = time.time()
    images_np, _, counts_np = render_dataset(num_images, seed=seed + 1)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2)
    counts = torch.from_numpy(counts_np).float()
    model = CountRegressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(steps), desc="world count reward"):
        idx = torch.from_numpy(rng.integers(0, num_images, batch_size))
        loss = F.smooth_l1_loss(model(_augment(images[idx], generator)), counts[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    metrics = {}
    for split, heldout in (("train_pairs", False), ("heldout_pairs", True)):
        test_np, _, test_counts = render_dataset(1000, seed=seed + 100, heldout=heldout)
        with torch.no_grad():
            pred = model(torch.from_numpy(test_np).permute(0, 3, 1, 2)).numpy()
        metrics[split] = {"accuracy": float((np.rint(pred) == test_counts).mean()),
                          "mae": float(np.abs(pred - test_counts).mean())}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    info = {"architecture": "CountRegressor(width=32)", "seed": seed, "steps": steps, "batch_size": batch_size,
            "num_images": num_images, "train_seconds": round(time.time() - started, 1), "held_out": metrics,
            "command": f"alignprop world train-count-reward {out} --steps {steps} --seed {seed}"}
    (out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("count reward written to %s: %s", out, metrics)
    return info


def load_count_regressor(weights_dir: str | Path | None = None, device="cpu") -> CountRegressor:
    from safetensors.torch import load_file

    directory = Path(weights_dir) if weights_dir else COUNT_REWARD_DIR
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"world_count weights not found at {path}; train them with `alignprop world "
                        "train-count-reward DIR` and pass --set reward_weights_dir=DIR")
    model = CountRegressor()
    state = load_file(path)
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise UserError(f"{path} is not a world_count checkpoint: missing key {missing[0]!r}")
    model.load_state_dict(state)
    return model.requires_grad_(False).eval().to(device)


def world_count(device="cpu", weights_dir=None, **_):
    weights = Path(weights_dir) / "world_count" if weights_dir and (Path(weights_dir) / "world_count").is_dir() else None
    model = load_count_regressor(weights, device)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = torch.tensor([parse_caption(p)[0] for p in prompts], dtype=images.dtype, device=images.device)
        return -(model(images) - targets).abs()

    return reward


def world_color(device="cpu", **_):
    palette = {name: torch.tensor(rgb) for name, rgb in PALETTE.items()}

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = torch.stack([palette[parse_caption(p)[1]] for p in prompts]).to(images)[:, :, None, None]
        border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
        background = border.median(dim=2).values.detach()[:, :, None, None]
        foreground = torch.sigmoid(((images - background).norm(dim=1) - 0.25) / 0.05)  # soft mask [B, H, W]
        similarity = 1 - (images - targets).norm(dim=1) / 3**0.5
        area = foreground.sum(dim=(1, 2))
        score = (foreground * similarity).sum(dim=(1, 2)) / (area + 1e-6)
        return score * (area / 20).clamp(max=1.0)  # no foreground (fewer than ~20 px) scores towards 0

    return reward
