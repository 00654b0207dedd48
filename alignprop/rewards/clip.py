"""Differentiable CLIP preprocessing and the CLIP loading shared by the aesthetic, HPS v2 and PickScore rewards.

`ClipPreprocess` is transformers' `CLIPImageProcessor` written in torch, so gradients reach the pixels:
resize the shortest edge to `size` (bicubic), center-crop to `crop`, normalise by the CLIP mean/std. Torch's
antialiased bicubic uses PIL's kernel (a = -0.5), so on a natural 512x384 image it matches the reference
processor to within 2/255 per pixel ([0, 1] units; the reference rounds to uint8 after resizing, this does not):
see tests/test_rewards_clip.py::test_clip_preprocess_matches_the_reference_processor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alignprop.rewards.weights import WeightsError, from_pretrained

# OpenAI CLIP's normalisation (also transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_TOLERANCE = 2 / 255  # max |ours - reference| per pixel, [0, 1] units, on a natural image (mean < 0.5/255)


def _side(value, key: str) -> int:
    """preprocessor_config.json writes sizes as an int (old files) or a dict."""
    return int(value[key] if isinstance(value, dict) else value)


@dataclass(frozen=True)
class ClipPreprocess:
    size: int = 224  # the shortest edge is resized to this
    crop: tuple[int, int] = (224, 224)  # (height, width) of the center crop
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_dir(cls, directory: Path | None, image_size: int) -> "ClipPreprocess":
        """Read `preprocessor_config.json` when the directory has one; else the CLIP defaults at image_size."""
        path = directory / "preprocessor_config.json" if directory else None
        if path is None or not path.is_file():
            return cls(image_size, (image_size, image_size))
        config = json.loads(path.read_text())
        size = _side(config.get("size", image_size), "shortest_edge")
        crop = config.get("crop_size", size)
        return cls(size, (_side(crop, "height"), _side(crop, "width")),
                   tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD)))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> CLIP pixel_values [B, 3, crop_h, crop_w]."""
        h, w = images.shape[-2:]
        # transformers' get_resize_output_image_size(default_to_square=False): the long side is truncated
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.size * long / short)
        new_h, new_w = (self.size, new_long) if h <= w else (new_long, self.size)
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0, 1)  # the reference stores the resized image as uint8, clipping bicubic overshoot
        crop_h, crop_w = self.crop
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2  # transformers' center_crop
        images = images[..., top:top + crop_h, left:left + crop_w]
        return normalize(images, self.mean, self.std)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    return (images - images.new_tensor(mean).view(1, 3, 1, 1)) / images.new_tensor(std).view(1, 3, 1, 1)


def load_tokenizer(directory: Path, reward: str):
    from transformers import AutoTokenizer

    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise WeightsError(f"reward {reward}: no tokenizer (tokenizer.json or vocab.json + merges.txt) in {directory}")
    return AutoTokenizer.from_pretrained(directory)


def load_clip(directory: Path, device, what: str):
    """A frozen transformers CLIPModel from a local directory, every weight present."""
    from transformers import CLIPModel

    return from_pretrained(CLIPModel, directory, what).to(device)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings."""
    embeds = _features(model.get_image_features(pixel_values=pixel_values.to(model.dtype)))
    return F.normalize(embeds.float(), dim=-1)


def text_embeds(model, tokenizer, prompts: list[str], device, pad_to_max: bool = False) -> torch.Tensor:
    """L2-normalised projected text embeddings (prompts longer than the context are truncated)."""
    max_length = model.config.text_config.max_position_embeddings
    tokens = tokenizer(prompts, padding="max_length" if pad_to_max else True, truncation=True,
                       max_length=max_length, return_tensors="pt").to(device)
    kwargs = {} if pad_to_max else {"attention_mask": tokens["attention_mask"]}
    with torch.no_grad():  # the text side carries no gradient: only the images are optimised
        embeds = _features(model.get_text_features(input_ids=tokens["input_ids"], **kwargs))
    return F.normalize(embeds.float(), dim=-1)
