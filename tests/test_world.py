"""The synthetic world: renderer, exact metrics, world rewards, and the shipped model's quality bar."""

import json

import numpy as np
import pytest
import torch

from alignprop.rewards import load_reward
from alignprop.world import prompts as wp
from alignprop.world.metrics import classify_color, count_batch, count_objects, world_metrics
from alignprop.world.render import IMAGE_SIZE, render, render_dataset


def test_renderer_is_deterministic_by_seed():
    a, caps_a, counts_a = render_dataset(32, seed=7)
    b, caps_b, counts_b = render_dataset(32, seed=7)
    c, _, _ = render_dataset(32, seed=8)
    assert np.array_equal(a, b) and caps_a == caps_b and np.array_equal(counts_a, counts_b)
    assert not np.array_equal(a, c)
    assert a.shape == (32, IMAGE_SIZE, IMAGE_SIZE, 3) and a.min() >= 0 and a.max() <= 1


def test_heldout_pairs_never_appear_in_training_renders():
    _, captions, _ = render_dataset(500, seed=0)
    heldout = set(wp.heldout_captions())
    assert heldout and not heldout & set(captions)
    assert set(wp.train_captions()) >= set(captions)
    _, held, _ = render_dataset(50, seed=0, heldout=True)
    assert set(held) <= heldout


@pytest.mark.parametrize("noisy", [False, True])
def test_exact_counter_and_colour_classifier_are_exact_on_renders(noisy):
    rng = np.random.default_rng(3)
    for count, color, shape in wp.combinations(False) + wp.combinations(True):
        image = render(count, color, shape, rng, noisy=noisy)
        assert count_objects(image) == count, (count, color, shape)
        assert classify_color(image) == color


def test_counter_uses_the_images_own_background():
    """A drifted, dark or bright background is separated by its own colour, not by a brightness threshold."""
    rng = np.random.default_rng(0)
    image = render(3, "yellow", "circle", rng, noisy=False)
    shifted = np.clip(image * 0.5 + np.array([0.3, 0.0, 0.4]), 0, 1)  # a strong global colour cast
    assert count_objects(shifted) == 3
    assert count_objects(np.full((32, 32, 3), 0.4, dtype=np.float32)) == 0


def test_world_metrics_per_prompt():
    images, captions, counts = render_dataset(40, seed=1)
    wrong = [wp.caption(1 if n > 1 else 2, c, s) for n, c, s in map(wp.parse_caption, captions)]
    right = world_metrics(torch.from_numpy(images).permute(0, 3, 1, 2), captions)
    assert right["count_accuracy"] == 1.0 and right["color_accuracy"] == 1.0 and right["count_mae"] == 0
    bad = world_metrics(images, wrong)
    assert bad["count_accuracy"] == 0.0 and bad["count_mae"] > 0
    assert sum(v["n"] for v in right["per_prompt"].values()) == 40


def test_parse_caption():
    assert wp.parse_caption("two red circles") == (2, "red", "circle")
    assert wp.parse_caption("one blue square") == (1, "blue", "square")
    with pytest.raises(wp.CaptionError, match="not a world caption"):
        wp.parse_caption("a photo of a cat")


def _renders(captions, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [render(*wp.parse_caption(c), rng, noisy=False) for c in captions]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def test_world_color_prefers_the_prompted_colour_and_is_differentiable():
    reward = load_reward("world_color")
    images = _renders(["two red circles", "three blue squares"]).requires_grad_(True)
    right = reward(images, ["two red circles", "three blue squares"])
    wrong = reward(images, ["two green circles", "three yellow squares"])
    assert (right > wrong + 0.2).all()
    right.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_world_count_scores_the_right_count_higher_and_is_differentiable():
    reward = load_reward("world_count")
    captions = ["one red circle", "two green triangles", "three blue squares", "four yellow circles"]
    images = _renders(captions, seed=5).requires_grad_(True)
    right = reward(images, captions)
    off_by_two = [wp.caption((wp.parse_caption(c)[0] + 1) % 4 + 1, *wp.parse_caption(c)[1:]) for c in captions]
    wrong = reward(images, off_by_two)
    assert (right > wrong).all() and right.mean() > -0.5
    right.sum().backward()
    assert images.grad.abs().sum() > 0


def test_shipped_model_meets_its_recorded_quality_bar():
    """Loads with StableDiffusionPipeline.from_pretrained and re-measures the recorded figures on 64 samples."""
    from alignprop.models import WORLD_MODEL_DIR
    from alignprop.storage import sha256_file
    from alignprop.world.train_model import evaluate_model

    manifest = json.loads((WORLD_MODEL_DIR / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        assert sha256_file(WORLD_MODEL_DIR / name) == entry["sha256"], name
    recorded = manifest["quality"]
    measured = evaluate_model(WORLD_MODEL_DIR, recorded["n_images"], recorded["num_inference_steps"],
                              recorded["guidance_scale"], recorded["seed"])
    assert measured["color_accuracy"] >= 0.9
    assert measured["count_accuracy"] > 0.25 + 0.1  # clearly above chance (4 counts)
    assert measured["count_accuracy"] == pytest.approx(recorded["count_accuracy"], abs=0.05)


def test_varied_scenes_are_deterministic_and_labelled_by_the_exact_counter():
    from alignprop.world.rewards import varied_dataset

    images, counts = varied_dataset(40, seed=3)
    again, counts_again = varied_dataset(40, seed=3)
    assert torch.equal(images, again) and torch.equal(counts, counts_again)
    assert images.shape == (40, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert counts.tolist() == [count_objects(i) for i in images.permute(0, 2, 3, 1).numpy()]
    assert count_batch(images).tolist() == counts.tolist()  # a [B, 3, H, W] tensor
    assert count_batch(images.permute(0, 2, 3, 1).numpy()).tolist() == counts.tolist()  # a [B, H, W, 3] array
    assert len(set(counts.tolist())) >= 5  # 0 to 6 objects, not only the prompts' 1-4


def test_shipped_count_reward_agrees_with_the_exact_counter_on_world_samples():
    """The learned reward must read the count the exact counter reads on the world model's own samples, or
    aligning to it moves the reward and not the count. Its manifest records the figure; re-measured here."""
    from alignprop.storage import sha256_file
    from alignprop.world.rewards import COUNT_REWARD_DIR, agreement_on_world_samples, load_count_regressor

    manifest = json.loads((COUNT_REWARD_DIR / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        assert sha256_file(COUNT_REWARD_DIR / name) == entry["sha256"], name
    assert manifest["held_out"]["heldout_pairs"]["accuracy"] >= 0.98  # exact on held-out renders
    measured = agreement_on_world_samples(load_count_regressor(), 48)
    for split, figures in measured.items():
        recorded = manifest["held_out"][split]["agreement_with_exact_counter"]
        assert figures["agreement_with_exact_counter"] >= 0.8, (split, figures)
        assert figures["agreement_with_exact_counter"] == pytest.approx(recorded, abs=0.1), split


def test_train_count_reward_command_writes_a_complete_reward_or_nothing(tmp_path):
    import helpers

    out = tmp_path / "count_reward"
    done = helpers.run_cli("world", "train-count-reward", str(out), "--steps", "3", "--num-images", "64",
                           "--agreement-images", "0")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert "--steps 3" in manifest["command"] and "heldout_pairs" in manifest["held_out"]
    before = (out / "model.safetensors").read_bytes()
    images = torch.from_numpy(render_dataset(4, seed=0)[0]).permute(0, 3, 1, 2)
    shipped = load_reward("world_count")(images, ["one red circle"] * 4)
    (tmp_path / "world_count").symlink_to(out)  # the layout `--set reward_weights_dir=DIR` reads
    trained = load_reward("world_count", weights_dir=str(tmp_path))(images, ["one red circle"] * 4)
    assert trained.shape == (4,) and not torch.allclose(trained, shipped)  # 3 steps: not the shipped weights

    bad = helpers.run_cli("world", "train-count-reward", str(out), "--steps", "0")
    assert bad.returncode != 0 and "steps >= 1" in bad.stderr and "Traceback" not in bad.stderr
    assert (out / "model.safetensors").read_bytes() == before  # nothing already saved is lost


def test_a_checkpoint_of_another_architecture_is_refused_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    from alignprop.errors import UserError
    from alignprop.world.rewards import WEIGHTS_FILE, load_count_regressor

    with pytest.raises(UserError, match="not found.*train-count-reward"):
        load_count_regressor(tmp_path)
    save_file({"features.0.weight": torch.zeros(32, 3, 3, 3), "features.10.weight": torch.zeros(1, 64, 1, 1)},
              tmp_path / WEIGHTS_FILE)  # the layout of the earlier density-map regressor, abridged
    with pytest.raises(UserError, match="not a checkpoint of this version.*retrain it"):
        load_count_regressor(tmp_path)


def test_world_sampling_applies_the_gate_an_adapter_was_trained_with(tmp_path):
    """`sample_world` (and so `alignprop world evaluate --adapter`) reads adapter_min_timestep from the config.json
    beside the adapter: a gate above every timestep gives the base model's images, one inside the chain differs
    from both the base and the ungated adapter."""
    from alignprop import models
    from alignprop.config import tiny, update
    from alignprop.world.train_model import sample_world

    torch.manual_seed(0)
    parts = models.load_parts("world")
    models.add_lora(parts.unet, rank=4, init_weights=False)
    models.save_lora(parts.unet, tmp_path / "adapter")
    world = models.resolve_model_dir("world")

    def images(gate):
        if gate is not None:
            (tmp_path / "adapter" / "config.json").write_text(update(tiny(), {"adapter_min_timestep": gate}).to_json())
        return sample_world(world, 4, adapter=tmp_path / "adapter" if gate is not None else None)[0]

    base, ungated, gated, off = images(None), images(0), images(600), images(1000)
    assert not torch.allclose(base, ungated, atol=1e-3)
    torch.testing.assert_close(off, base)
    assert not torch.allclose(gated, base, atol=1e-3) and not torch.allclose(gated, ungated, atol=1e-3)
