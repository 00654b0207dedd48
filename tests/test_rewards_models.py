"""Learned rewards (aesthetic, hpsv2, pickscore, object_count) on tiny random-init versions of their real
architectures, saved in the real weights layout and loaded through the real loading code; preprocessing against
the reference transformers processors on a natural-ish, non-square image."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from alignprop.errors import UserError
from alignprop.models import build_word_tokenizer
from alignprop.rewards import load_reward
from alignprop.rewards.clip import CLIP_STD, PREPROCESS_TOLERANCE, ClipPreprocess

WORDS = "a an photo of the cat dog apple apples red three two one on table".split()
PROMPTS = ["a photo of three red apples", "two dogs on the table"]


def natural_image(width=512, height=384, seed=0) -> np.ndarray:
    """A smooth gradient with a disc, a rectangle and mild noise: uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.5 + 0.3 * np.sin(6 * x + 3 * y)], axis=-1)
    image[((x - 0.3) * width / height) ** 2 + (y - 0.5) ** 2 < 0.04] = (0.9, 0.2, 0.1)
    image[(abs(x - 0.7) < 0.1) & (abs(y - 0.3) < 0.15)] = (0.1, 0.3, 0.8)
    image += rng.normal(0, 0.02, image.shape)
    return (image.clip(0, 1) * 255).round().astype(np.uint8)


def as_tensor(arrays) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def batch(width=96, height=64):
    """Two different natural-ish images, as uint8 arrays (for the reference processors) and a [2, 3, H, W] tensor."""
    first = natural_image(width, height, seed=0)
    arrays = [first, np.ascontiguousarray(first[::-1, :, ::-1])]  # upside down, channels reversed
    return arrays, as_tensor(arrays)


def assert_matches_reference(reward, images, scores, expected, factor=0.1):
    """Our scores are the reference's to within `factor` of how much the model moves for other images
    (the same images upside down): a preprocessing or weight mistake moves them by about as much as that."""
    with torch.no_grad():
        other = reward(images.detach().flip(-2), PROMPTS)
    assert torch.isfinite(scores).all()
    assert (scores.detach() - expected).abs().max() <= factor * (other - expected).abs().max()


# ---------------------------------------------------------------------------------------------
# Preprocessing vs the reference processors
# ---------------------------------------------------------------------------------------------
def test_clip_preprocess_matches_the_reference_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    array = natural_image()
    reference = CLIPImageProcessorPil()(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    ours = ClipPreprocess()(as_tensor([array]))
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    pixel_error = (ours - reference).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1)  # back to [0, 1] units
    # the reference rounds its resized image to uint8: about 0.25/255 on average
    assert pixel_error.max() <= PREPROCESS_TOLERANCE and pixel_error.mean() < 0.5 / 255
    shifted = ClipPreprocess()(as_tensor([np.roll(array, 40, axis=1)]))  # a wrong crop would not match
    assert ((shifted - reference).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1)).max() > 10 * PREPROCESS_TOLERANCE


def test_owl_preprocess_matches_the_reference_processors():
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    from alignprop.rewards.object_count import owlv2_preprocess, owlvit_preprocess

    array = natural_image()
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    reference = Owlv2ImageProcessorPil()(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    ours = owlv2_preprocess(as_tensor([array]), 960)
    assert ours.shape == reference.shape == (1, 3, 960, 960)
    assert ((ours - reference).abs() * std).max() < 1e-5  # the same linear maps: float rounding only
    reference = OwlViTImageProcessorPil()(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    ours = owlvit_preprocess(as_tensor([array]), 768)
    assert ((ours - reference).abs() * std).max() <= PREPROCESS_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Tiny CLIP models in the real layout
# ---------------------------------------------------------------------------------------------
def tiny_clip(tokenizer, projection_dim=16, image_size=32, seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        projection_dim=projection_dim,
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    return model


def save_processor(directory, image_size=32):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)


def reference_pixels(directory, arrays):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(directory)
    return processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def aesthetic_weights(tmp_path_factory, tokenizer):
    from alignprop.rewards.aesthetic import AestheticMLP

    root = tmp_path_factory.mktemp("aesthetic-weights")
    clip = tiny_clip(tokenizer)
    clip.save_pretrained(root / "clip-vit-large-patch14")
    save_processor(root / "clip-vit-large-patch14")
    torch.manual_seed(1)
    head = AestheticMLP(input_size=16)
    (root / "aesthetic").mkdir()
    torch.save(head.state_dict(), root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")  # as published: a .pth
    return root, clip, head


def test_aesthetic_head_has_the_published_key_layout():
    from alignprop.rewards.aesthetic import AestheticMLP

    shapes = {k: tuple(v.shape) for k, v in AestheticMLP().state_dict().items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                      "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                      "layers.7.bias": (1,)}


def test_aesthetic_matches_clip_embedding_plus_mlp_and_reaches_the_pixels(aesthetic_weights):
    root, clip, head = aesthetic_weights
    reward = load_reward("aesthetic", weights_dir=str(root))
    arrays, images = batch()
    images.requires_grad_(True)
    scores = reward(images, PROMPTS)
    with torch.no_grad():  # reference: the transformers processor, CLIPModel, L2 normalisation, the MLP
        embeds = clip.get_image_features(pixel_values=reference_pixels(root / "clip-vit-large-patch14", arrays))
        expected = head.eval()(F.normalize(embeds.pooler_output, dim=-1)).squeeze(-1)
    assert_matches_reference(reward, images, scores, expected)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0


def test_aesthetic_accepts_safetensors_and_rejects_wrong_keys(aesthetic_weights, tmp_path):
    from safetensors.torch import save_file

    root, _, head = aesthetic_weights
    other = tmp_path / "weights"
    (other / "aesthetic").mkdir(parents=True)
    (other / "clip-vit-large-patch14").symlink_to(root / "clip-vit-large-patch14")
    save_file(head.state_dict(), other / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors")
    images = batch()[1]
    assert torch.allclose(load_reward("aesthetic", weights_dir=str(other))(images, PROMPTS),
                          load_reward("aesthetic", weights_dir=str(root))(images, PROMPTS))

    renamed = {k.replace("layers.", "mlp."): v for k, v in head.state_dict().items()}
    save_file(renamed, other / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors")
    with pytest.raises(UserError, match="missing key 'layers.0.weight'"):
        load_reward("aesthetic", weights_dir=str(other))


def test_a_clip_directory_with_wrong_keys_is_refused(aesthetic_weights, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _, _ = aesthetic_weights
    broken = tmp_path / "weights"
    (broken / "clip-vit-large-patch14").mkdir(parents=True)
    (broken / "aesthetic").symlink_to(root / "aesthetic")
    for f in (root / "clip-vit-large-patch14").iterdir():
        (broken / "clip-vit-large-patch14" / f.name).write_bytes(f.read_bytes())
    path = broken / "clip-vit-large-patch14" / "model.safetensors"
    state = load_file(path)
    del state["visual_projection.weight"]
    save_file(state, path)
    with pytest.raises(UserError, match="missing key 'visual_projection.weight'"):
        load_reward("aesthetic", weights_dir=str(broken))


# ---------------------------------------------------------------------------------------------
# HPS v2: open_clip -> transformers conversion
# ---------------------------------------------------------------------------------------------
def tiny_open_clip_config(vocab_size):
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": vocab_size, "width": 32, "heads": 2, "layers": 2}}


def fake_open_clip_state_dict(config, seed=0) -> dict[str, torch.Tensor]:
    """Built by hand with open_clip's names and shapes (model.py / transformer.py: conv1 without bias, the fused
    nn.MultiheadAttention in_proj, x @ proj projections, a scalar logit_scale); layer norms are randomised too,
    so a swapped mapping would show."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    def tower(prefix, width, layers):
        out = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            out |= {p + "ln_1.weight": rand(width, offset=1), p + "ln_1.bias": rand(width),
                    p + "attn.in_proj_weight": rand(3 * width, width, scale=width ** -0.5),
                    p + "attn.in_proj_bias": rand(3 * width), p + "attn.out_proj.weight": rand(width, width),
                    p + "attn.out_proj.bias": rand(width), p + "ln_2.weight": rand(width, offset=1),
                    p + "ln_2.bias": rand(width), p + "mlp.c_fc.weight": rand(4 * width, width),
                    p + "mlp.c_fc.bias": rand(4 * width), p + "mlp.c_proj.weight": rand(width, 4 * width),
                    p + "mlp.c_proj.bias": rand(width)}
        return out

    v, t, e = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    grid = v["image_size"] // v["patch_size"]
    return {
        "visual.conv1.weight": rand(v["width"], 3, v["patch_size"], v["patch_size"]),
        "visual.class_embedding": rand(v["width"]),
        "visual.positional_embedding": rand(grid * grid + 1, v["width"]),
        "visual.ln_pre.weight": rand(v["width"], offset=1), "visual.ln_pre.bias": rand(v["width"]),
        **tower("visual.", v["width"], v["layers"]),
        "visual.ln_post.weight": rand(v["width"], offset=1), "visual.ln_post.bias": rand(v["width"]),
        "visual.proj": rand(v["width"], e),
        "token_embedding.weight": rand(t["vocab_size"], t["width"]),
        "positional_embedding": rand(t["context_length"], t["width"], scale=0.01),
        **tower("", t["width"], t["layers"]),
        "ln_final.weight": rand(t["width"], offset=1), "ln_final.bias": rand(t["width"]),
        "text_projection": rand(t["width"], e),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }


class ResBlock(nn.Module):  # open_clip's ResidualAttentionBlock structure (pre-norm, nn.MultiheadAttention, GELU MLP)
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(width, heads) for _ in range(layers))


class OpenClipReference(nn.Module):
    """An independent forward pass in open_clip's layout: the fake state dict must load into it strictly."""

    def __init__(self, config):
        super().__init__()
        v, t, e = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
        grid = v["image_size"] // v["patch_size"]
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, v["width"], v["patch_size"], stride=v["patch_size"], bias=False)
        self.visual.class_embedding = nn.Parameter(torch.zeros(v["width"]))
        self.visual.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, v["width"]))
        self.visual.ln_pre, self.visual.ln_post = nn.LayerNorm(v["width"]), nn.LayerNorm(v["width"])
        self.visual.transformer = Tower(v["width"], v["layers"], v["width"] // v["head_width"])
        self.visual.proj = nn.Parameter(torch.zeros(v["width"], e))
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(torch.zeros(t["context_length"], t["width"]))
        self.transformer = Tower(t["width"], t["layers"], t["heads"])
        self.ln_final = nn.LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.zeros(t["width"], e))
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def encode_image(self, pixels):
        v = self.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer.resblocks:
            x = block(x)
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
        for block in self.transformer.resblocks:
            x = block(x, causal)
        x = self.ln_final(x)
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection  # pooled at the end-of-text token


@pytest.fixture(scope="module")
def open_clip_model(tokenizer):
    config = tiny_open_clip_config(len(tokenizer))
    state = fake_open_clip_state_dict(config)
    reference = OpenClipReference(config).eval()
    reference.load_state_dict(state, strict=True)
    return config, state, reference


def converted_model(config, state):
    from transformers import CLIPModel

    from alignprop.rewards.hps import clip_config_from_open_clip, convert_open_clip_state_dict

    model = CLIPModel(clip_config_from_open_clip(config)).eval()
    missing, unexpected = model.load_state_dict(convert_open_clip_state_dict(state), strict=True)
    assert not missing and not unexpected
    return model


def test_open_clip_conversion_matches_the_open_clip_forward(open_clip_model, tokenizer):
    config, state, reference = open_clip_model
    model = converted_model(config, state)
    pixels = torch.randn(2, 3, 32, 32)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model.get_image_features(pixel_values=pixels).pooler_output,
                              reference.encode_image(pixels), atol=1e-5)
        assert torch.allclose(model.get_text_features(input_ids=ids).pooler_output, reference.encode_text(ids),
                              atol=1e-5)
        assert torch.allclose(model.logit_scale, state["logit_scale"])


def test_fused_qkv_attention_by_hand_equals_the_converted_layer(open_clip_model):
    """One layer's attention computed by hand from the open_clip fused in_proj vs transformers' CLIPAttention."""
    config, state, _ = open_clip_model
    model = converted_model(config, state)
    width, heads = 32, 2
    prefix = "visual.transformer.resblocks.0.attn."
    w, b = state[prefix + "in_proj_weight"], state[prefix + "in_proj_bias"]
    x = torch.randn(2, 17, width)
    q, k, v = (x @ w.T + b).split(width, dim=-1)  # rows [0:W] are q, [W:2W] k, [2W:3W] v

    def split_heads(t):
        return t.view(2, 17, heads, width // heads).transpose(1, 2)

    weights = (split_heads(q) @ split_heads(k).transpose(-1, -2) / math.sqrt(width // heads)).softmax(-1)
    mixed = (weights @ split_heads(v)).transpose(1, 2).reshape(2, 17, width)
    expected = mixed @ state[prefix + "out_proj.weight"].T + state[prefix + "out_proj.bias"]
    with torch.no_grad():
        ours = model.vision_model.encoder.layers[0].self_attn(x)[0]
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.fixture(scope="module")
def hps_weights(tmp_path_factory, tokenizer, open_clip_model):
    config, state, _ = open_clip_model
    root = tmp_path_factory.mktemp("hps-weights")
    (root / "hpsv2").mkdir()
    torch.save({"state_dict": state}, root / "hpsv2" / "HPS_v2.1_compressed.pt")  # as published
    (root / "hpsv2" / "open_clip_config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(root / "clip-vit-h-14")
    return root


def test_hpsv2_is_the_scaled_cosine_of_the_open_clip_model(hps_weights, open_clip_model, tokenizer):
    _, _, reference = open_clip_model
    arrays, images = batch()
    images.requires_grad_(True)
    reward = load_reward("hpsv2", weights_dir=str(hps_weights))
    scores = reward(images, PROMPTS)
    with torch.no_grad():
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        pixels = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32)(
            images=[Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        expected = F.cosine_similarity(reference.encode_image(pixels), reference.encode_text(ids))
    assert_matches_reference(reward, images, scores, expected)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    scaled = load_reward("hpsv2", weights_dir=str(hps_weights), options={"hpsv2": {"scale": 100}})
    assert torch.allclose(scaled(images.detach(), PROMPTS), 100 * scores.detach(), rtol=1e-4)


def test_hpsv2_names_the_first_missing_open_clip_key(hps_weights, open_clip_model, tmp_path):
    config, state, _ = open_clip_model
    (tmp_path / "hpsv2").mkdir()
    (tmp_path / "clip-vit-h-14").symlink_to(hps_weights / "clip-vit-h-14")
    (tmp_path / "hpsv2" / "open_clip_config.json").write_text(json.dumps(config))
    broken = {k: v for k, v in state.items() if k != "visual.transformer.resblocks.1.attn.in_proj_weight"}
    torch.save({"state_dict": broken}, tmp_path / "hpsv2" / "HPS_v2.1_compressed.pt")
    with pytest.raises(UserError, match="missing key 'visual.transformer.resblocks.1.attn.in_proj_weight'"):
        load_reward("hpsv2", weights_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# PickScore
# ---------------------------------------------------------------------------------------------
def test_pickscore_is_the_image_text_logit(tmp_path, tokenizer):
    model = tiny_clip(tokenizer, seed=3)
    model.save_pretrained(tmp_path / "pickscore")
    tokenizer.save_pretrained(tmp_path / "clip-vit-h-14")
    save_processor(tmp_path / "clip-vit-h-14")
    arrays, images = batch()
    images.requires_grad_(True)
    reward = load_reward("pickscore", weights_dir=str(tmp_path))
    scores = reward(images, PROMPTS)
    with torch.no_grad():  # PickScore's README: processor, normalised embeddings, logit_scale.exp() * dot
        image = model.get_image_features(pixel_values=reference_pixels(tmp_path / "clip-vit-h-14", arrays))
        text = model.get_text_features(**tokenizer(PROMPTS, padding=True, truncation=True, max_length=77,
                                                   return_tensors="pt"))
        expected = model.logit_scale.exp() * F.cosine_similarity(image.pooler_output, text.pooler_output)
    assert_matches_reference(reward, images, scores, expected)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# object_count
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, expected", [
    ("three apples", (3, "apple")),
    ("a photo of 2 red dogs on the grass", (2, "red dog")),
    ("one cat", (1, "cat")),
    ("Five boxes, on a shelf", (5, "box")),
    ("four puppies next to a bowl", (4, "puppy")),
    ("six people", (6, "person")),
])
def test_parse_count_prompt(prompt, expected):
    from alignprop.rewards.object_count import parse_count_prompt

    assert parse_count_prompt(prompt) == expected


@pytest.mark.parametrize("prompt", ["a photo of a cat", "three", "two on the table"])
def test_unparseable_count_prompt_is_a_clear_error(prompt):
    from alignprop.rewards.object_count import parse_count_prompt

    with pytest.raises(UserError, match="cannot read a count and a noun"):
        parse_count_prompt(prompt)


def test_soft_count_threshold_and_nms():
    from alignprop.rewards.object_count import soft_count

    logits = torch.tensor([[3.0, 2.5, -4.0, 1.0]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.21, 0.2, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]])
    s = torch.sigmoid(logits)[0]
    assert torch.allclose(soft_count(logits, boxes, 0.0, 1.0), s.sum().view(1))  # the plain sum
    assert torch.allclose(soft_count(logits, boxes, 0.1, 1.0), (s[0] + s[1] + s[3]).view(1))  # background dropped
    assert torch.allclose(soft_count(logits, boxes, 0.1, 0.3), (s[0] + s[3]).view(1))  # the duplicate suppressed


def tiny_owl(kind, tokenizer, directory, seed=0):
    from transformers import (Owlv2Config, Owlv2ForObjectDetection, OwlViTConfig, OwlViTForObjectDetection)
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    torch.manual_seed(seed)
    config_cls, model_cls, processor_cls = {
        "owlv2": (Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil),
        "owlvit": (OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessorPil)}[kind]
    config = config_cls(
        projection_dim=32,  # OWL's class head compares text-width image features with projected queries
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
    )
    model = model_cls(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor = processor_cls(size={"height": 64, "width": 64})
    processor.save_pretrained(directory)
    return model, processor


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_object_count_is_minus_the_count_error_of_the_detector(kind, tmp_path, tokenizer):
    tokenizer = build_word_tokenizer(WORDS, model_max_length=16)
    model, processor = tiny_owl(kind, tokenizer, tmp_path / "object_count")
    arrays, images = batch()
    images.requires_grad_(True)
    reward = load_reward("object_count", weights_dir=str(tmp_path),
                         options={"object_count": {"score_threshold": 0.0, "nms_iou": 1.0}})
    scores = reward(images, PROMPTS)
    with torch.no_grad():  # reference: the processor, the transformers model, the plain sum of sigmoid scores
        pixels = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
        tokens = tokenizer(["a photo of a red apple", "a photo of a dog"], padding="max_length", max_length=16,
                           return_tensors="pt")
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels).logits[..., 0]
        expected = -(torch.sigmoid(logits).sum(-1) - torch.tensor([3.0, 2.0])).abs()
    assert_matches_reference(reward, images, scores, expected)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(UserError, match="cannot read a count"):
        reward(images.detach(), ["a photo of a cat", "two dogs"])
    default = load_reward("object_count", weights_dir=str(tmp_path))(images.detach(), PROMPTS)  # threshold + NMS
    assert default.shape == (2,) and (default <= 0).all()


def test_rewards_score_cli_with_a_weights_directory_and_an_option(hps_weights, tmp_path, capsys):
    from alignprop.cli import main

    arrays, images = batch()
    (tmp_path / "images").mkdir()
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["rewards", "score", "--reward", "hpsv2", "--images", str(tmp_path / "images"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--weights-dir", str(hps_weights), "--option", "hpsv2.scale=100"]) == 0
    rows = {line.split()[0]: float(line.split()[1]) for line in capsys.readouterr().out.splitlines()[1:]}
    expected = 100 * load_reward("hpsv2", weights_dir=str(hps_weights))(images, PROMPTS)
    assert [rows["0.png"], rows["1.png"]] == pytest.approx(expected.tolist(), abs=1e-3)
    assert rows["mean"] == pytest.approx(expected.mean().item(), abs=1e-3)
