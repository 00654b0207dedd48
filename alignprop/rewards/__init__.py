"""Rewards: one table, one signature.

Every reward is built by a factory in `REWARDS` and is called as

    reward(images: Tensor[B, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[B]   # higher is better

A mix is written `name:weight,name:weight` (e.g. `aesthetic:1.0,hpsv2:0.5`) and is the weighted sum of its
terms; with `normalize=True` each term is first standardised by its running mean and std.
"""

from __future__ import annotations

from alignprop.errors import UserError

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


class RewardError(UserError, ValueError):
    """Bad reward name, bad input or missing weights; the message names the problem and the fix."""


@dataclass(frozen=True)
class RewardSpec:
    factory: str  # "module:function" returning a RewardFn; imported lazily so heavy deps stay off the path
    differentiable: bool  # can its gradient reach the pixels (AlignProp needs this; DDPO does not)
    weights: str  # the weights it needs, "" for none
    description: str  # one line for `alignprop rewards list`


REWARDS: dict[str, RewardSpec] = {
    "brightness": RewardSpec("alignprop.rewards.simple:brightness", True, "", "mean luma of the image"),
    "saturation": RewardSpec("alignprop.rewards.simple:saturation", True, "", "mean colour saturation"),
    "redness": RewardSpec("alignprop.rewards.simple:target_color", True, "",
                          "closeness of every pixel to pure red"),
    "jpeg_compressibility": RewardSpec("alignprop.rewards.jpeg:jpeg_compressibility", False, "",
                                       "-(JPEG size in kB at quality 95), as in DDPO"),
    "jpeg_incompressibility": RewardSpec("alignprop.rewards.jpeg:jpeg_incompressibility", False, "",
                                         "+(JPEG size in kB at quality 95), as in DDPO"),
    "aesthetic": RewardSpec("alignprop.rewards.aesthetic:aesthetic", True,
                            "clip-vit-large-patch14/ + aesthetic/sac+logos+ava1-l14-linearMSE.{safetensors,pth}",
                            "LAION aesthetic predictor v2: MLP on the CLIP ViT-L/14 image embedding (about 1-10)"),
    "hpsv2": RewardSpec("alignprop.rewards.hps:hpsv2", True,
                        "hpsv2/HPS_v2.1_compressed.pt [+ hpsv2/open_clip_config.json] + clip-vit-h-14/ (tokenizer)",
                        "HPS v2/v2.1: image-text cosine of an open_clip ViT-H-14 (raw, about 0.27; option scale)"),
    "pickscore": RewardSpec("alignprop.rewards.pickscore:pickscore", True,
                            "pickscore/ (CLIPModel) + clip-vit-h-14/ (tokenizer, preprocessor_config.json)",
                            "PickScore v1: logit_scale.exp() * image-text cosine (about 20-22)"),
    "compressibility": RewardSpec("alignprop.rewards.compressibility:compressibility", True,
                                  "compressibility/model.safetensors + config.json (`rewards fit-compressibility`)",
                                  "-(JPEG size in kB) predicted by a small CNN: differentiable jpeg_compressibility"),
    "object_count": RewardSpec("alignprop.rewards.object_count:object_count", True,
                               "object_count/ (OWLv2 or OWL-ViT directory with tokenizer and preprocessor config)",
                               "-|soft count - prompted count|, soft count = summed OWL detector scores"),
    "world_count": RewardSpec("alignprop.world.rewards:world_count", True,
                              "shipped (alignprop/world/assets/count_reward); or REWARD_WEIGHTS_DIR/world_count",
                              "-|predicted count - prompted count|, a learned count regressor (world captions)"),
    "world_color": RewardSpec("alignprop.world.rewards:world_color", True, "",
                              "closeness of the shapes' colour to the prompt's colour (world captions)"),
}


@dataclass
class Reward:
    """A callable reward with its name, differentiability, input checks and optional running normalisation."""

    name: str
    fn: RewardFn
    differentiable: bool
    normalize: bool = False  # standardise by a running mean/std (Welford) before use
    terms: list[tuple["Reward", float]] = field(default_factory=list)  # a mix's (term, weight) pairs; [] otherwise
    count: int = field(default=0, init=False)
    mean: float = field(default=0.0, init=False)
    m2: float = field(default=0.0, init=False)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        scores = self.fn(images, prompts)
        if scores.shape != (images.shape[0],):
            raise RewardError(f"reward {self.name} returned shape {tuple(scores.shape)}, expected ({images.shape[0]},)")
        if not self.normalize:
            return scores
        self._update(scores.detach())
        std = math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0
        return (scores - self.mean) / max(std, 1e-6)

    def _update(self, batch: torch.Tensor) -> None:
        for x in batch.double().cpu().tolist():  # Welford's running mean and variance
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)


def check_inputs(images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(f"rewards take images of shape [B, 3, H, W]; got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise RewardError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    lo, hi = images.detach().amin().item(), images.detach().amax().item()
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise RewardError(f"rewards take images in [0, 1]; got values in [{lo:.3f}, {hi:.3f}] "
                          "(decode with images = (x / 2 + 0.5).clamp(0, 1), once)")


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """`"aesthetic:1.0,hpsv2:0.5"` -> [("aesthetic", 1.0), ("hpsv2", 0.5)]; a bare name has weight 1."""
    terms = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        if name not in REWARDS:
            raise RewardError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))} "
                              "(see `alignprop rewards list`)")
        try:
            terms.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise RewardError(f"reward weight {weight!r} for {name} is not a number; write e.g. {name}:0.5") from None
    if not terms:
        raise RewardError("empty reward spec; name a reward, e.g. --set reward=brightness")
    return terms


def _check_options(name: str, factory, options: dict) -> None:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = sorted(set(params) - {"device", "weights_dir"})
    for key in options:
        if key not in accepted:
            raise RewardError(f"reward {name} has no option {key!r}; its options: {', '.join(accepted) or 'none'}")


def load_reward(spec: str, device: str | torch.device = "cpu", weights_dir: str | None = None,
                normalize: bool = False, options: dict[str, dict] | None = None) -> Reward:
    """Build a reward (or weighted mix) by name from `REWARDS`.

    weights_dir: the directory (or model-cache manifest / `cache://` / `s3://` reference) holding the learned
    rewards' weights in the layout of `REWARDS[name].weights`. options: extra keyword arguments per reward
    name, e.g. `{"hpsv2": {"scale": 100}, "object_count": {"score_threshold": 0.2}}`.
    """
    terms = parse_mix(spec)
    options = options or {}
    unknown = sorted(set(options) - {name for name, _ in terms})
    if unknown:
        raise RewardError(f"reward options given for {unknown[0]!r}, which is not in the reward spec {spec!r}")
    built = []
    for name, weight in terms:
        entry = REWARDS[name]
        module, _, function = entry.factory.partition(":")
        factory = getattr(importlib.import_module(module), function)
        _check_options(name, factory, options.get(name, {}))
        fn = factory(device=device, weights_dir=weights_dir, **options.get(name, {}))
        built.append((Reward(name, fn, entry.differentiable, normalize=normalize), weight))  # each term on its own
    if len(built) == 1 and built[0][1] == 1.0:
        return built[0][0]

    def mix(images, prompts):
        return sum(weight * term(images, prompts) for term, weight in built)

    return Reward(spec, mix, all(term.differentiable for term, _ in built), terms=built)
