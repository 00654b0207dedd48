"""`aesthetic`: the LAION aesthetic predictor v2 ("improved aesthetic predictor", sac+logos+ava1-l14-linearMSE).

Score = MLP(normalize(CLIP ViT-L/14 image embedding)), on roughly a 1-10 scale (higher is better). The head is
the published one: five Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts between the first four
and no activations (the published model comments its ReLUs out), so its state dict keys are `layers.0`,
`layers.2`, `layers.4`, `layers.6`, `layers.7` (github.com/christophschuhmann/improved-aesthetic-predictor,
simple_inference.py). The CLIP embedding is transformers' `CLIPModel.get_image_features`, L2-normalised.

Weights (under weights_dir):
    clip-vit-large-patch14/                                  transformers CLIPModel (openai/clip-vit-large-patch14)
    aesthetic/sac+logos+ava1-l14-linearMSE.safetensors       or the published .pth (read with weights_only=True)
"""

from __future__ import annotations

import torch
from torch import nn

from alignprop.rewards import clip, weights

HEAD_FILE = "aesthetic/sac+logos+ava1-l14-linearMSE"


class AestheticMLP(nn.Module):
    """The published head; the dropouts keep the layer indices of the published state dict."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def load_head(path) -> AestheticMLP:
    state = weights.load_state_dict(path)
    input_size = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768
    head = AestheticMLP(input_size)
    weights.check_keys(state, list(head.state_dict()), path, "LAION aesthetic predictor (AestheticMLP)")
    head.load_state_dict(state)
    return head.requires_grad_(False).eval()


def aesthetic(device="cpu", weights_dir=None):
    clip_dir = weights.find(weights_dir, "aesthetic", "clip-vit-large-patch14")
    head_path = weights.find(weights_dir, "aesthetic", f"{HEAD_FILE}.safetensors", f"{HEAD_FILE}.pth")
    model = clip.load_clip(clip_dir, device, "CLIP ViT-L/14 (transformers CLIPModel)")
    head = load_head(head_path).to(device)
    if head.layers[0].in_features != model.config.projection_dim:
        raise weights.WeightsError(f"{head_path} takes {head.layers[0].in_features}-d embeddings but the CLIP model "
                                   f"in {clip_dir} gives {model.config.projection_dim}-d ones: use ViT-L/14")
    preprocess = clip.ClipPreprocess.from_dir(clip_dir, model.config.vision_config.image_size)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeds = clip.image_embeds(model, preprocess(images))
        return head(embeds.to(head.layers[0].weight.dtype)).squeeze(-1).float()

    return reward
