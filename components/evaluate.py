"""Evaluate: sample the base model and the adapters on the evaluation prompts with the same noise, score them,
write metrics.json (read by the register step) and the HTML report (rendered by the KFP UI)."""

from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(base_model_ref: str, reward_weights_ref: str, alignprop_adapter: Input[Model],
             eval_prompts: Input[Dataset], rewards: str, images_per_prompt: int, seed: int, fid_reference: str,
             fid_extractor: str, eval_metrics: Output[Artifact], report: Output[HTML], metrics: Output[Metrics],
             ddpo_adapter: Optional[Input[Model]] = None) -> NamedTuple("Evaluated", [("report_uri", str)]):
    """Score base, AlignProp (and DDPO) images on the evaluation prompts with every reward in `rewards`, and the
    FID drift from the base model, with the training run's sampler settings.

    Args:
        base_model_ref: cache manifest URI of the base model.
        reward_weights_ref: cache manifest URI of the reward weights; empty when none.
        alignprop_adapter: the AlignProp run directory.
        eval_prompts: evaluation prompts (JSONL).
        rewards: comma-separated rewards to report; empty for the training reward.
        images_per_prompt: images per prompt and model (seeds seed, seed+1, ...).
        seed: first evaluation seed; every model starts from the same noise.
        fid_reference: "base" (the base model's samples with other seeds), a directory of real images, or empty
            for no FID.
        fid_extractor: FID features: auto, world, inception[:WEIGHTS], a CLIP/DINOv2 directory, or the name of
            one under the reward weights (e.g. clip-vit-large-patch14).
        ddpo_adapter: the DDPO run directory, when the baseline was trained.
    """
    import json
    import logging
    import os
    import shutil
    from collections import namedtuple

    from alignprop.evaluate import EvalConfig, evaluate as run_evaluation
    from alignprop.models import resolve_model_dir

    logging.basicConfig(level=logging.INFO)
    runs = {"alignprop": alignprop_adapter.path}
    if ddpo_adapter is not None:
        runs["ddpo"] = ddpo_adapter.path
    with open(os.path.join(alignprop_adapter.path, "config.json")) as f:
        trained = json.load(f)
    weights = reward_weights_ref or trained.get("reward_weights_dir")
    extractor = fid_extractor or "auto"
    if (weights and "/" not in extractor and ":" not in extractor
            and extractor not in ("auto", "world") and not extractor.startswith("inception")):
        from alignprop.cache import local_dir

        extractor = str(local_dir(weights) / extractor)  # e.g. the aesthetic reward's CLIP ViT-L/14
    config = EvalConfig(
        # a local directory (fetched and verified from the cache), so the evaluation can recognise the world model
        pretrained_model=resolve_model_dir(base_model_ref or trained["pretrained_model"]), adapters=runs,
        prompts=os.path.join(eval_prompts.path, "prompts.jsonl"),
        seeds=list(range(seed, seed + images_per_prompt)),
        rewards=[r.strip() for r in (rewards or trained["reward"]).split(",") if r.strip()],
        reward_weights_dir=weights, num_inference_steps=trained["num_inference_steps"],
        guidance_scale=trained["guidance_scale"], eta=trained["eta"], mixed_precision=trained["mixed_precision"],
        fid_reference=fid_reference or None, fid_extractor=extractor, training_runs=runs,
        output_dir=eval_metrics.path)
    results = run_evaluation(config)
    shutil.copyfile(os.path.join(eval_metrics.path, "report.html"), report.path)
    for model, entry in results["models"].items():
        for reward, stats in entry["rewards"].items():
            metrics.log_metric(f"{model}-{reward}", stats["mean"])
        if entry.get("fid_drift") is not None:
            metrics.log_metric(f"{model}-fid_drift", entry["fid_drift"])
    return namedtuple("Evaluated", ["report_uri"])(report.uri)
