"""`alignprop evaluate`: should this adapter ship? Held-out rewards, FID drift, and a side-by-side report.

For the base model and every named adapter, with the same held-out prompts, the same seeds and the same initial
noise (image i of seed s starts from a latent drawn from a generator seeded by (s, i), whatever the model):
  1. generate one image per (prompt, seed) with DDIM + classifier-free guidance;
  2. score every image with every configured reward: mean, std and a 95% confidence interval of the mean
     (Student t over images);
  3. FID against a reference set (a directory of real images, or the base model's own samples drawn with other
     seeds: a drift measure), with the feature extractor's name recorded next to the number;
  4. on the world model, the exact ground-truth metrics (count accuracy, colour accuracy, count error).
Writes `metrics.json` (read by `alignprop register`) and a self-contained `report.html`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignprop import models, sampling
from alignprop.config import ConfigError, update
from alignprop.errors import UserError
from alignprop.runtime import ADAPTER_FILE, DTYPES

logger = logging.getLogger(__name__)

REFERENCE_SEED_OFFSET = 1_000_000  # "base" reference samples use seeds s + offset: never the evaluated noise
EVAL_NOISE_SEED = 1234  # seeds the eta > 0 noise of the sampler (the same for every model)


class AdapterError(UserError):
    """An adapter is missing, unreadable, or does not fit the base model's UNet."""


@dataclass
class EvalConfig:
    # --- what to evaluate ----------------------------------------------------------------------
    pretrained_model: str = "world"  # base model: diffusers directory, hub id, cache manifest, or "world"
    revision: str | None = None  # hub revision (hub ids only)
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter directory, e.g. {"alignprop": "out/a"}
    prompts: str = "world_heldout"  # held-out prompts: built-in set name, or a .txt/.jsonl/.csv file
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # one image per (prompt, seed), same noise per model
    rewards: list[str] = field(default_factory=lambda: ["world_count"])  # reward names or mixes to score with
    reward_weights_dir: str | None = None  # weights of learned rewards (as in training)
    # --- sampling ------------------------------------------------------------------------------
    num_inference_steps: int = 20  # DDIM steps per image
    guidance_scale: float = 5.0  # classifier-free guidance weight
    eta: float = 0.0  # DDIM eta; 0 = deterministic given the initial noise
    batch_size: int = 16  # images per sampler call
    mixed_precision: str = "no"  # "no", "fp16" or "bf16": dtype of the model weights
    device: str | None = None  # torch device; None = cuda when available, else cpu
    # --- FID -----------------------------------------------------------------------------------
    fid_reference: str | None = None  # directory of real images, "base" (base samples, other seeds), None = no FID
    fid_extractor: str = "auto"  # auto, world, inception[:WEIGHTS], or a CLIP/DINOv2 model directory
    fid_max_reference: int = 0  # use at most this many reference images (0 = all)
    # --- outputs -------------------------------------------------------------------------------
    world_metrics: bool | None = None  # ground-truth count/colour metrics; None = on when the base is the world model
    training_runs: dict[str, str] = field(default_factory=dict)  # name -> training output dir (reward curves)
    output_dir: str = "outputs/eval"  # metrics.json and report.html go here
    report_max_prompts: int = 32  # image grids in report.html (the first N prompts)

    def validate(self) -> "EvalConfig":
        def bad(name, why, fix):
            raise ConfigError(f"invalid {name}={getattr(self, name)!r}: {why}; {fix}")

        if not self.seeds:
            bad("seeds", "no seeds", "give at least one, e.g. --seeds 0,1,2,3")
        if len(set(self.seeds)) != len(self.seeds):
            bad("seeds", "repeated seeds give repeated images", "list each seed once")
        if not self.rewards:
            bad("rewards", "no rewards", "name at least one, e.g. --reward world_count")
        if "base" in self.adapters:
            bad("adapters", "'base' names the model without adapter", "give the adapter another name")
        for name in ("num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1", "set a positive integer")
        if self.guidance_scale < 1.0:
            bad("guidance_scale", "must be >= 1 (1 disables guidance)", "e.g. 5.0")
        if not 0.0 <= self.eta <= 1.0:
            bad("eta", "must lie in [0, 1]", "use 0 for deterministic DDIM")
        if self.mixed_precision not in DTYPES:
            bad("mixed_precision", "unknown precision", f"use one of {', '.join(DTYPES)}")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EvalConfig":
        return update(cls(), json.loads(text))


# ---------------------------------------------------------------------------------------------------------------
# Checks that run before any model is loaded
# ---------------------------------------------------------------------------------------------------------------
def check_adapter_dir(name: str, directory: str) -> Path:
    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {path} does not exist; pass the --output directory of a finished "
                           "`alignprop train` run")
    return path


def adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"cannot read adapter {path}: {e}") from None


LORA_SUFFIXES = {".lora.down.weight": "in", ".lora_A.weight": "in", ".lora.up.weight": "out", ".lora_B.weight": "out"}


def check_adapter_fits(name: str, path: Path, unet: torch.nn.Module) -> None:
    """Every LoRA tensor of the adapter must name a layer of this UNet with matching in/out features; an adapter
    trained on another architecture (e.g. SD 2.1's 1024-d cross-attention on SD 1.5) fails here, by name."""
    shapes = adapter_shapes(path)
    layers = dict(unet.named_modules())
    unet_keys = [k for k in shapes if k.startswith("unet.")]
    if not unet_keys:
        raise AdapterError(f"adapter {name!r} ({path}) holds no UNet LoRA weights (keys 'unet.*'); "
                           f"it has e.g. {next(iter(shapes), 'nothing')!r}")
    for key in unet_keys:
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue  # e.g. alpha scalars
        module_name = key[len("unet."):-len(suffix)]
        layer = layers.get(module_name)
        if layer is None:
            raise AdapterError(f"adapter {name!r} does not fit the base model: its layer {module_name!r} does not "
                               "exist in this UNet; was it trained on a different base model?")
        layer = getattr(layer, "base_layer", layer)
        side = LORA_SUFFIXES[suffix]  # Linear: in/out_features; Conv2d: in/out_channels
        expected = getattr(layer, f"{side}_features", getattr(layer, f"{side}_channels", None))
        got = shapes[key][1] if LORA_SUFFIXES[suffix] == "in" else shapes[key][0]
        if got != expected:
            raise AdapterError(f"adapter {name!r} does not fit the base model: {module_name} has "
                               f"{LORA_SUFFIXES[suffix]}_features={expected} but the adapter's {key} has shape "
                               f"{list(shapes[key])}; was it trained on a different base model?")


def is_world_model(source: str) -> bool:
    if source == "world":
        return True
    manifest = Path(source) / "MANIFEST.json"
    try:
        return "world train-model" in json.loads(manifest.read_text()).get("command", "")
    except (OSError, ValueError):
        return False


def all_world_captions(prompts: list[str]) -> bool:
    from alignprop.world.prompts import CaptionError, parse_caption

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except CaptionError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Generation with fixed noise
# ---------------------------------------------------------------------------------------------------------------
def generate(parts: models.DiffusionParts, prompts: list[str], seeds: list[int], config: EvalConfig, device,
             desc: str = "sampling"):
    """Yield (prompts, float images [b, 3, H, W] in [0, 1]) over all (seed, prompt) pairs, seed-major. Image
    (seed s, prompt i) always starts from the latent drawn by a generator seeded from (s, i)."""
    items = [(s, i) for s in seeds for i in range(len(prompts))]
    negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], device)
    dtype = DTYPES[config.mixed_precision]
    for start in tqdm(range(0, len(items), config.batch_size), desc=desc, leave=False):
        batch = items[start:start + config.batch_size]
        batch_prompts = [prompts[i] for _, i in batch]
        embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, batch_prompts, device)
        latents = torch.cat([sampling.initial_latents(1, parts.unet.config, parts.scheduler,
                                                      sampling.step_generator(s, i), device, dtype)
                             for s, i in batch])
        noise = sampling.step_generator(EVAL_NOISE_SEED, start)  # eta > 0 noise: a function of the batch position
        half_on_cuda = dtype != torch.float32 and torch.device(device).type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=half_on_cuda):
            latents = sampling.denoise(parts.unet, parts.scheduler, latents, embeds, negative,
                                       config.num_inference_steps, config.guidance_scale, eta=config.eta,
                                       generator=noise)
            images = sampling.decode(parts.vae, latents.to(parts.vae.dtype)).float()
        yield batch_prompts, images


def fixed_noise_rewards(parts: models.DiffusionParts, adapter: str | Path | None, reward, prompts: list[str],
                        seeds: list[int], config: EvalConfig, device="cpu") -> torch.Tensor:
    """Per-image rewards over `prompts` x `seeds` (seed-major) with `adapter` applied (None: the base model), from
    the evaluation's fixed initial and step noise, so two adapters' rewards pair image by image."""
    with AdapterLoaded(parts, "scored", None if adapter is None else str(adapter)), torch.no_grad():
        return torch.cat([reward(images, batch).float().cpu()
                          for batch, images in generate(parts, prompts, seeds, config, device)])


class AdapterLoaded:
    """Context manager: the base UNet with one LoRA adapter applied (diffusers' loader), removed again on exit."""

    def __init__(self, parts: models.DiffusionParts, name: str, directory: str | None):
        self.parts, self.name, self.directory = parts, name, directory
        self.loaded, self.gate = False, None

    def __enter__(self):
        if self.directory is None:
            return self
        path = check_adapter_dir(self.name, self.directory)
        check_adapter_fits(self.name, path, self.parts.unet)
        min_timestep = models.adapter_min_timestep(self.directory)  # read before loading: a bad config leaves no LoRA
        try:
            self.parts.unet.load_lora_adapter(str(path), prefix="unet", adapter_name=self.name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise AdapterError(f"adapter {self.name!r} ({self.directory}) could not be loaded into the base model: "
                               f"{str(e).splitlines()[0]}") from None
        self.loaded = True
        self.gate = models.gate_lora(self.parts.unet, min_timestep)  # trained with a gate: the same steps
        return self

    def __exit__(self, *exc):
        if self.loaded:
            if self.gate is not None:
                self.gate.remove()
            self.parts.unet.unload_lora()
        return False


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def summarize(values) -> dict:
    """Mean, sample std, and the 95% confidence interval of the mean (Student t with n - 1 dof)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------
def evaluate(config: EvalConfig) -> dict:
    """Evaluate the base model and every adapter; write metrics.json and report.html; return the metrics."""
    from alignprop import fid as fid_lib
    from alignprop import report
    from alignprop.prompts import load_prompts
    from alignprop.rewards import load_reward, parse_mix

    config.validate()
    started = time.perf_counter()
    # cheap checks first: bad input fails before any model is loaded
    for reward in config.rewards:
        parse_mix(reward)
    adapter_files = {name: check_adapter_dir(name, d) for name, d in config.adapters.items()}
    for path in adapter_files.values():
        adapter_shapes(path)
    for name, run_dir in config.training_runs.items():
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            raise UserError(f"training run {name!r}: {Path(run_dir) / 'metrics.jsonl'} does not exist; pass the "
                            "--output directory of `alignprop train`")
    load_prompts(config.prompts)  # zero or unreadable prompts fail here (again below, truncated by the tokenizer)
    reference = None
    if config.fid_reference not in (None, "base"):
        reference = fid_lib.load_image_dir(config.fid_reference, config.fid_max_reference or None)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts = models.load_parts(config.pretrained_model, config.revision, device=device,
                              dtype=DTYPES[config.mixed_precision])
    prompts = load_prompts(config.prompts, tokenizer=parts.tokenizer)  # raises on zero prompts
    for name, path in adapter_files.items():  # before any image is generated
        check_adapter_fits(name, path, parts.unet)
    world = config.world_metrics
    if world is None:
        world = is_world_model(config.pretrained_model) and all_world_captions(prompts)
    elif world and not all_world_captions(prompts):
        raise ConfigError("world_metrics needs world captions ('two red circles'); use --prompts world_heldout")
    rewards = {spec: load_reward(spec, device=device, weights_dir=config.reward_weights_dir)
               for spec in config.rewards}

    fd, extractor_name = None, None
    if config.fid_reference is not None:
        feature, extractor_name, kwargs = fid_lib.build_extractor(
            config.fid_extractor, default="world" if is_world_model(config.pretrained_model) else None)
        fd = fid_lib.FrechetDistance(feature, device=device, **kwargs)
        if reference is None:  # the base model's own samples, drawn from noise no evaluated image uses
            reference_seeds = [s + REFERENCE_SEED_OFFSET for s in config.seeds]
            for _, images in generate(parts, prompts, reference_seeds, config, device, desc="reference (base)"):
                fd.add_reference(images)
        else:
            for start in range(0, len(reference), config.batch_size):
                fd.add_reference(reference[start:start + config.batch_size])

    names = {"base": None, **config.adapters}
    results, grids = {}, {}
    for name, directory in names.items():
        logger.info("evaluating %s", name)
        scores = {spec: [] for spec in rewards}
        batches, batch_prompts = [], []
        with AdapterLoaded(parts, name, directory):
            for batch_prompts_, images in generate(parts, prompts, config.seeds, config, device, desc=name):
                with torch.no_grad():
                    for spec, reward in rewards.items():
                        scores[spec].extend(reward(images, batch_prompts_).float().cpu().tolist())
                if fd is not None:
                    fd.add(images)
                batches.append((images * 255).round().to(torch.uint8).cpu())  # kept for the report grids
                batch_prompts.extend(batch_prompts_)
        images_u8 = torch.cat(batches)
        entry = {"adapter": directory, "rewards": {spec: summarize(v) for spec, v in scores.items()}}
        if fd is not None:
            entry["fid"] = fd.compute()
            entry["fid_extractor"] = extractor_name
        if world:
            entry["world"] = _world_metrics(images_u8, batch_prompts)
        results[name] = entry
        grids[name] = images_u8
    if fd is not None:
        for entry in results.values():
            entry["fid_drift"] = entry["fid"] - results["base"]["fid"]

    metrics = {
        "models": results,
        "prompts": prompts,
        "seeds": list(config.seeds),
        "images_per_model": len(prompts) * len(config.seeds),
        "fid_reference": config.fid_reference,
        "fid_extractor": extractor_name,
        "base_model": config.pretrained_model,
        "seconds": time.perf_counter() - started,
        "config": dataclasses.asdict(config),
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    curves = {name: report.read_curve(Path(d) / "metrics.jsonl") for name, d in config.training_runs.items()}
    report.write_report(out / "report.html", metrics, grids, curves, config.report_max_prompts)
    logger.info("evaluation written to %s", out)
    return metrics


def _world_metrics(images_u8: torch.Tensor, prompts: list[str]) -> dict:
    """Ground-truth count/colour metrics (alignprop.world.metrics), overall and per prompt."""
    from alignprop.world.metrics import world_metrics

    summary = world_metrics(images_u8.float() / 255, prompts)
    summary.pop("counts", None)
    return summary
