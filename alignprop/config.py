"""Stage configs: one dataclass per stage, a one-line comment per field, JSON round-trip, presets.

A config is resolved in three layers: a preset (`tiny`, `sd15`), then an optional JSON file (`--config`),
then `--set key=value` overrides. `validate()` rejects bad values with a message that names the field and
the fix, before any model is loaded.
"""

from __future__ import annotations

from alignprop.errors import UserError

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

TRUNCATION_MODES = ("full", "fixed", "uniform", "gaussian")
MIXED_PRECISION = ("no", "fp16", "bf16")
METHODS = ("alignprop", "ddpo")
# diffusers.optimization.get_scheduler's names, less piecewise_constant (it needs its own rule string)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the field and how to fix it."""


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    method: str = "alignprop"  # "alignprop" (reward backprop) or "ddpo" (policy-gradient baseline)
    pretrained_model: str = "world"  # diffusers directory, hub id, cache manifest/URI, or "world" (shipped tiny model)
    revision: str | None = None  # hub revision (only for hub ids)
    prompts: str = "world_counts"  # built-in prompt set name, or a .txt/.jsonl/.csv file (local or s3://)
    reward: str = "world_count"  # reward name or weighted mix "aesthetic:1.0,hpsv2:0.5"
    reward_weights_dir: str | None = None  # directory holding the reward models' weights (learned rewards only)
    output_dir: str = "outputs/alignprop"  # run directory: adapter, config.json, metrics.jsonl, checkpoints/
    seed: int = 0  # seeds noise, prompt order and truncation draws; same seed => same run
    # --- sampling (DDIM, classifier-free guidance) ---------------------------------------------
    num_inference_steps: int = 20  # DDIM steps per sample
    guidance_scale: float = 5.0  # classifier-free guidance weight (1.0 disables the unconditional branch)
    eta: float = 0.0  # DDIM eta: 0 = deterministic, 1 = DDPM-like noise
    resolution: int | None = None  # image side in pixels; None = the model's native size
    # --- truncated backprop (which denoising steps keep their graph) --------------------------
    truncation: str = "fixed"  # "full" chain, "fixed" last K, or K drawn per batch: "uniform" / "gaussian"
    truncation_k: int = 1  # K for "fixed": the last K steps keep their graph (DRaFT-K)
    truncation_min: int = 1  # "uniform": K ~ U{min..max}, inclusive
    truncation_max: int = 1  # "uniform": upper bound, inclusive
    truncation_mean: float = 1.0  # "gaussian": K ~ round(N(mean, std)), clipped to [1, steps]
    truncation_std: float = 0.0  # "gaussian": standard deviation, in steps
    gradient_checkpointing: bool = True  # checkpoint every UNet call (non-reentrant): memory flat in K
    # --- LoRA ----------------------------------------------------------------------------------
    lora_rank: int = 4  # LoRA rank r
    lora_alpha: float = 4.0  # LoRA alpha; the update is scaled by alpha / r
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    adapter_min_timestep: int = 0  # LoRA acts only on steps with timestep >= this (0: all); lower ones run the base
    # --- optimisation --------------------------------------------------------------------------
    learning_rate: float = 1e-3  # AdamW learning rate
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_weight_decay: float = 1e-4  # AdamW decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW epsilon
    lr_scheduler: str = "constant"  # learning-rate schedule over num_steps: one of LR_SCHEDULERS (diffusers' own)
    lr_warmup_steps: int = 0  # steps of linear warm-up from 0 (not with "constant": use "constant_with_warmup")
    max_grad_norm: float = 1.0  # clip the LoRA gradient to this global L2 norm (0 disables)
    train_batch_size: int = 2  # images per process per micro-step (per device!)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    num_steps: int = 20  # optimizer steps in the run
    reward_loss_coefficient: float = 1.0  # loss = -reward_loss_coefficient * reward
    mixed_precision: str = "no"  # "no", "fp16" or "bf16": dtype of the frozen weights; LoRA stays fp32
    # --- validation: fixed samples scored during training ----------------------------------------
    validation_every: int = 0  # score the adapter on the validation samples every N steps, at 0 and at the end (0: no)
    validation_images: int = 32  # validation samples: fixed prompts and initial noise, the full DDIM chain at eta 0
    validation_prompts: str | None = None  # prompt set for validation, as `prompts`; None = the training prompts
    keep_best: bool = False  # finish with the adapter of the best validation reward (step 0: the base), not the last
    # --- DDPO baseline (method="ddpo"; defaults from Black et al. 2023, arXiv 2305.13301) ------
    ddpo_num_inner_epochs: int = 1  # PPO epochs over each batch of samples
    ddpo_clip_range: float = 1e-4  # PPO ratio clip
    ddpo_adv_clip_max: float = 5.0  # clip normalised advantages to [-max, max]
    ddpo_timestep_fraction: float = 1.0  # fraction of denoising steps trained per sample
    ddpo_samples_per_step: int = 4  # images sampled per process per optimizer step (per device!)
    ddpo_stat_tracking_buffer: int = 16  # per-prompt reward history for advantage normalisation
    ddpo_stat_tracking_min_count: int = 16  # below this many, normalise with the batch statistics
    # --- bookkeeping ---------------------------------------------------------------------------
    checkpoint_every: int = 0  # save a resumable checkpoint every N optimizer steps (0 = never)
    checkpoints_total_limit: int = 2  # keep at most this many checkpoints
    resume: bool = False  # resume from the newest complete checkpoint in output_dir/checkpoints
    overwrite: bool = False  # allow replacing a finished adapter already in output_dir
    tracking: bool = True  # log params, metrics, sample grids and the adapter to MLflow
    tracking_uri: str | None = None  # MLflow server; None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment_name: str = "alignprop"  # MLflow experiment
    sample_every: int = 0  # log a grid of the batch's images every N optimizer steps (0 = only at the end)

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        def bad(name, why, fix):
            raise ConfigError(f"invalid {name}={getattr(self, name)!r}: {why}; {fix}")

        if self.method not in METHODS:
            bad("method", "unknown training method", f"use one of {', '.join(METHODS)}")
        if self.truncation not in TRUNCATION_MODES:
            bad("truncation", "unknown mode", f"use one of {', '.join(TRUNCATION_MODES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            bad("mixed_precision", "unknown precision", f"use one of {', '.join(MIXED_PRECISION)}")
        for name in ("num_inference_steps", "train_batch_size", "gradient_accumulation_steps", "num_steps",
                     "lora_rank", "ddpo_num_inner_epochs", "ddpo_samples_per_step"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1", "set a positive integer")
        if self.learning_rate <= 0:
            bad("learning_rate", "must be positive", "e.g. --set learning_rate=1e-3")
        if self.lr_scheduler not in LR_SCHEDULERS:
            bad("lr_scheduler", "unknown schedule", f"use one of {', '.join(LR_SCHEDULERS)}")
        if not 0 <= self.lr_warmup_steps < self.num_steps:
            bad("lr_warmup_steps", f"must lie in [0, num_steps={self.num_steps})", "lower it, e.g. to num_steps // 10")
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            bad("lr_warmup_steps", "is ignored by lr_scheduler=constant", "use --set lr_scheduler=constant_with_warmup")
        if self.guidance_scale < 1.0:
            bad("guidance_scale", "must be >= 1 (1 disables guidance)", "e.g. --set guidance_scale=7.5")
        if not 0.0 <= self.eta <= 1.0:
            bad("eta", "must lie in [0, 1]", "use 0 for deterministic DDIM")
        if self.checkpoint_every < 0:
            bad("checkpoint_every", "must be >= 0", "use 0 to disable checkpoints")
        if self.validation_every < 0:
            bad("validation_every", "must be >= 0", "use 0 to disable validation")
        if self.validation_every and self.validation_images < 1:
            bad("validation_images", "must be at least 1", "e.g. --set validation_images=32")
        if self.keep_best and not self.validation_every:
            bad("keep_best", "needs validation to pick the best adapter",
                "set --set validation_every=N (e.g. num_steps // 6), or drop keep_best")
        if self.adapter_min_timestep < 0:
            bad("adapter_min_timestep", "must be >= 0", "use 0 to apply the LoRA on every denoising step")
        if not 0.0 < self.ddpo_timestep_fraction <= 1.0:
            bad("ddpo_timestep_fraction", "must lie in (0, 1]", "e.g. --set ddpo_timestep_fraction=1.0")
        steps = self.num_inference_steps
        if self.truncation == "fixed" and not 1 <= self.truncation_k <= steps:
            bad("truncation_k", f"must lie in [1, num_inference_steps={steps}]",
                "lower it or use --set truncation=full")
        if self.truncation == "uniform" and not 1 <= self.truncation_min <= self.truncation_max <= steps:
            raise ConfigError(
                f"invalid truncation range [{self.truncation_min}, {self.truncation_max}]: need "
                f"1 <= truncation_min <= truncation_max <= num_inference_steps={steps}; fix the bounds")
        if self.truncation == "gaussian" and (self.truncation_std < 0 or not 1 <= self.truncation_mean <= steps):
            raise ConfigError(
                f"invalid gaussian truncation mean={self.truncation_mean}, std={self.truncation_std}: need "
                f"1 <= mean <= num_inference_steps={steps} and std >= 0")
        return self

    # ------------------------------------------------------------------------------------------
    def images_per_step(self, num_processes: int = 1) -> int:
        """Images sampled per optimizer step over `num_processes` processes (DDPO: its samples per step)."""
        per_micro = self.ddpo_samples_per_step if self.method == "ddpo" else self.train_batch_size
        return num_processes * per_micro * self.gradient_accumulation_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return update(cls(), data)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))


def update(config, values: dict):
    """Return a copy of `config` with `values` applied; unknown keys are an error naming the valid ones."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
    return dataclasses.replace(config, **values)


def parse_overrides(config, pairs: list[str]) -> dict:
    """Parse `key=value` strings into typed values using the dataclass field types."""
    hints = typing.get_type_hints(type(config))
    values = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value; e.g. --set learning_rate=1e-3")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(hints))}")
        values[key] = _coerce(key, raw.strip(), hints[key])
    return values


def _coerce(key: str, raw: str, hint):
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if raw.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if typing.get_origin(hint) is list:
            return [s.strip() for s in raw.split(",") if s.strip()]
        return raw
    except ValueError as e:
        raise ConfigError(f"invalid value for {key}: {raw!r} ({e})") from None


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
def tiny() -> TrainConfig:
    """The shipped world model (32x32 images, CPU-friendly): align it to produce the prompted count."""
    return TrainConfig()


def sd15() -> TrainConfig:
    """Stable Diffusion 1.5 with AlignProp's published defaults (Prabhudesai et al. 2023, arXiv 2310.03739,
    and the config of the authors' release): DDIM 50 steps, eta 1.0, guidance 7.5, LoRA rank 4, lr 1e-3,
    weight decay 1e-4, grad clip 1.0, K drawn uniformly per batch (last-K window), fp16, aesthetic reward."""
    return TrainConfig(
        pretrained_model="runwayml/stable-diffusion-v1-5",
        prompts="simple_animals",
        reward="aesthetic",
        output_dir="outputs/alignprop-sd15",
        num_inference_steps=50,
        guidance_scale=7.5,
        eta=1.0,
        truncation="uniform",
        truncation_min=5,
        truncation_max=15,
        lora_rank=4,
        lora_alpha=4.0,
        learning_rate=1e-3,
        train_batch_size=4,
        gradient_accumulation_steps=4,
        num_steps=100,
        reward_loss_coefficient=1.0,
        mixed_precision="fp16",
        ddpo_samples_per_step=8,
        checkpoint_every=10,
    )


PRESETS = {"tiny": tiny, "sd15": sd15}


def load_config(preset: str = "tiny", config_file: str | None = None, overrides: list[str] | None = None,
                cls=TrainConfig):
    """Preset, then JSON file, then `key=value` overrides; validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    config = PRESETS[preset]()
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing JSON file to --config")
        try:
            config = update(config, json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if overrides:
        config = update(config, parse_overrides(config, overrides))
    return config.validate()
