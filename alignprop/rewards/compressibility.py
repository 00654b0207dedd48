"""`compressibility`: a differentiable stand-in for `jpeg_compressibility`, a small CNN that predicts JPEG size.

The network predicts bytes per pixel at every location of a feature map (JPEG spends its bits on local detail);
predicted size (kB) = header + mean bytes-per-pixel * H * W / 1000, so it carries over across resolutions.
Reward = -predicted size, the same units as `jpeg_compressibility`.

`fit_compressibility` (`alignprop rewards fit-compressibility`) trains it on images the base model generates (or
a directory of images). Each image also enters as a few degraded variants (blurred, noisier, posterised) with
their own true JPEG sizes, so the network sees the directions training will push images in. It reports the
Pearson/Spearman correlation and error against the true JPEG size on held-out images and saves them in
config.json next to the weights.

Weights (under weights_dir):
    compressibility/model.safetensors, compressibility/config.json
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
from alignprop.rewards import weights
from alignprop.rewards.jpeg import QUALITY, jpeg_sizes_kb

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class JpegSizeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, 1, 1),
        )
        self.header_kb = nn.Parameter(torch.tensor(0.6))  # JPEG headers and tables: about 0.6 kB at quality 95

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> predicted JPEG size in kB, [B]."""
        bytes_per_pixel = F.softplus(self.features(images * 2 - 1)).mean(dim=(1, 2, 3))
        h, w = images.shape[-2:]
        return self.header_kb.abs() + bytes_per_pixel * (h * w / 1000)


def compressibility(device="cpu", weights_dir=None):
    path = weights.find(weights_dir, "compressibility", f"compressibility/{WEIGHTS_FILE}")
    model = load_surrogate(path.parent).to(device)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -model(images.to(model.header_kb.dtype)).float()

    return reward


def load_surrogate(directory: Path) -> JpegSizeNet:
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    model = JpegSizeNet(config.get("width", 32))
    state = weights.load_state_dict(directory / WEIGHTS_FILE)
    weights.check_keys(state, list(model.state_dict()), directory / WEIGHTS_FILE, "compressibility (JpegSizeNet)")
    model.load_state_dict(state)
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------
def generate_images(model: str, num_images: int, prompts: str = "general", num_inference_steps: int = 20,
                    batch_size: int = 8, seed: int = 0, device: str | None = None) -> torch.Tensor:
    """Sample images from a diffusers StableDiffusionPipeline: [N, 3, H, W] in [0, 1] on the CPU."""
    from diffusers import StableDiffusionPipeline

    from alignprop.models import resolve_model_dir
    from alignprop.prompts import load_prompts

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_dir(model), dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    texts = load_prompts(prompts)
    generator = torch.Generator(device).manual_seed(seed)
    images = []
    for start in tqdm(range(0, num_images, batch_size), desc="generating images"):
        batch = [texts[i % len(texts)] for i in range(start, min(start + batch_size, num_images))]
        out = pipe(batch, num_inference_steps=num_inference_steps, generator=generator, output_type="pt")
        images.append(out.images.float().cpu())
    return torch.cat(images)


def read_images(directory: str | Path, resolution: int | None = None) -> torch.Tensor:
    """Every image file in a directory (sorted), RGB, resized to a common square side (default: the first's)."""
    from PIL import Image

    paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    tensors = []
    for path in paths:
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        tensors.append(torch.from_numpy(array).permute(2, 0, 1))
    side = resolution or min(tensors[0].shape[-2:])
    return torch.stack([F.interpolate(t[None], size=(side, side), mode="bilinear", antialias=True)[0].clamp(0, 1)
                        for t in tensors])


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random mix of blur, noise and posterisation per image: JPEG sizes from near-flat to noisy."""
    b = images.shape[0]
    u = lambda: torch.rand(b, 1, 1, 1, generator=generator)  # noqa: E731
    blurred = F.avg_pool2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    images = torch.lerp(images, blurred, u() * (u() < 0.5))
    levels = 2 + (u() * 14).floor()
    posterised = (images * levels).round() / levels
    images = torch.where(u() < 0.3, posterised, images)
    noise = torch.randn(images.shape, generator=generator) * 0.15 * u() * (u() < 0.5)
    return (images + noise).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------
def _correlations(pred: np.ndarray, true: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr

    return {"pearson": float(pearsonr(pred, true)[0]), "spearman": float(spearmanr(pred, true)[0]),
            "mae_kb": float(np.abs(pred - true).mean()), "mean_true_kb": float(true.mean()), "n": int(len(true))}


def fit_compressibility(images: torch.Tensor, out: str | Path, steps: int = 600, variants: int = 3,
                        held_out_fraction: float = 0.2, batch_size: int = 32, width: int = 32, seed: int = 0,
                        source: str = "") -> dict:
    """Train JpegSizeNet on images [N, 3, H, W] in [0, 1] (plus `variants` degraded copies of each), write
    OUT/model.safetensors and OUT/config.json with held-out correlations; return the config."""
    from safetensors.torch import save_file

    if len(images) < 10:
        raise UserError(f"fit-compressibility needs at least 10 images, got {len(images)}")
    started = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    n_held = max(2, int(len(images) * held_out_fraction))
    splits = {"held_out": images[order[:n_held]], "train": images[order[n_held:]]}
    data = {}
    for name, originals in splits.items():  # variants of a held-out image stay held out
        x = torch.cat([originals] + [degrade(originals, generator) for _ in range(variants)])
        data[name] = (x, jpeg_sizes_kb(x, QUALITY))

    model = JpegSizeNet(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    x_train, y_train = data["train"]
    for _ in tqdm(range(steps), desc="fitting compressibility"):
        idx = torch.randint(0, len(x_train), (batch_size,), generator=generator)
        loss = F.mse_loss(model(x_train[idx]).log(), y_train[idx].log())  # relative error: sizes span decades
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()

    model.eval()
    x_held, y_held = data["held_out"]
    with torch.no_grad():
        pred = torch.cat([model(chunk) for chunk in x_held.split(256)]).numpy()
    metrics = {"held_out": _correlations(pred, y_held.numpy()),
               "held_out_originals": _correlations(pred[:n_held], y_held[:n_held].numpy())}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    config = {"architecture": "JpegSizeNet", "width": width, "jpeg_quality": QUALITY, "source": source,
              "num_images": len(images), "variants_per_image": variants, "resolution": list(images.shape[-2:]),
              "steps": steps, "seed": seed, "train_seconds": round(time.time() - started, 1), **metrics}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    logger.info("compressibility surrogate written to %s: held-out pearson %.3f", out, metrics["held_out"]["pearson"])
    return config
