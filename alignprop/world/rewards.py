"""Rewards in the world, both differentiable, with the reward signature
`reward(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]`:

- `world_count`: a learned count regressor (a small CNN trained on renders) scores -|predicted - prompted count|;
  the same role as the detector-based count reward of AlignProp's controllability experiment. It is fit to the
  exact counter's answer on deliberately hard renders (touching and faint shapes, specks, any background) and
  generator-like corruptions, so that raising it raises the ground-truth count accuracy.
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
from alignprop.world.prompts import combinations, parse_caption
from alignprop.world.render import PALETTE, render_dataset, render_varied

logger = logging.getLogger(__name__)

COUNT_REWARD_DIR = Path(__file__).parent / "assets" / "count_reward"
WEIGHTS_FILE = "model.safetensors"
FGSM_EVAL_EPS = 0.02  # the pixel step of the adversarial accuracy figure


class CountRegressor(nn.Module):
    """Predicts a density map and sums it: a sum of local detections generalises across layouts. The dilated
    layers give each output a ~30-pixel receptive field, wide enough to see two touching shapes as one blob."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=4, dilation=4), nn.GELU(),
            nn.Conv2d(2 * width, 1, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> predicted counts [B]."""
        return F.softplus(self.features(images * 2 - 1)).sum(dim=(1, 2, 3)) / 16.0


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, contrast, colour cast, smooth colour blotches and noise, as a small generator produces them, so the
    reward scores objects rather than pixel statistics."""
    b = images.shape[0]

    def uniform(*shape):
        return torch.rand(b, *shape, generator=generator)

    smooth = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur = uniform(1, 1, 1) * 0.7
    images = images * (1 - blur) + smooth * blur
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * (0.8 + 0.4 * uniform(1, 1, 1)) + mean
    images = images + (uniform(3, 1, 1) - 0.5) * 0.1  # global colour cast
    blotches = F.interpolate(torch.randn(b, 3, 4, 4, generator=generator), size=images.shape[-2:], mode="bilinear")
    images = images + blotches * 0.05 * uniform(1, 1, 1)
    images = images + torch.randn(images.shape, generator=generator) * 0.05 * uniform(1, 1, 1)
    return images.clamp(0, 1)


def count_training_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` varied renders of the training (colour, shape) pairs [n, 3, H, W] and their exact counts [n]."""
    from alignprop.world.metrics import count_objects

    rng = np.random.default_rng(seed)
    combos = combinations(heldout=False)
    images = np.stack([render_varied(rng, combos) for _ in tqdm(range(n), desc="count reward renders")])
    counts = np.array([count_objects(image) for image in images], dtype=np.float32)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(counts)


def count_accuracy(model: CountRegressor, images: torch.Tensor, counts) -> dict:
    with torch.no_grad():
        pred = torch.cat([model(images[i:i + 500]) for i in range(0, len(images), 500)]).numpy()
    counts = np.asarray(counts)
    return {"accuracy": float((np.rint(pred) == counts).mean()), "mae": float(np.abs(pred - counts).mean()),
            "n": len(counts)}


def evaluate_count_regressor(model: CountRegressor, seed: int = 100, n: int = 1000) -> dict:
    """Rounded-prediction accuracy against the exact count on fresh renders: plain renders of the training and
    held-out (colour, shape) pairs, and varied renders (see `render_varied`) of both."""
    from alignprop.world.metrics import count_objects

    metrics = {}
    for heldout in (False, True):
        split = "heldout_pairs" if heldout else "train_pairs"
        images, _, counts = render_dataset(n, seed=seed, heldout=heldout)
        metrics[split] = count_accuracy(model, torch.from_numpy(images).permute(0, 3, 1, 2), counts)
        rng = np.random.default_rng(seed + 1)
        varied = np.stack([render_varied(rng, combinations(heldout)) for _ in range(n)])
        metrics["varied_" + split] = count_accuracy(model, torch.from_numpy(varied).permute(0, 3, 1, 2),
                                                    [count_objects(image) for image in varied])
    images_np, _, counts_np = render_dataset(n, seed=seed + 2)
    images, counts = torch.from_numpy(images_np).permute(0, 3, 1, 2), torch.from_numpy(counts_np).float()
    attacked = torch.cat([adversarial(model, images[i:i + 250], counts[i:i + 250], torch.tensor(FGSM_EVAL_EPS))
                          for i in range(0, n, 250)])
    metrics[f"fgsm_{FGSM_EVAL_EPS}_train_pairs"] = count_accuracy(model, attacked, counts.numpy())
    return metrics


def adversarial(model: CountRegressor, images: torch.Tensor, counts: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """FGSM: each image moved by eps (per image) along the sign of the loss gradient (Goodfellow et al. 2015,
    arXiv 1412.6572). Training on these keeps a small, gradient-chosen pixel change from moving the predicted
    count, which is what reward backpropagation would otherwise find and exploit."""
    images = images.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.smooth_l1_loss(model(images), counts), images)
    return (images + eps * grad.sign()).clamp(0, 1).detach()


def train_count_regressor(out: str | Path, steps: int = 2500, batch_size: int = 64, seed: int = 0,
                          num_images: int = 24000, width: int = 32, adversarial_eps: float = 0.03,
                          command: str | None = None) -> dict:
    """`alignprop world train-count-reward OUT`: fit the regressor (smooth L1 on the count; half of every batch
    made adversarial with a step up to `adversarial_eps`); write model.safetensors, config.json and MANIFEST.json
    with its accuracy on fresh renders."""
    from safetensors.torch import save_file

    from alignprop.world.manifest import write_manifest

    torch.manual_seed(seed)
    started = time.time()
    images, counts = count_training_set(num_images, seed=seed + 1)
    model = CountRegressor(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    progress = tqdm(range(steps), desc="world count reward")
    for step in progress:
        idx = torch.from_numpy(rng.integers(0, num_images, batch_size))
        batch, targets = _augment(images[idx], generator), counts[idx]
        if adversarial_eps:
            half = batch_size // 2
            eps = torch.rand(half, 1, 1, 1, generator=generator) * adversarial_eps
            batch = torch.cat([adversarial(model, batch[:half], targets[:half], eps), batch[half:]])
        loss = F.smooth_l1_loss(model(batch), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    train_seconds = time.time() - started
    metrics = evaluate_count_regressor(model, seed=seed + 100)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    config = {"architecture": "CountRegressor", "width": width, "seed": seed, "steps": steps,
              "batch_size": batch_size, "num_images": num_images, "adversarial_eps": adversarial_eps}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    manifest = write_manifest(out, {
        "command": command or f"alignprop world train-count-reward {out} --steps {steps} --seed {seed}",
        "seed": seed, "train_seconds": round(train_seconds, 1), "torch": torch.__version__, "held_out": metrics})
    logger.info("count reward written to %s: %s", out, metrics)
    return manifest


def load_count_regressor(weights_dir: str | Path | None = None, device="cpu") -> CountRegressor:
    """The regressor in `weights_dir` (default: the shipped one), frozen, in eval mode."""
    from safetensors.torch import load_file

    directory = Path(weights_dir) if weights_dir else COUNT_REWARD_DIR
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"world_count weights not found at {path}; train them with `alignprop world "
                        "train-count-reward DIR/world_count` and pass --set reward_weights_dir=DIR")
    config_path = directory / "config.json"
    width = json.loads(config_path.read_text()).get("width", 32) if config_path.is_file() else 32
    model = CountRegressor(width)
    state = load_file(path)
    if set(state) != set(model.state_dict()):
        raise UserError(f"{path} is not a world_count checkpoint of this version (its keys differ from "
                        f"CountRegressor's); retrain it with `alignprop world train-count-reward`")
    model.load_state_dict(state)
    return model.requires_grad_(False).eval().to(device)


def world_count(device="cpu", weights_dir=None, **_):
    """-|predicted count - prompted count|; weights from WEIGHTS_DIR/world_count when it exists, else shipped."""
    weights = Path(weights_dir) / "world_count" if weights_dir and (Path(weights_dir) / "world_count").is_dir() else None
    model = load_count_regressor(weights, device)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = torch.tensor([parse_caption(p)[0] for p in prompts], dtype=images.dtype, device=images.device)
        return -(model(images) - targets).abs()

    return reward


def world_color(device="cpu", **_):
    """Mean similarity of the foreground pixels to the prompt's palette colour, in [0, 1].

    Foreground is a soft mask of pixels far from the image's own background colour (the median of its border,
    as the exact metrics use); an image with less than ~20 foreground pixels is scaled towards 0, so erasing
    the shapes does not pay."""
    palette = {name: torch.tensor(rgb) for name, rgb in PALETTE.items()}

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = torch.stack([palette[parse_caption(p)[1]] for p in prompts]).to(images)[:, :, None, None]
        border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
        background = border.median(dim=2).values.detach()[:, :, None, None]
        # soft mask [B, H, W]: 0 up to 0.15 from the background, 1 from 0.35, around the counter's 0.25
        foreground = (((images - background).norm(dim=1) - 0.15) / 0.2).clamp(0, 1)
        similarity = 1 - (images - targets).norm(dim=1) / 3**0.5
        area = foreground.sum(dim=(1, 2))
        score = (foreground * similarity).sum(dim=(1, 2)) / (area + 1e-6)
        return score * (area / 20).clamp(max=1.0)

    return reward
