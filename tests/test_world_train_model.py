"""The world's text-to-image model: the training command end to end (tiny budget), and the shipped model."""

import json

import pytest
import torch

from alignprop.cli import main
from alignprop.models import WORLD_MODEL_DIR
from alignprop.world.manifest import verify_manifest
from alignprop.world.train_model import QUALITY_BAR, WorldModelConfig, evaluate_model, train_world_model


def test_train_model_writes_a_loadable_pipeline_with_manifest(tmp_path):
    from diffusers import StableDiffusionPipeline

    config = WorldModelConfig(num_images=64, vae_steps=2, unet_steps=2, batch_size=4, vae_batch_size=4,
                              eval_images=4, eval_steps=2)
    manifest = train_world_model(tmp_path / "model", config, command="test")
    assert not (tmp_path / "model.tmp").exists()
    assert verify_manifest(tmp_path / "model")["config"]["unet_steps"] == 2
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "tokenizer/vocab.json", "model_index.json"} <= set(manifest["files"])
    for split in ("quality", "quality_heldout"):
        assert manifest[split]["n_images"] == 4 and 0 <= manifest[split]["color_accuracy"] <= 1
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"))
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained latents' std
    image = pipe("two red circles", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)


def test_shipped_model_is_small_and_sd_shaped():
    from diffusers import StableDiffusionPipeline

    manifest = verify_manifest(WORLD_MODEL_DIR)  # every file matches its sha256
    assert sum(entry["size"] for entry in manifest["files"].values()) < 10 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(str(WORLD_MODEL_DIR))
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.in_channels == 4
    assert max(pipe.unet.config.block_out_channels) <= 64 and pipe.unet.config.layers_per_block == 1
    assert manifest["command"].startswith("alignprop world train-model")
    assert manifest["quality"]["num_inference_steps"] == 20 and manifest["quality"]["n_images"] == 64


@pytest.mark.slow
def test_shipped_model_meets_its_recorded_quality_bar():
    """Re-measures the recorded figures on 64 samples (DDIM 20 steps, the recorded guidance and seed)."""
    recorded = json.loads((WORLD_MODEL_DIR / "MANIFEST.json").read_text())["quality"]
    measured = evaluate_model(WORLD_MODEL_DIR, recorded["n_images"], recorded["num_inference_steps"],
                              recorded["guidance_scale"], recorded["seed"])
    assert measured["color_accuracy"] >= QUALITY_BAR["color_accuracy_min"]
    assert measured["count_accuracy"] >= QUALITY_BAR["count_accuracy_chance"] + 0.1  # clearly above chance
    assert measured["count_accuracy"] == pytest.approx(recorded["count_accuracy"], abs=3 / 64)
    assert measured["color_accuracy"] == pytest.approx(recorded["color_accuracy"], abs=3 / 64)


def test_cli_evaluate_prints_ground_truth_metrics(capsys):
    main(["world", "evaluate", "--n", "4", "--steps", "5"])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_images"] == 4 and metrics["num_inference_steps"] == 5
    assert {"count_accuracy", "color_accuracy", "count_mae", "count_reward_agreement"} <= set(metrics)
