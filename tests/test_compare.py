"""The equal-budget comparison: budgets, shared settings, reading the curves, and the command end to end."""

import json

import pytest

import helpers
from alignprop import cli
from alignprop.compare import (CompareConfig, analyse, analyse_fixed_noise, curve_configs, eval_config, first_reaching,
                               images_to_reach, smoothed, train_configs)
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


def _points(gains, images_per_point, seconds_per_image, se=0.001):
    return [{"images": (i + 1) * images_per_point, "seconds": (i + 1) * images_per_point * seconds_per_image,
             "gain": g, "se": se} for i, g in enumerate(gains)]


def test_fixed_noise_ratio_is_read_at_the_lower_final_gain_interpolated_between_points():
    curves = {"alignprop": _points([0.02, 0.06, 0.10], images_per_point=2, seconds_per_image=0.5),
              "ddpo": _points([0.01, 0.02, 0.04], images_per_point=64, seconds_per_image=1.0)}
    f = analyse_fixed_noise(curves)
    assert f["level"] == 0.04 and f["level_from"] == "ddpo" and not f["no_common_level"]
    assert f["ddpo"] == {"images": 192, "seconds": 192.0}  # its own final point
    # AlignProp: 0.02 at 2 images, 0.06 at 4, so 0.04 is reached halfway, at 3 images and 1.5 s
    assert f["alignprop"] == pytest.approx({"images": 3.0, "seconds": 1.5})
    assert f["ddpo_over_alignprop_images"] == pytest.approx(64.0)
    assert f["ddpo_over_alignprop_seconds"] == pytest.approx(128.0)
    # from the origin: a first point above the level is interpolated from (0 images, gain 0)
    assert images_to_reach(_points([0.08], 4, 1.0), 0.02) == pytest.approx({"images": 1.0, "seconds": 1.0})
    assert images_to_reach(_points([0.01, 0.015], 4, 1.0), 0.02) is None


def test_fixed_noise_has_no_common_level_when_the_lower_gain_is_within_two_standard_errors():
    curves = {"alignprop": _points([0.05, 0.1], 2, 0.5),
              "ddpo": _points([0.001, 0.0015], 64, 1.0, se=0.001)}
    f = analyse_fixed_noise(curves)
    assert f["no_common_level"] and f["ddpo_over_alignprop_images"] is None and f["alignprop"] is None


def test_curve_points_are_shorter_runs_of_the_same_config_and_bad_points_fail_before_training():
    config = CompareConfig(train={"reward": "brightness"}, budget_images=64,
                           curve_images={"alignprop": [8, 2], "ddpo": [16]}, output_dir="out/cmp")
    trained = train_configs(config)
    runs = curve_configs(config, trained)
    assert [c.num_steps for c in runs["alignprop"]] == [1, 4, 32]  # 2 images per AlignProp step, shortest first
    assert [c.num_steps for c in runs["ddpo"]] == [4, 16]  # the tiny preset samples 4 images per DDPO step
    assert runs["alignprop"][-1] == trained["alignprop"] and runs["ddpo"][-1] == trained["ddpo"]
    assert runs["alignprop"][0].output_dir == "out/cmp/curves/alignprop-2"
    short, full = runs["alignprop"][0].to_dict(), trained["alignprop"].to_dict()
    assert {k for k in full if short[k] != full[k]} == {"num_steps", "output_dir"}
    assert curve_configs(CompareConfig(), train_configs(CompareConfig())) == {}
    for bad, match in (({"alignprop": [3]}, "multiple of"), ({"ddpo": [64]}, "below budget_images"),
                       ({"ddpo": [0]}, "invalid curve_images"), ({"dppo": [16]}, "unknown method")):
        with pytest.raises(ConfigError, match=match):
            train_configs(update_curve(config, bad))


def update_curve(config: CompareConfig, curve: dict) -> CompareConfig:
    return CompareConfig.from_json(json.dumps({**json.loads(config.to_json()), "curve_images": curve}))


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
                       "--seeds", "0,1", "--reward", "jpeg_compressibility", "--output", str(out),
                       "--curve-images", "alignprop=2,4", "--curve-images", "ddpo=4"])
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
    # the fixed-noise curves: shorter runs exist, every point is scored on the evaluation prompts x seeds
    fixed = summary["fixed_noise"]
    assert [p["images"] for p in fixed["curves"]["alignprop"]] == [2, 4, 8]
    assert [p["images"] for p in fixed["curves"]["ddpo"]] == [4, 8]
    assert fixed["images_per_point"] == 2  # 1 prompt x 2 seeds
    assert (out / "curves" / "alignprop-2" / "metrics.jsonl").is_file()
    assert all(p["se"] >= 0 and p["seconds"] > 0 for m in fixed["curves"].values() for p in m)
    assert "Fixed-noise curves" in printed
    assert ("DDPO needed **" in printed) == (not fixed["no_common_level"])


def test_compare_rejects_a_malformed_curve_images_flag(tmp_path, capsys):
    status = cli.main(["compare", "--curve-images", "ddpo=64,lots", "--output", str(tmp_path / "c")])
    assert status != 0 and "--curve-images" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
