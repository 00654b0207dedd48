"""`object_count`: controllability. The prompt names a number and a noun ("three apples on a table"); an
open-vocabulary detector (OWLv2 or OWL-ViT, from transformers) scores every predicted box for that noun.

    soft count = sum of the detector's sigmoid scores for the noun over its boxes
    reward     = -|soft count - target count|

A real detector gives thousands of boxes (OWLv2 B/16 at 960 px: 3600), and their small background scores would
add up to a count of their own; so by default only boxes scoring above `score_threshold` (0.1, the threshold of
transformers' OWL post-processing) that survive non-maximum suppression at IoU `nms_iou` (0.3, OWL's default) are
summed. The threshold and NMS only choose which boxes count (a mask, no gradient); the scores of the kept boxes
carry the gradient to the pixels. `score_threshold=0, nms_iou=1` gives the plain sum over all boxes.

Preprocessing is torch, so gradients reach the pixels:
- OWLv2: pad to a square at the bottom/right with 0, Gaussian anti-aliasing (sigma = (factor - 1) / 2) and
  linear resize with mirror boundaries (transformers' Owlv2ImageProcessor, after scikit-image's resize), normalise.
  Written as two small matrices per side, it matches the reference processor to float precision.
- OWL-ViT: bicubic resize to the square input size (antialiased, PIL's kernel), normalise.

Weights (under weights_dir):
    object_count/    an Owlv2ForObjectDetection or OwlViTForObjectDetection directory with its tokenizer and
                     preprocessor_config.json (google/owlv2-base-patch16-ensemble, google/owlvit-base-patch32)
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from alignprop.rewards import clip, weights
from alignprop.rewards import RewardError

NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
STOP_WORDS = set("on in at with and or of near next beside under over above below behind by from to into onto "
                 "against around inside outside sitting standing lying that which while".split())
IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
             "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "leaves": "leaf",
             "wolves": "wolf", "loaves": "loaf", "sheep": "sheep", "fish": "fish", "deer": "deer"}


def singular(word: str) -> str:
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if re.search(r"(s|x|z|ch|sh)es$", word):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def parse_count_prompt(prompt: str) -> tuple[int, str]:
    """"a photo of three red apples on a table" -> (3, "red apple"): the first number word or digits, then the
    words up to a preposition or punctuation, the last one made singular."""
    words = re.findall(r"[a-z0-9]+(?:-[a-z]+)*|[^\sa-z0-9]", prompt.lower())
    for i, word in enumerate(words):
        if word in NUMBERS or word.isdigit():
            noun = []
            for w in words[i + 1:]:
                if w in STOP_WORDS or not w[0].isalnum():
                    break
                noun.append(w)
            if noun:
                return (NUMBERS[word] if word in NUMBERS else int(word)), " ".join(noun[:-1] + [singular(noun[-1])])
    raise RewardError(f"object_count cannot read a count and a noun from the prompt {prompt!r}; write prompts "
                      "like 'three apples' or 'a photo of 2 dogs on the grass'")


def query_text(noun: str) -> str:
    """OWL's query template (the OWL-ViT papers' "a photo of a {}")."""
    return f"a photo of {'an' if noun[0] in 'aeiou' else 'a'} {noun}"


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------
def _mirror(index: torch.Tensor, n: int) -> torch.Tensor:
    """scipy.ndimage's 'mirror' boundary (d c b | a b c d | c b a) for any index."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index % period
    return torch.where(index >= n, period - index, index)


@functools.lru_cache(maxsize=16)
def owlv2_resize_matrix(n: int, m: int) -> torch.Tensor:
    """[m, n] matrix M with resized = M @ x along one axis: scipy.ndimage.gaussian_filter (sigma = max(0, (n/m - 1)
    / 2), truncate 4, mode mirror) then scipy.ndimage.zoom (order 1, grid_mode=True, mode mirror), as in
    transformers' Owlv2ImageProcessor.resize."""
    factor = n / m
    sigma = max(0.0, (factor - 1) / 2)
    blur = torch.eye(n, dtype=torch.float64)
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        offsets = torch.arange(-radius, radius + 1)
        kernel = torch.exp(-0.5 * (offsets.double() / sigma) ** 2)
        kernel = kernel / kernel.sum()
        rows = torch.arange(n)[:, None].expand(n, 2 * radius + 1)
        cols = _mirror(rows + offsets, n)
        blur = torch.zeros(n, n, dtype=torch.float64).index_put_(
            (rows.reshape(-1), cols.reshape(-1)), kernel.expand(n, -1).reshape(-1), accumulate=True)
    x = (torch.arange(m, dtype=torch.float64) + 0.5) * factor - 0.5  # output pixel centre in input coordinates
    x0 = torch.floor(x)
    frac = x - x0
    rows = torch.arange(m)
    zoom = torch.zeros(m, n, dtype=torch.float64)
    zoom.index_put_((rows, _mirror(x0.long(), n)), 1 - frac, accumulate=True)
    zoom.index_put_((rows, _mirror(x0.long() + 1, n)), frac, accumulate=True)
    return (zoom @ blur).float()


def owlv2_preprocess(images: torch.Tensor, size: int, mean=clip.CLIP_MEAN, std=clip.CLIP_STD) -> torch.Tensor:
    h, w = images.shape[-2:]
    side = max(h, w)
    images = F.pad(images, (0, side - w, 0, side - h))  # bottom/right, value 0 (before normalisation)
    matrix = owlv2_resize_matrix(side, size).to(images.device, images.dtype)
    images = torch.einsum("oh,bchw,pw->bcop", matrix, images, matrix)
    return clip.normalize(images, mean, std)


def owlvit_preprocess(images: torch.Tensor, size: int, mean=clip.CLIP_MEAN, std=clip.CLIP_STD) -> torch.Tensor:
    images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return clip.normalize(images.clamp(0, 1), mean, std)  # clip the bicubic overshoot, as PIL's uint8 result does


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
def _box_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one (cx, cy, w, h) box with many."""
    def corners(b):
        return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], dim=-1)

    a, b = corners(box), corners(boxes)
    wh = (torch.minimum(a[2:], b[:, 2:]) - torch.maximum(a[:2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter).clamp(min=1e-9)


def count_mask(scores: torch.Tensor, boxes: torch.Tensor, score_threshold: float, nms_iou: float) -> torch.Tensor:
    """[B, N] 0/1 mask of the boxes that count: score above the threshold, then greedy NMS. No gradient."""
    scores, boxes = scores.detach(), boxes.detach()
    mask = scores > score_threshold
    if nms_iou >= 1:
        return mask.to(scores.dtype)
    for b in range(scores.shape[0]):
        candidates = mask[b].nonzero().squeeze(1)
        candidates = candidates[scores[b, candidates].argsort(descending=True)]
        suppressed = torch.zeros_like(mask[b])
        for i in candidates.tolist():
            if suppressed[i]:
                continue
            overlap = _box_iou(boxes[b, i], boxes[b, candidates]) > nms_iou
            suppressed[candidates[overlap]] = True
            suppressed[i] = False
        mask[b] &= ~suppressed
    return mask.to(scores.dtype)


def soft_count(logits: torch.Tensor, boxes: torch.Tensor, score_threshold: float = 0.1,
               nms_iou: float = 0.3) -> torch.Tensor:
    """logits [B, N] for one query per image, boxes [B, N, 4] -> soft count [B]."""
    scores = torch.sigmoid(logits)
    return (scores * count_mask(scores, boxes, score_threshold, nms_iou)).sum(-1)


def _read_preprocessor(directory: Path, image_size: int):
    path = directory / "preprocessor_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    size = config.get("size", image_size)
    size = size["height"] if isinstance(size, dict) else size
    return int(size), tuple(config.get("image_mean", clip.CLIP_MEAN)), tuple(config.get("image_std", clip.CLIP_STD))


def object_count(device="cpu", weights_dir=None, score_threshold: float = 0.1, nms_iou: float = 0.3):
    directory = weights.find(weights_dir, "object_count", "object_count")  # before the slow transformers import
    from transformers import AutoConfig, Owlv2ForObjectDetection, OwlViTForObjectDetection

    model_type = AutoConfig.from_pretrained(directory).model_type if (directory / "config.json").is_file() else None
    classes = {"owlv2": (Owlv2ForObjectDetection, owlv2_preprocess),
               "owlvit": (OwlViTForObjectDetection, owlvit_preprocess)}
    if model_type not in classes:
        raise weights.WeightsError(f"{directory} holds a {model_type!r} model; object_count needs OWLv2 or OWL-ViT "
                                   "(transformers format)")
    cls, preprocess = classes[model_type]
    model = weights.from_pretrained(cls, directory, f"{cls.__name__}").to(device)
    tokenizer = clip.load_tokenizer(directory, "object_count")
    size, mean, std = _read_preprocessor(directory, model.config.vision_config.image_size)
    max_length = model.config.text_config.max_position_embeddings

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        parsed = [parse_count_prompt(p) for p in prompts]  # parse first: a bad prompt fails before any compute
        targets = torch.tensor([n for n, _ in parsed], dtype=torch.float32, device=images.device)
        tokens = tokenizer([query_text(noun) for _, noun in parsed], padding="max_length", truncation=True,
                           max_length=max_length, return_tensors="pt").to(images.device)
        pixel_values = preprocess(images, size, mean, std).to(model.dtype)
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixel_values)
        counts = soft_count(out.logits[..., 0].float(), out.pred_boxes.float(), score_threshold, nms_iou)
        return -(counts - targets).abs()

    return reward
