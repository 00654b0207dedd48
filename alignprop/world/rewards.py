"""Rewards in the world, both differentiable, with the reward signature
`reward(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]`:

- `world_count`: a learned count regressor (a small CNN trained on varied renders) scores -|predicted - prompted count|;
  the same role as the detector-based count reward of AlignProp's controllability experiment.
- `world_color`: weight-free; how close the foreground pixels are to the prompt's colour.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from tqdm.auto import tqdm

from alignprop.errors import UserError
from alignprop.world.metrics import count_batch, count_objects
from alignprop.world.prompts import COLORS, SHAPES, parse_caption
from alignprop.world.render import IMAGE_SIZE, PALETTE, render_dataset, shape_mask

logger = logging.getLogger(__name__)

COUNT_REWARD_DIR = Path(__file__).parent / "assets" / "count_reward"
WEIGHTS_FILE = "model.safetensors"


class CountRegressor(nn.Module):
    """Counts the objects in a 32x32 image from a global view: three stride-2 stages down to 4x4, then an MLP.

    A receptive field over the whole image lets the count stay independent of object size; a density map summed
    over a small receptive field ties the count to area, which an aligned generator then exploits (objects
    shrink or swell instead of appearing or disappearing).
    """

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * (IMAGE_SIZE // 8) ** 2, 128), nn.GELU(),
                                  nn.Linear(128, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        return F.softplus(self.head(self.features(images * 2 - 1))).squeeze(1)


COUNT_WEIGHTS = (0.06, 0.18, 0.18, 0.18, 0.18, 0.12, 0.10)  # P(0..6 objects) in the regressor's training scenes


def varied_scene(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One render from a wider distribution than the world model's training set, labelled by the exact counter.

    Generated images differ from the renders the world model learnt from: their backgrounds drift in colour and
    texture, objects come out larger, smaller, stretched or blurred, sometimes touching, and there are 0 or 5-6 of
    them. A reward trained on the narrow render distribution miscounts those (it agreed with the exact counter on
    69% of the world model's samples), and alignment learns its errors. So the scenes vary all of these, and the
    label is what `count_objects` reads on the finished image, merges and faint shapes included.
    """
    count = int(rng.choice(len(COUNT_WEIGHTS), p=COUNT_WEIGHTS))
    grey = rng.uniform(0.12, 0.97)
    image = np.broadcast_to(np.clip(grey + rng.normal(0, 0.06, 3), 0, 1), (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = image.astype(np.float32).copy()
    if rng.random() < 0.5:  # low-frequency background texture
        image += ndimage.zoom(rng.normal(0, rng.uniform(0.01, 0.06), (4, 4, 3)), (IMAGE_SIZE / 4, IMAGE_SIZE / 4, 1),
                              order=1)
    color = np.array(PALETTE[COLORS[rng.integers(len(COLORS))]]) * rng.uniform(0.7, 1.1) + rng.normal(0, 0.06, 3)
    shape = SHAPES[rng.integers(len(SHAPES))]
    overlap = rng.random() < 0.15
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(count):
        for _ in range(100):
            if rng.random() < 0.4:
                h, w = (int(v) for v in rng.integers(5, 13, size=2))
            else:
                h = w = int(rng.integers(5, 13))
            y, x = int(rng.integers(1, IMAGE_SIZE - h)), int(rng.integers(1, IMAGE_SIZE - w))
            if overlap or all(y + h + 1 <= by or by + bh + 1 <= y or x + w + 1 <= bx or bx + bw + 1 <= x
                              for by, bx, bh, bw in boxes):
                boxes.append((y, x, h, w))
                break
    for y, x, h, w in boxes:
        side = max(h, w)
        mask = shape_mask(shape if rng.random() < 0.8 else SHAPES[rng.integers(len(SHAPES))], side)
        mask = ndimage.zoom(mask.astype(np.float32), (h / side, w / side), order=1)[:h, :w] > 0.5
        image[y:y + mask.shape[0], x:x + mask.shape[1]][mask] = np.clip(color + rng.normal(0, 0.04, 3), 0, 1)
    if rng.random() < 0.6:
        image = ndimage.gaussian_filter(image, (rng.uniform(0.3, 1.0),) * 2 + (0,))
    image = np.clip(image + rng.normal(0, rng.uniform(0, 0.05), image.shape), 0, 1).astype(np.float32)
    return image, count_objects(image)


def varied_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` varied scenes [n, 3, H, W] and their exact counts [n]."""
    rng = np.random.default_rng(seed)
    images, counts = zip(*(varied_scene(rng) for _ in range(n)))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(counts).float()


def _count_accuracy(model: CountRegressor, images: torch.Tensor, counts: torch.Tensor) -> dict:
    with torch.no_grad():
        pred = torch.cat([model(images[i:i + 256]) for i in range(0, len(images), 256)])
    return {"accuracy": float((pred.round() == counts).float().mean()), "mae": float((pred - counts).abs().mean())}


def train_count_regressor(out: str | Path, steps: int = 3000, batch_size: int = 64, seed: int = 0,
                          num_images: int = 20000, command: str | None = None,
                          agreement_images: int = 96) -> dict:
    """`alignprop world train-count-reward OUT`: fit the regressor on varied scenes, report held-out accuracy,
    and write OUT (weights, config.json, MANIFEST.json) atomically: OUT is replaced only once it is complete.

    With `agreement_images` > 0, it also records how often its rounded count equals the exact counter's on the
    shipped world model's own samples (`agreement_on_world_samples`): the figure that decides whether aligning to
    this reward moves the true count, or only the reward."""
    from safetensors.torch import save_file

    from alignprop.world.train_model import write_manifest

    if steps < 1 or num_images < batch_size or agreement_images < 0:
        raise UserError(f"train-count-reward needs steps >= 1, num_images >= batch_size ({batch_size}) and "
                        f"agreement_images >= 0; got steps={steps}, num_images={num_images}, "
                        f"agreement_images={agreement_images}")
    torch.manual_seed(seed)
    started = time.time()
    images, counts = varied_dataset(num_images, seed=seed + 1)
    model = CountRegressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(steps), desc="world count reward"):
        idx = torch.from_numpy(rng.integers(0, num_images, batch_size))
        batch = images[idx]
        if rng.random() < 0.5:  # flips and transposes keep the count
            batch = batch.flip(3)
        if rng.random() < 0.5:
            batch = batch.transpose(2, 3)
        loss = F.smooth_l1_loss(model(batch), counts[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    metrics = {"varied_scenes": _count_accuracy(model, *varied_dataset(1000, seed=seed + 100))}
    for split, heldout in (("train_pairs", False), ("heldout_pairs", True)):
        test_np, _, test_counts = render_dataset(1000, seed=seed + 100, heldout=heldout)
        metrics[split] = _count_accuracy(model, torch.from_numpy(test_np).permute(0, 3, 1, 2),
                                         torch.from_numpy(test_counts).float())
    if agreement_images > 0:
        metrics.update(agreement_on_world_samples(model, agreement_images))
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS_FILE)
    info = {"architecture": "CountRegressor(width=32)", "seed": seed, "steps": steps, "batch_size": batch_size,
            "num_images": num_images, "train_seconds": round(time.time() - started, 1), "held_out": metrics,
            "command": command or f"alignprop world train-count-reward {out} --steps {steps} --seed {seed}"}
    (tmp / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    manifest = write_manifest(tmp, {k: info[k] for k in ("command", "seed", "held_out")})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("count reward written to %s: %s", out, metrics)
    return manifest


def agreement_on_world_samples(model: CountRegressor, num_images: int = 96,
                               model_dir: str | Path | None = None) -> dict:
    """How often the regressor's rounded count equals the exact counter's on the world model's samples (train and
    held-out captions; the world evaluation's fixed seeds)."""
    from alignprop.models import WORLD_MODEL_DIR
    from alignprop.world.train_model import sample_world

    result = {}
    for split, heldout in (("world_samples_train", False), ("world_samples_heldout", True)):
        images, _ = sample_world(model_dir or WORLD_MODEL_DIR, num_images, heldout=heldout)
        exact = torch.from_numpy(count_batch(images))
        with torch.no_grad():
            predicted = model(images).round().long()
        result[split] = {"agreement_with_exact_counter": float((predicted == exact).float().mean()),
                         "n_images": num_images}
    return result


def load_count_regressor(weights_dir: str | Path | None = None, device="cpu") -> CountRegressor:
    from safetensors.torch import load_file

    directory = Path(weights_dir) if weights_dir else COUNT_REWARD_DIR
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"world_count weights not found at {path}; train them with `alignprop world "
                        "train-count-reward DIR/world_count` and pass --set reward_weights_dir=DIR")
    model = CountRegressor()
    state = load_file(path)
    expected = model.state_dict()
    wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if wrong:
        raise UserError(f"{path} is not a checkpoint of this version's world_count regressor (key {wrong[0]!r} is "
                        "missing or has another shape); retrain it with "
                        "`alignprop world train-count-reward DIR/world_count`")
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
