"""`hpsv2`: Human Preference Score v2 / v2.1 (arXiv 2306.09341), an open_clip ViT-H-14 fine-tuned on human choices.

The published checkpoints (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`, a dict with a `state_dict` entry)
hold open_clip's key names. `convert_open_clip_state_dict` maps them onto transformers' `CLIPModel`, so the score
runs without open_clip (which needs torchvision). Score = scale * cos(image embedding, text embedding), the
diagonal of `image_features @ text_features.T` in HPSv2's score.py.

Scale: `scale=1.0` (the default) is the raw cosine HPSv2's score.py prints (about 0.27-0.29 for SD 1.x-era
images); the HPS v2 benchmark table reports it x100 (27-29), and "2.8"-style figures are x10. Pass
`options={"hpsv2": {"scale": 100}}` to `load_reward` for benchmark units.

Weights (under weights_dir):
    hpsv2/HPS_v2.1_compressed.pt        (or HPS_v2_compressed.pt, or model.safetensors with the same open_clip keys)
    hpsv2/open_clip_config.json         optional, open_clip's model config format; default ViT-H-14
    clip-vit-h-14/                      tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (same BPE as open_clip)
"""

from __future__ import annotations

import json
import re

import torch

from alignprop.rewards import clip, weights

CHECKPOINTS = ("hpsv2/HPS_v2.1_compressed.pt", "hpsv2/HPS_v2_compressed.pt", "hpsv2/model.safetensors")
# open_clip's src/open_clip/model_configs/ViT-H-14.json (text layers as in the laion2B-s32B-b79K weights).
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# open_clip residual block -> transformers CLIPEncoderLayer (the fused in_proj is split separately).
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_DIRECT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")  # in_proj_weight
_IGNORED = {"attn_mask"}  # a buffer some open_clip versions saved; transformers builds its own causal mask


def open_clip_keys(config: dict) -> list[str]:
    """The state dict keys of an open_clip ViT CLIP with this config (open_clip's model.py / transformer.py)."""
    def tower(prefix: str, layers: int) -> list[str]:
        block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                 "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"]
        return [f"{prefix}transformer.resblocks.{i}.{name}" for i in range(layers) for name in block]

    return ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
            "visual.ln_pre.bias", *tower("visual.", config["vision_cfg"]["layers"]), "visual.ln_post.weight",
            "visual.ln_post.bias", "visual.proj", "token_embedding.weight", "positional_embedding",
            *tower("", config["text_cfg"]["layers"]), "ln_final.weight", "ln_final.bias", "text_projection",
            "logit_scale"]


def convert_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP (ViT towers, `visual.*` + text at top level) -> transformers CLIPModel keys."""
    out = {}
    for key, value in state.items():
        if key in _DIRECT:
            out[_DIRECT[key]] = value
        elif key in _TRANSPOSED:  # open_clip multiplies x @ proj; nn.Linear computes x @ weight.T
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _RESBLOCK.match(key):
            visual, layer, module, kind = match.groups()
            prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{layer}."
            if module == "attn.in_proj":  # fused [q; k; v] rows of nn.MultiheadAttention
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            elif module in _BLOCK:
                out[f"{prefix}{_BLOCK[module]}.{kind}"] = value
            else:
                raise weights.WeightsError(f"open_clip key {key!r} has no transformers CLIP counterpart "
                                           "(layer scale, attention pooling and custom text towers are not supported)")
        elif key not in _IGNORED:
            raise weights.WeightsError(f"open_clip key {key!r} has no transformers CLIP counterpart; "
                                       "is this an open_clip ViT CLIP checkpoint?")
    return out


def clip_config_from_open_clip(config: dict, eos_token_id: int = 2):
    """A transformers CLIPConfig for an open_clip model config (open_clip's model_configs/*.json format).

    open_clip pools the text at the argmax token id (the end-of-text token has the highest id); transformers'
    CLIPTextTransformer does the same when `eos_token_id == 2` (its legacy branch), so that is the default here.
    """
    from transformers import CLIPConfig

    vision, text = config["vision_cfg"], config["text_cfg"]
    vision_width = vision["width"]
    return CLIPConfig(
        projection_dim=config["embed_dim"],
        vision_config=dict(
            hidden_size=vision_width, intermediate_size=int(vision_width * vision.get("mlp_ratio", 4.0)),
            num_hidden_layers=vision["layers"], num_attention_heads=vision_width // vision.get("head_width", 64),
            image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act="gelu",
            layer_norm_eps=1e-5, projection_dim=config["embed_dim"],
        ),
        text_config=dict(
            vocab_size=text["vocab_size"], hidden_size=text["width"],
            intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)), num_hidden_layers=text["layers"],
            num_attention_heads=text["heads"], max_position_embeddings=text["context_length"], hidden_act="gelu",
            layer_norm_eps=1e-5, projection_dim=config["embed_dim"], eos_token_id=eos_token_id,
            # CLIP's BPE vocabulary ends with <start>, <end>; open_clip pads with 0
            bos_token_id=text["vocab_size"] - 2, pad_token_id=0,
        ),
    )


def load_open_clip_as_transformers(path, config: dict):
    """Read an open_clip checkpoint (optionally wrapped in {"state_dict": ...}) into a transformers CLIPModel,
    with strict key checking."""
    from transformers import CLIPModel

    state = weights.load_state_dict(path)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DistributedDataParallel-saved checkpoints
    state = {k: v for k, v in state.items() if k not in _IGNORED}
    weights.check_keys(state, open_clip_keys(config), path, "open_clip ViT CLIP (HPS v2)")
    converted = convert_open_clip_state_dict(state)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten below; random init of ViT-H would take a while
        model = CLIPModel(clip_config_from_open_clip(config))
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as e:  # right names, wrong shapes: the config does not describe this checkpoint
        raise weights.WeightsError(f"{path} does not fit the open_clip config {config}: {e}") from e
    return model.requires_grad_(False).eval()


def hpsv2(device="cpu", weights_dir=None, scale: float = 1.0):
    checkpoint = weights.find(weights_dir, "hpsv2", *CHECKPOINTS)
    config_path = checkpoint.parent / "open_clip_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else VIT_H_14
    model = load_open_clip_as_transformers(checkpoint, config).to(device)
    tokenizer_dir = weights.find(weights_dir, "hpsv2", "clip-vit-h-14")
    tokenizer = clip.load_tokenizer(tokenizer_dir, "hpsv2")
    # open_clip's eval transform: Resize(224, bicubic), CenterCrop(224), OpenAI CLIP mean/std
    preprocess = clip.ClipPreprocess(config["vision_cfg"]["image_size"], (config["vision_cfg"]["image_size"],) * 2)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = clip.image_embeds(model, preprocess(images))
        # open_clip's tokenizer pads to the full context and its text tower uses only the causal mask
        text = clip.text_embeds(model, tokenizer, prompts, images.device, pad_to_max=True)
        return scale * (image * text).sum(-1)

    return reward
