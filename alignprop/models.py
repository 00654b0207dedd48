"""Loading the base diffusion model, attaching LoRA, and building tiny SD-shaped models offline.

Every model, the tiny ones used by tests included, is loaded through diffusers' `from_pretrained`, the same
path production uses for Stable Diffusion 1.5.
"""

from __future__ import annotations

from alignprop.errors import UserError

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SD_SCHEDULER_CONFIG = dict(  # the DDIM settings Stable Diffusion 1.x ships with (its scheduler_config.json)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
WORLD_MODEL_DIR = Path(__file__).parent / "world" / "assets" / "model"


class ModelError(UserError, RuntimeError):
    """A model could not be found or loaded; the message names the source and the fix."""


@dataclass
class DiffusionParts:
    """The pieces of a Stable-Diffusion-family pipeline that training touches."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    source: str  # where it was loaded from (directory, hub id or cache manifest)

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------
# Resolving and loading
# ---------------------------------------------------------------------------------------------
def resolve_model_dir(source: str) -> str:
    """Map a model reference to something `from_pretrained` accepts.

    - "world": the trained tiny world model shipped inside the package;
    - an existing directory: used as is;
    - a model-cache manifest (`*.json`, local or `s3://`) or `cache://` URI: fetched and verified into the
      local cache directory by `alignprop.cache`;
    - anything else is treated as a hub id (production only; `HF_HUB_OFFLINE=1` forbids the network).
    """
    if source == "world":
        if not (WORLD_MODEL_DIR / "model_index.json").is_file():
            raise ModelError(f"the shipped world model is missing at {WORLD_MODEL_DIR}; "
                             "regenerate it with `alignprop world train-model` or reinstall the package")
        return str(WORLD_MODEL_DIR)
    if source.endswith(".json") or source.startswith(("s3://", "cache://")):
        from alignprop import cache

        return str(cache.materialize(source))
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model directory {path} has no model_index.json; point --set pretrained_model= "
                             "at a diffusers pipeline directory (e.g. one written by `alignprop make-tiny-model`)")
        return str(path)
    looks_like_path = source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1]
    if looks_like_path or source.count("/") != 1:
        raise ModelError(f"model directory {source} does not exist; create it with `alignprop make-tiny-model "
                         f"{source}` or pass a diffusers directory, hub id (org/name) or cache manifest")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        logger.info("HF_HUB_OFFLINE=1: %s must already be in the local hub cache", source)
    return source


def load_parts(source: str, revision: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> DiffusionParts:
    """Load UNet, VAE, text encoder, tokenizer and DDIM scheduler; freeze them; move to device/dtype."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    location = resolve_model_dir(source)
    kwargs = dict(revision=revision) if revision else {}
    model_kwargs = dict(kwargs, torch_dtype=dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", **model_kwargs)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **model_kwargs)
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", **model_kwargs)
        scheduler = DDIMScheduler.from_pretrained(location, subfolder="scheduler", **kwargs)
    except OSError as e:
        raise ModelError(f"could not load the diffusion model from {source!r}: {e}") from e
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    return DiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, source)


def add_lora(unet: torch.nn.Module, rank: int = 4, alpha: float = 4.0,
             target_modules: list[str] | tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
             init_weights: bool = True) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA adapter to the (frozen) UNet; return its parameters, upcast to fp32."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init_weights,
                                target_modules=list(target_modules)))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ModelError(f"LoRA target modules {list(target_modules)} matched no layer of the UNet")
    for p in params:  # LoRA trains in fp32 even when the frozen base is fp16/bf16
        p.data = p.data.float()
    return params


class LoraTimestepGate:
    """Apply the UNet's LoRA only on denoising steps whose timestep is >= `min_timestep`, the high-noise steps that
    lay out the image; steps below it run the base model. (The world model's object count is settled in the first
    third of its DDIM chain: benchmarks/count_timeline.py.)

    Forward hooks on the UNet set the scale of every LoRA layer to 0 for a call below the gate and restore it after,
    so our sampler, diffusers' pipelines and the recomputation of a checkpointed step all see the same gate, and
    the LoRA's parameters are left untouched (no requires_grad toggling). A fused LoRA (`fuse_lora`) cannot be
    gated: keep it unfused. `remove()` takes the hooks off again."""

    def __init__(self, unet: torch.nn.Module, min_timestep: int):
        from peft.tuners.lora import LoraLayer

        self.min_timestep = min_timestep
        self.layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
        if not self.layers:
            raise ModelError("adapter_min_timestep is set but the UNet has no LoRA layer to gate")
        self._saved: list[list[dict]] = []
        self._handles = [unet.register_forward_pre_hook(self._before, with_kwargs=True),
                         unet.register_forward_hook(self._after, always_call=True)]

    def _before(self, module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        below = torch.as_tensor(timestep) < self.min_timestep
        if below.any() and not below.all():
            raise ValueError(f"one UNet call mixes timesteps on both sides of adapter_min_timestep="
                             f"{self.min_timestep}; call it once per timestep")
        self._saved.append([dict(layer.scaling) for layer in self.layers] if below.all() else [])
        for layer, scaling in zip(self.layers, self._saved[-1]):
            layer.scaling.update(dict.fromkeys(scaling, 0.0))

    def _after(self, module, args, output):
        for layer, scaling in zip(self.layers, self._saved.pop() if self._saved else []):
            layer.scaling.update(scaling)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def gate_lora(unet: torch.nn.Module, min_timestep: int) -> LoraTimestepGate | None:
    """`LoraTimestepGate(unet, min_timestep)`, or None when `min_timestep` is 0 (the LoRA acts on every step)."""
    return LoraTimestepGate(unet, min_timestep) if min_timestep > 0 else None


def adapter_min_timestep(directory: str | Path) -> int:
    """The gate an adapter was trained with: `adapter_min_timestep` of the training config.json beside its weights
    (0, every step, when there is none or it predates the setting)."""
    import json

    config = Path(directory) / "config.json"
    if not config.is_file():
        return 0
    try:
        return int(json.loads(config.read_text()).get("adapter_min_timestep", 0) or 0)
    except (ValueError, AttributeError) as e:
        raise ModelError(f"cannot read the adapter's training config {config}: {e}; restore it from the run's "
                         "output directory") from None


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in diffusers' key format (what `load_lora_weights` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet: torch.nn.Module, directory: str | Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` atomically: a reader sees the old file or the whole new one."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    tmp = directory / ".lora.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
    final = directory / "pytorch_lora_weights.safetensors"
    os.replace(tmp / "pytorch_lora_weights.safetensors", final)
    tmp.rmdir()
    return final


# ---------------------------------------------------------------------------------------------
# Tiny models, built offline
# ---------------------------------------------------------------------------------------------
def build_word_tokenizer(words: list[str], model_max_length: int = 77):
    """A CLIP BPE tokenizer whose vocabulary is exactly `words` (each one token) plus single characters.

    Real CLIP vocabularies are learned; this one is built from a word list so it needs no download while
    keeping CLIP's format (vocab.json + merges.txt, `</w>` end-of-word suffix, start/end tokens).
    """
    from transformers import CLIPTokenizer

    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in sorted(set(words)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right until the word is a single symbol
            merged = pieces[0] + pieces[1]
            rule = (pieces[0], pieces[1])
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


TINY_WORDS = ("a photo of an the cat dog horse cow pig sheep rabbit bird fish tiger lion monkey "
              "one two three four red green blue yellow circle circles square squares triangle triangles").split()


def make_tiny_model(directory: str | Path, seed: int = 0, sample_size: int = 16, words=TINY_WORDS,
                    block_out_channels=(32, 64), cross_attention_dim: int = 32) -> Path:
    """Write a seeded, random-init, SD-shaped pipeline (UNet, VAE, CLIP text encoder, tokenizer, DDIM) in
    diffusers format. `sample_size` is the latent side; images are 2x larger (the VAE downsamples once)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(list(words))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(block_out_channels), attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=sample_size * 2, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=cross_attention_dim,
    ))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
