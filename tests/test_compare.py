"""The equal-budget comparison: budgets, shared settings, reading the curves, and the command end to end."""

import json

import pytest

import helpers
from alignprop import cli
from alignprop.compare import CompareConfig, analyse, eval_config, first_reaching, smoothed, train_configs
from alignprop.config import ConfigError


def _curve(rewards, images_per_step, seconds_per_step):
    return [{"step": i + 1, "reward_mean": r, "images_seen": (i + 1) * images_per_step,
             "wall_time_s": (i + 1) * seconds_per_step} for i, r in enumerate(rewards)]


def test_smoothing_is_a_trailing_moving_average():
    curve = _curve([1.0, 3.0, 2.0, 6.0], 1, 1)
    assert smoothed(curve, 2).tolist() == [1.0, 2.0, 2.5, 4.0]
    assert first_reaching(curve, 2.5, 2) == {"step": 3, "images_seen": 3, "wall_time_s": 3}
    assert first_reaching(curve, 5.0, 2) is None


def test_images_and_time_to_reach_the_other_methods_reward():
    curves = {"alignprop": _curve([0.1, 0.5, 0.8, 0.9, 0.9], images_per_step=2, seconds_per_step=1.0),
              "ddpo": _curve([0.1, 0.2, 0.3, 0.4, 0.5], images_per_step=4, seconds_per_step=2.0)}
    summary = analyse(curves, window=1)
    assert summary["alignprop"]["final_train_reward"] == 0.9 and summary["ddpo"]["final_train_reward"] == 0.5
    assert summary["alignprop"]["to_reach_ddpo_final"]["images_seen"] == 4  # 0.5 at step 2
    assert summary["ddpo"]["to_reach_alignprop_final"] is None  # never 0.9 within 20 images
    e = summary["efficiency"]
    assert e["common_target"] == 0.5 and e["leader"] == "alignprop"
    assert e["ddpo_over_alignprop_images_seen"] == 20 / 4
    assert e["ddpo_over_alignprop_wall_time_s"] == 10.0 / 2.0
    # DDPO's whole budget over the 8 images AlignProp needed for its own final reward: a lower bound
    assert e["ddpo_over_alignprop_images_seen_lower_bound"] == 20 / 8
    assert e["ddpo_over_alignprop_wall_time_s_lower_bound"] == 10.0 / 4.0


def test_budget_sets_the_steps_and_everything_else_is_shared():
    config = CompareConfig(train={"reward": "brightness", "num_inference_steps": 7, "eta": 1.0, "seed": 3},
                           alignprop={"truncation_k": 2}, ddpo={"ddpo_samples_per_step": 8}, budget_images=40)
    configs = train_configs(config)
    a, d = configs["alignprop"], configs["ddpo"]
    assert a.num_steps == 40 // a.train_batch_size and d.num_steps == 40 // 8
    for key in ("pretrained_model", "prompts", "reward", "seed", "num_inference_steps", "guidance_scale", "eta",
                "lora_rank", "lora_target_modules"):
        assert getattr(a, key) == getattr(d, key), key
    assert (a.method, d.method) == ("alignprop", "ddpo")
    assert a.learning_rate == 1e-3 and d.learning_rate == 3e-4  # each method's own optimiser defaults
    assert a.truncation_k == 2 and not a.tracking and not d.tracking
    with pytest.raises(ConfigError, match="less than one ddpo step"):
        train_configs(CompareConfig(budget_images=3))
    with pytest.raises(ConfigError, match="not differentiable"):
        train_configs(CompareConfig(train={"reward": "jpeg_compressibility"}))


def test_held_out_prompts_follow_the_training_prompts():
    config = CompareConfig()
    assert eval_config(config, train_configs(config)).prompts == "world_heldout"
    other = CompareConfig(train={"prompts": "general"})
    with pytest.raises(ConfigError, match="held-out prompt set"):
        eval_config(other, train_configs(other))
    assert CompareConfig.from_json(config.to_json()) == config


@pytest.mark.slow
def test_no_common_level_when_one_method_never_rises_above_its_start():
    """DDPO ending below where it started must not yield a ratio from the noise of its first steps."""
    curves = {"alignprop": _curve([0.5, 0.7, 0.9, 0.95], images_per_step=2, seconds_per_step=1.0),
              "ddpo": _curve([0.5, 0.4, 0.6, 0.45], images_per_step=2, seconds_per_step=3.0)}
    e = analyse(curves, window=1)["efficiency"]
    assert e["ddpo_over_alignprop_images_seen"] is None and e["ddpo_over_alignprop_wall_time_s"] is None
    assert e["no_progress"] == ["ddpo"] and e["start"] == {"alignprop": 0.5, "ddpo": 0.5}
    assert e["ddpo_over_alignprop_images_seen_lower_bound"] == 8 / 8  # DDPO's 8 images over AlignProp's 8


def test_compare_command_end_to_end(tmp_path_factory, tmp_path, capsys):
    tiny = helpers.tiny_model_dir(tmp_path_factory)
    prompts = tmp_path / "train.txt"
    prompts.write_text("a cat\na dog\n")
    eval_prompts = tmp_path / "eval.txt"
    eval_prompts.write_text("a horse\n")
    out = tmp_path / "compare"
    status = cli.main(["compare", "--set", f"pretrained_model={tiny}", "--set", f"prompts={prompts}",
                       "--set", "reward=brightness", "--set", "num_inference_steps=3",
                       "--budget-images", "8", "--smoothing", "2", "--eval-prompts", str(eval_prompts),
                       "--seeds", "0,1", "--reward", "jpeg_compressibility", "--output", str(out)])
    assert status == 0, capsys.readouterr().err
    summary = json.loads((out / "compare.json").read_text())
    assert summary["alignprop"]["images"] == 8 and summary["ddpo"]["images"] == 8  # the same budget
    assert summary["alignprop"]["steps"] == 4 and summary["ddpo"]["steps"] == 2
    ratio = summary["efficiency"]["ddpo_over_alignprop_images_seen"]
    assert ratio is None or ratio > 0  # None: one method did not rise on this random-init model
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["models"].keys() == {"base", "alignprop", "ddpo"}
    assert list(metrics["models"]["ddpo"]["rewards"]) == ["brightness", "jpeg_compressibility"]  # training reward first
    assert (out / "eval" / "report.html").read_text().count('<section class="grid">') == 1
    printed = capsys.readouterr().out
    assert "| ddpo |" in printed and ("DDPO needed" in printed) == (ratio is not None)
