"""Fréchet distance between image sets (FID, Heusel et al. 2017, arXiv 1706.08500) with a choice of feature
extractor, computed by torchmetrics' `FrechetInceptionDistance`:

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))     over the features of the two sets.

The number depends on the feature extractor, so it is always reported next to the extractor's name:

- `inception[:WEIGHTS]`: the standard FID features (Inception-v3 pool3, 2048-d), through torchmetrics' default
  extractor. That extractor lives in torch-fidelity, which imports torchvision; where those do not import (this
  project's CPU test machines), asking for it is an error that names the alternatives.
- a directory holding a transformers vision model (`CLIPModel` / `CLIPVisionModel` / `Dinov2Model`, saved with
  `save_pretrained`): the CLIP image embedding (or pooled output) / the DINOv2 CLS token. A feature distance of
  the same form as FID, often called FD_CLIP / FD_DINOv2.
- `world`: for the shipped world model only: the spatially averaged activations of the `world_count` count
  regressor, a CNN trained on world renders (no download; it has seen the real image distribution). It measures
  drift in object shape/layout/colour statistics of 32x32 world images and nothing else.

Every extractor takes float images in [0, 1], [B, 3, H, W], and resizes them to its own input size, so the two
sets may differ in size. Within a reference directory all images must share one size (mixed sizes usually mean
mixed data sets): such a directory is rejected, not silently resized.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alignprop.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
HF_MODEL_TYPES = ("clip", "clip_vision_model", "dinov2")


class FIDError(UserError):
    """A reference set or feature extractor cannot be used; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Feature extractors: images [B, 3, H, W] in [0, 1] -> features [B, num_features]
# ---------------------------------------------------------------------------------------------------------------
class WorldCountFeatures(nn.Module):
    """Mean-pooled activations of the `world_count` regressor (trained on world scenes): its first 32-channel
    stage (colour and edges, 32x32) and its last 128-channel stage (objects and layout, 4x4): 160 features."""

    num_features = 160
    input_size = 32

    def __init__(self, weights_dir: str | Path | None = None):
        super().__init__()
        from alignprop.world.rewards import load_count_regressor

        layers = list(load_count_regressor(weights_dir).features)
        self.early, self.late = nn.Sequential(*layers[:4]), nn.Sequential(*layers[4:])
        self.name = "world_count_cnn (160-d mean-pooled features of the world_count regressor)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = _resize(images.float(), self.input_size) * 2 - 1  # the regressor's own input scaling
        early = self.early(images)
        late = self.late(early)
        return torch.cat([early.mean(dim=(2, 3)), late.mean(dim=(2, 3))], dim=1)


class HFVisionFeatures(nn.Module):
    """CLIP image embeddings or DINOv2 CLS tokens from a transformers model directory."""

    def __init__(self, directory: str | Path):
        super().__init__()
        from transformers import AutoConfig
        from transformers.utils.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN,
                                                  OPENAI_CLIP_STD)

        directory = Path(directory)
        try:
            config = AutoConfig.from_pretrained(directory)
        except (OSError, ValueError) as e:
            raise FIDError(f"cannot read a transformers model config in {directory}: {e}") from None
        if config.model_type not in HF_MODEL_TYPES:
            raise FIDError(f"{directory} holds a {config.model_type!r} model; FID features need one of "
                           f"{', '.join(HF_MODEL_TYPES)} (CLIP or DINOv2 vision models)")
        self.model = _load_vision_model(directory, config.model_type)
        vision = getattr(self.model.config, "vision_config", self.model.config)
        self.input_size = vision.image_size
        mean, std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if "clip" in config.model_type else \
            (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        processor = directory / "preprocessor_config.json"
        if processor.is_file():
            values = json.loads(processor.read_text())
            mean, std = values.get("image_mean", mean), values.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        projected = type(self.model).__name__.endswith("WithProjection")
        self.num_features = self.model.config.projection_dim if projected else vision.hidden_size
        kind = "image embedding" if projected else "pooled output"
        self.name = f"{config.model_type} {kind} ({self.num_features}-d) from {directory}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (_resize(images.float(), self.input_size) - self.mean) / self.std
        out = self.model(pixel_values=pixels.to(self.model.dtype))
        features = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
        return features.float()


def _load_vision_model(directory: Path, model_type: str) -> nn.Module:
    """CLIP: the projected image embedding when the checkpoint has the projection, else the pooled output;
    DINOv2: the model (its pooled output is the layer-normed CLS token)."""
    from transformers import (AutoConfig, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection,
                              Dinov2Model)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIPModel checkpoint's text tower is expected to be left unused
    try:
        if model_type == "dinov2":
            return Dinov2Model.from_pretrained(directory).eval().requires_grad_(False)
        vision = CLIPVisionConfig.from_pretrained(directory)
        if model_type == "clip":  # the projection width is the top-level CLIPConfig's, not always repeated inside
            vision.projection_dim = AutoConfig.from_pretrained(directory).projection_dim
        model, info = CLIPVisionModelWithProjection.from_pretrained(directory, config=vision, output_loading_info=True)
        if any(key.startswith("visual_projection") for key in info["missing_keys"]):
            model = CLIPVisionModel.from_pretrained(directory)
        return model.eval().requires_grad_(False)
    except OSError as e:
        raise FIDError(f"cannot load the feature extractor weights from {directory}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def inception_available() -> bool:
    try:
        import torch_fidelity  # noqa: F401  (imports torchvision)
    except Exception:  # ImportError, or torchvision's operator errors on a mismatched build
        return False
    return True


def build_extractor(spec: str, default: str | None = None) -> tuple[nn.Module | int, str, dict]:
    """(feature argument for torchmetrics, extractor name, extra FrechetInceptionDistance kwargs) for a spec:
    `auto`, `world`, `inception[:WEIGHTS]`, or a transformers model directory. `default` is what `auto` means
    for this base model (e.g. `world`), else Inception when it can be loaded."""
    if spec == "auto":
        if default:
            spec = default
        elif inception_available():
            spec = "inception"
        else:
            raise FIDError("no FID feature extractor available: Inception-v3 needs torch-fidelity (and torchvision), "
                           "which do not import here; pass --fid-extractor DIR with a CLIP or DINOv2 model "
                           "directory, or omit --fid-reference to skip FID")
    if spec == "world":
        extractor = WorldCountFeatures()
        return extractor, extractor.name, {}
    if spec.split(":", 1)[0] == "inception":
        weights = spec.split(":", 1)[1] if ":" in spec else None
        if not inception_available():
            raise FIDError("the Inception-v3 FID extractor needs torch-fidelity, which imports torchvision; neither "
                           "imports in this environment. Install matching torch-fidelity/torchvision builds, or pass "
                           "--fid-extractor DIR (a CLIP or DINOv2 model directory), or `world` for the world model")
        kwargs = {"feature_extractor_weights_path": weights} if weights else {}
        return 2048, "inception-v3 pool3 (2048-d, torch-fidelity)", kwargs
    path = Path(spec)
    if not path.is_dir():
        raise FIDError(f"unknown FID extractor {spec!r}: use auto, world, inception[:WEIGHTS], or a directory "
                       "holding a CLIP/DINOv2 model saved with save_pretrained")
    extractor = HFVisionFeatures(path)
    return extractor, extractor.name, {}


# ---------------------------------------------------------------------------------------------------------------
# Reference images
# ---------------------------------------------------------------------------------------------------------------
def load_image_dir(directory: str | Path, limit: int | None = None) -> torch.Tensor:
    """All images of a directory (sorted by name, at most `limit`) as float [N, 3, H, W] in [0, 1], RGB.
    Rejects a missing or empty directory, unreadable files, and images of different sizes."""
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    if not directory.is_dir():
        raise FIDError(f"FID reference directory {directory} does not exist; pass a directory of images (for the "
                       "world model: `alignprop world render DIR --heldout --n 256`), or --fid-reference base")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FIDError(f"FID reference directory {directory} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                       "put the real images there")
    files = files[:limit] if limit else files
    images, first = [], None
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.load()
        except (OSError, UnidentifiedImageError) as e:
            raise FIDError(f"cannot read reference image {path}: {e}; remove or replace the file") from None
        if first is None:
            first = (path, image.size)
        elif image.size != first[1]:
            raise FIDError(f"reference images differ in size: {first[0].name} is {first[1][0]}x{first[1][1]} but "
                           f"{path.name} is {image.size[0]}x{image.size[1]}; a reference set must have one size "
                           "(resize them all beforehand; the feature extractor then resizes to its input)")
        images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.size[1],
                                                                                          image.size[0], 3))
    if len(images) < 2:
        raise FIDError(f"FID reference directory {directory} holds {len(images)} image; FID needs at least 2")
    return torch.stack(images).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------------------------------------------------------
# The distance
# ---------------------------------------------------------------------------------------------------------------
class FrechetDistance:
    """The Fréchet distance of several image sets to one reference set, whose features are computed once.

        fd = FrechetDistance(extractor)
        fd.add_reference(images)            # any number of batches
        fd.add(images); fd.compute()        # one set; compute() also clears it for the next set
    """

    def __init__(self, feature: nn.Module | int, device="cpu", **kwargs):
        from torchmetrics.image.fid import FrechetInceptionDistance

        # normalize=True: images are floats in [0, 1] (converted to uint8 only for the Inception path)
        self.metric = FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True,
                                               **kwargs).to(device)
        self.device = device

    def add_reference(self, images: torch.Tensor) -> None:
        self.metric.update(images.to(self.device), real=True)

    def add(self, images: torch.Tensor) -> None:
        self.metric.update(images.to(self.device), real=False)

    def compute(self) -> float:
        if int(self.metric.real_features_num_samples) < 2 or int(self.metric.fake_features_num_samples) < 2:
            raise FIDError("FID needs at least 2 images in each set; use more prompts or seeds")
        value = float(self.metric.compute())
        self.metric.reset()  # clears the generated set only (reset_real_features=False)
        return max(value, 0.0)  # tiny negative values are float error around 0
