"""`pickscore`: PickScore v1 (arXiv 2305.01569), a CLIP-H fine-tuned on Pick-a-Pic preferences, in transformers format.

Score = logit_scale.exp() * cos(image embedding, text embedding), the image-text logit of PickScore's README
(about 20-22 for typical SD images; logit_scale.exp() is about 100).

Weights (under weights_dir):
    pickscore/        transformers CLIPModel (yuvalkirstain/PickScore_v1)
    clip-vit-h-14/    tokenizer (and preprocessor_config.json) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
                      PickScore's processor
"""

from __future__ import annotations

import torch

from alignprop.rewards import clip, weights


def pickscore(device="cpu", weights_dir=None):
    model_dir = weights.find(weights_dir, "pickscore", "pickscore")
    processor_dir = weights.find(weights_dir, "pickscore", "clip-vit-h-14")
    model = clip.load_clip(model_dir, device, "PickScore (transformers CLIPModel)")
    tokenizer = clip.load_tokenizer(processor_dir, "pickscore")
    preprocess = clip.ClipPreprocess.from_dir(processor_dir, model.config.vision_config.image_size)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = clip.image_embeds(model, preprocess(images))
        text = clip.text_embeds(model, tokenizer, prompts, images.device)
        return model.logit_scale.exp().float() * (image * text).sum(-1)

    return reward
