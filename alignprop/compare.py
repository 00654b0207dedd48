"""`alignprop compare`: AlignProp against DDPO at the same budget of sampled images, then one evaluation of both.

Both runs start from the same preset and share every value in `train` (model, prompts, reward, seed, sampler:
steps, guidance, eta); each method then gets its own optimiser settings (AlignProp: its defaults; DDPO: the
paper's, `alignprop.ddpo.PAPER_DEFAULTS`) and `num_steps` so that it samples at most `budget_images` images.

The answer, from the training curves (reward of each step's batch, smoothed by a trailing moving average) and the
held-out evaluation:
  - the reward each reaches (final smoothed training reward, and the held-out evaluation reward);
  - how many images (and seconds) each needed to reach the other's final reward (None: not within the budget);
  - the ratio DDPO / AlignProp of images (and of wall time) needed to reach the lower of the two final rewards,
    the level both reached. The AlignProp paper reports about 25x less training time than DDPO.

A batch's reward is noisy, so when one method's rise is smaller than that noise (DDPO's at CPU budgets) the curves
give only bounds. `curve_images` adds fixed-noise curves: shorter runs of each method (a run of N steps is the first
N steps of a longer one), every one scored with the training reward on the evaluation prompts x seeds, from the same
initial and step noise as the base model, with the training sampler. Gains are paired, so a rise of a few
thousandths is resolved; the ratio is then read at the lower of the two final gains, interpolated between points.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignprop.config import PRESETS, ConfigError, TrainConfig, update

logger = logging.getLogger(__name__)

HELD_OUT_PROMPTS = {"world_counts": "world_heldout", "simple_animals": "eval_animals"}  # train set -> eval set
METHODS = ("alignprop", "ddpo")


@dataclass
class CompareConfig:
    preset: str = "tiny"  # TrainConfig preset both runs start from
    train: dict = field(default_factory=lambda: {"eta": 1.0})  # TrainConfig values shared by both methods
    alignprop: dict = field(default_factory=dict)  # AlignProp-only TrainConfig values (e.g. learning_rate)
    ddpo: dict = field(default_factory=dict)  # DDPO-only TrainConfig values, over DDPO's paper defaults
    budget_images: int = 256  # images each method may sample during training (sets num_steps, rounded down)
    evaluation: dict = field(default_factory=dict)  # EvalConfig values (prompts, seeds, rewards, fid_reference...)
    smoothing: int = 5  # trailing moving-average window, in steps, over the training reward curves
    # extra, shorter runs for fixed-noise curves, e.g. {"alignprop": [4, 16], "ddpo": [64]} (images; the full budget is
    # always the last point); empty = no fixed-noise curves
    curve_images: dict = field(default_factory=dict)
    output_dir: str = "outputs/compare"  # alignprop/, ddpo/, eval/, compare.json, compare.md

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CompareConfig":
        return update(cls(), json.loads(text))


def train_configs(config: CompareConfig) -> dict[str, TrainConfig]:
    """The two TrainConfigs, each sampling at most `budget_images` images."""
    from alignprop.ddpo import PAPER_DEFAULTS, validate_ddpo

    if config.preset not in PRESETS:
        raise ConfigError(f"unknown preset {config.preset!r}; use one of {', '.join(PRESETS)}")
    if config.budget_images < 1:
        raise ConfigError(f"invalid budget_images={config.budget_images}: must be positive")
    out = Path(config.output_dir)
    shared = update(PRESETS[config.preset](), {**config.train, "tracking": config.train.get("tracking", False)})
    configs = {
        "alignprop": update(shared, {**config.alignprop, "method": "alignprop", "output_dir": str(out / "alignprop")}),
        "ddpo": update(shared, {**PAPER_DEFAULTS, "eta": shared.eta if shared.eta > 0 else 1.0, **config.ddpo,
                                "method": "ddpo", "output_dir": str(out / "ddpo")}),
    }
    for name, c in configs.items():
        per_step = c.images_per_step()
        steps = config.budget_images // per_step
        if steps < 1:
            raise ConfigError(f"budget_images={config.budget_images} is less than one {name} step ({per_step} images); "
                              "raise the budget")
        configs[name] = update(c, {"num_steps": steps}).validate()
    validate_ddpo(configs["ddpo"])
    curve_configs(config, configs)  # bad curve points fail before any training
    from alignprop.rewards import REWARDS, parse_mix

    if not all(REWARDS[name].differentiable for name, _ in parse_mix(configs["alignprop"].reward)):
        raise ConfigError(f"reward {configs['alignprop'].reward!r} is not differentiable: AlignProp cannot train on "
                          "it, so there is nothing to compare; pick a differentiable reward (alignprop rewards list)")
    return configs


def curve_configs(config: CompareConfig, trained: dict[str, TrainConfig]) -> dict[str, list[TrainConfig]]:
    """Each method's runs for the fixed-noise curves, shortest first, ending with its full-budget run; {} without
    `curve_images`."""
    if not config.curve_images:
        return {}
    unknown = set(config.curve_images) - set(METHODS)
    if unknown:
        raise ConfigError(f"curve_images names unknown method(s) {sorted(unknown)}; use {' and '.join(METHODS)}, "
                          'e.g. {"alignprop": [4, 16], "ddpo": [64]}')
    runs = {}
    for name, c in trained.items():
        per_step = c.images_per_step()
        points = []
        for images in sorted(set(config.curve_images.get(name, []))):
            if not isinstance(images, int) or images < per_step or images % per_step or images >= config.budget_images:
                raise ConfigError(f"invalid curve_images point {images!r} for {name}: must be a multiple of its "
                                  f"{per_step} images per step and below budget_images={config.budget_images}")
            out = Path(config.output_dir) / "curves" / f"{name}-{images}"
            points.append(update(c, {"num_steps": images // per_step, "output_dir": str(out)}).validate())
        runs[name] = [*points, c]
    return runs


def eval_config(config: CompareConfig, trained: dict[str, TrainConfig]):
    from alignprop.evaluate import EvalConfig

    a = trained["alignprop"]
    values = {"pretrained_model": a.pretrained_model, "revision": a.revision, "rewards": [a.reward],
              "reward_weights_dir": a.reward_weights_dir, "num_inference_steps": a.num_inference_steps,
              "guidance_scale": a.guidance_scale, "output_dir": str(Path(config.output_dir) / "eval"),
              "adapters": {name: c.output_dir for name, c in trained.items()},
              "training_runs": {name: c.output_dir for name, c in trained.items()}}
    values.update(config.evaluation)
    values["rewards"] = list(dict.fromkeys([a.reward, *config.evaluation.get("rewards", [])]))  # training reward first
    if "prompts" not in config.evaluation:
        if a.prompts not in HELD_OUT_PROMPTS:
            raise ConfigError(f"no held-out prompt set is known for training prompts {a.prompts!r}; pass the "
                              "evaluation prompts (--eval-prompts FILE)")
        values["prompts"] = HELD_OUT_PROMPTS[a.prompts]
    return update(EvalConfig(), values).validate()


# ---------------------------------------------------------------------------------------------------------------
# Reading the curves
# ---------------------------------------------------------------------------------------------------------------
def smoothed(curve: list[dict], window: int) -> np.ndarray:
    """Trailing moving average of reward_mean (shorter windows at the start)."""
    rewards = np.array([p["reward_mean"] for p in curve], dtype=np.float64)
    return np.array([rewards[max(0, i + 1 - window):i + 1].mean() for i in range(len(rewards))])


def first_reaching(curve: list[dict], target: float, window: int) -> dict | None:
    """{images_seen, wall_time_s, step} of the first step whose smoothed reward is >= target; None if never."""
    values = smoothed(curve, window)
    hits = np.nonzero(values >= target - 1e-12)[0]
    if len(hits) == 0:
        return None
    point = curve[int(hits[0])]
    return {"step": point["step"], "images_seen": point["images_seen"], "wall_time_s": point["wall_time_s"]}


def analyse(curves: dict[str, list[dict]], window: int) -> dict:
    """Final rewards, images/time each needed to reach the other's final reward, and DDPO/AlignProp ratios."""
    final = {m: float(smoothed(curves[m], window)[-1]) for m in METHODS}
    summary = {m: {"final_train_reward": final[m], "images": curves[m][-1]["images_seen"],
                   "wall_time_s": curves[m][-1]["wall_time_s"], "steps": curves[m][-1]["step"]} for m in METHODS}
    for m, other in (("alignprop", "ddpo"), ("ddpo", "alignprop")):
        summary[m][f"to_reach_{other}_final"] = first_reaching(curves[m], final[other], window)
    target = min(final.values())  # the level both reached
    # where each started: the smoothed reward once the first window is full (both start from the base model)
    start = {m: float(smoothed(curves[m], window)[min(window, len(curves[m])) - 1]) for m in METHODS}
    efficiency = {"common_target": target, "start": start}
    if target > max(start.values()):
        reach = {m: first_reaching(curves[m], target, window) for m in METHODS}
        efficiency.update(alignprop=reach["alignprop"], ddpo=reach["ddpo"])
        for key in ("images_seen", "wall_time_s"):
            efficiency[f"ddpo_over_alignprop_{key}"] = reach["ddpo"][key] / max(reach["alignprop"][key], 1e-9)
    else:  # one method ended no higher than it started: "the level both reached" is noise, not progress
        efficiency.update(alignprop=None, ddpo=None, ddpo_over_alignprop_images_seen=None,
                          ddpo_over_alignprop_wall_time_s=None,
                          no_progress=[m for m in METHODS if final[m] <= start[m]])
    leader = max(final, key=final.get)
    other = "ddpo" if leader == "alignprop" else "alignprop"
    efficiency.update(leader=leader, higher_target=final[leader])
    if summary[other][f"to_reach_{leader}_final"] is None:
        # the other method never got there: its whole budget over what the leader needed is a lower bound
        led = first_reaching(curves[leader], final[leader], window)
        for key in ("images_seen", "wall_time_s"):
            efficiency[f"{other}_over_{leader}_{key}_lower_bound"] = curves[other][-1][key] / max(led[key], 1e-9)
    summary["efficiency"] = efficiency
    return summary


def images_to_reach(curve: list[dict], level: float) -> dict | None:
    """{images, seconds} at which a fixed-noise curve first reaches `level`, interpolated linearly from the point
    before it (the curve starts at 0 images, 0 s, gain 0); None if it never does."""
    previous = {"images": 0, "seconds": 0.0, "gain": 0.0}
    for point in curve:
        if point["gain"] >= level:
            share = (level - previous["gain"]) / max(point["gain"] - previous["gain"], 1e-12)
            return {key: previous[key] + share * (point[key] - previous[key]) for key in ("images", "seconds")}
        previous = point
    return None


def analyse_fixed_noise(curves: dict[str, list[dict]]) -> dict:
    """The level both reached (the lower of the two final gains) and the images and seconds each needed for it.
    No common level when that gain is within two standard errors of zero: then one method did not measurably rise."""
    final = {m: curves[m][-1] for m in METHODS}
    lower = min(METHODS, key=lambda m: final[m]["gain"])
    result = {"curves": curves, "level": final[lower]["gain"], "level_se": final[lower]["se"], "level_from": lower}
    if final[lower]["gain"] <= 2 * final[lower]["se"]:
        return {**result, "no_common_level": True, "alignprop": None, "ddpo": None,
                "ddpo_over_alignprop_images": None, "ddpo_over_alignprop_seconds": None}
    reach = {m: images_to_reach(curves[m], result["level"]) for m in METHODS}
    return {**result, "no_common_level": False, **reach,
            **{f"ddpo_over_alignprop_{key}": reach["ddpo"][key] / max(reach["alignprop"][key], 1e-9)
               for key in ("images", "seconds")}}


def fixed_noise_curves(runs: dict[str, list[TrainConfig]], evaluation) -> dict:
    """Score every run of `runs` against the base on the same noise; return `analyse_fixed_noise`'s answer."""
    import torch

    from alignprop import models
    from alignprop.evaluate import fixed_noise_rewards
    from alignprop.prompts import load_prompts
    from alignprop.rewards import load_reward
    from alignprop.runtime import DTYPES, read_metrics

    trained = runs["alignprop"][-1]
    device = evaluation.device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts = models.load_parts(evaluation.pretrained_model, evaluation.revision, device=device,
                              dtype=DTYPES[evaluation.mixed_precision])
    prompts = load_prompts(evaluation.prompts, tokenizer=parts.tokenizer)
    reward = load_reward(trained.reward, device=device, weights_dir=trained.reward_weights_dir)
    sampler = update(evaluation, {"num_inference_steps": trained.num_inference_steps,  # the training sampler
                                  "guidance_scale": trained.guidance_scale, "eta": trained.eta})

    def score(directory: str | None) -> torch.Tensor:
        return fixed_noise_rewards(parts, directory, reward, prompts, sampler.seeds, sampler, device)

    base = score(None)
    curves = {}
    for name, configs in runs.items():
        curves[name] = []
        for c in configs:
            gain = (score(c.output_dir) - base).double()
            metrics = [m for m in read_metrics(Path(c.output_dir) / "metrics.jsonl")
                       if "reward_mean" in m]  # training steps, not the step-0 validation line
            curves[name].append({"images": metrics[-1]["images_seen"],
                                 "seconds": sum(m["step_time_s"] for m in metrics),  # training steps only
                                 "gain": float(gain.mean()),
                                 "se": float(gain.std() / math.sqrt(len(gain))) if len(gain) > 1 else 0.0})
    return {**analyse_fixed_noise(curves), "base_reward": float(base.mean()), "images_per_point": len(base)}


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------
def compare(config: CompareConfig) -> dict:
    """Train both methods at the same image budget, evaluate both, write compare.json and compare.md."""
    from alignprop.ddpo import train_ddpo
    from alignprop.evaluate import evaluate
    from alignprop.report import read_curve
    from alignprop.train import train

    trained = train_configs(config)
    evaluation = eval_config(config, trained)  # bad evaluation settings fail before any training
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_config.json").write_text(config.to_json())
    for name, c in trained.items():
        logger.info("training %s for %d steps (%d images)", name, c.num_steps, config.budget_images)
        (train_ddpo if name == "ddpo" else train)(c)
    runs = curve_configs(config, trained)
    for name, configs in runs.items():
        for c in configs[:-1]:  # the last is the full-budget run, trained above
            logger.info("training %s for %d steps (fixed-noise curve point)", name, c.num_steps)
            (train_ddpo if name == "ddpo" else train)(c)
    curves = {name: read_curve(Path(c.output_dir) / "metrics.jsonl") for name, c in trained.items()}
    summary = analyse(curves, config.smoothing)
    if runs:
        summary["fixed_noise"] = fixed_noise_curves(runs, evaluation)
    metrics = evaluate(evaluation)
    for name in METHODS:
        summary[name]["eval"] = _eval_summary(metrics["models"][name])
    summary["base_eval"] = _eval_summary(metrics["models"]["base"])
    summary["budget_images"] = config.budget_images
    summary["reward"] = trained["alignprop"].reward
    summary["configs"] = {name: c.to_dict() for name, c in trained.items()}
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(summary, metrics))
    logger.info("comparison written to %s", out)
    return summary


def _eval_summary(entry: dict) -> dict:
    result = {"rewards": {k: v["mean"] for k, v in entry["rewards"].items()},
              "rewards_ci95": {k: v["ci95"] for k, v in entry["rewards"].items()}}
    for key in ("fid", "fid_drift"):
        if key in entry:
            result[key] = entry[key]
    if "world" in entry:
        result["world"] = {k: entry["world"][k] for k in ("count_accuracy", "color_accuracy", "count_mae")}
    return result


def markdown(summary: dict, metrics: dict) -> str:
    """A table for docs: held-out results per model, then the budget/efficiency figures."""
    def num(x, digits=4):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"

    reward = summary["reward"]
    lines = [f"Reward `{reward}`, budget {summary['budget_images']} sampled images per method; held-out evaluation "
             f"on {metrics['images_per_model']} images per model ({len(metrics['prompts'])} prompts x "
             f"{len(metrics['seeds'])} seeds).", "",
             "| model | held-out reward (95% CI) | FID drift | count acc. | train images | train time (s) | final train reward |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("base", *METHODS):
        e = summary["base_eval"] if name == "base" else summary[name]["eval"]
        ci = e["rewards_ci95"][reward]
        t = summary.get(name, {})
        lines.append(f"| {name} | {num(e['rewards'][reward])} [{num(ci[0])}, {num(ci[1])}] | {num(e.get('fid_drift'))} "
                     f"| {num(e.get('world', {}).get('count_accuracy'), 3)} | {t.get('images', 0)} "
                     f"| {num(t.get('wall_time_s'), 3)} | {num(t.get('final_train_reward'))} |")
    e = summary["efficiency"]
    if e["ddpo_over_alignprop_images_seen"] is None:
        stalled = " and ".join(e["no_progress"])
        lines += ["", f"No common level: {stalled} ended no higher than it started (smoothed training reward "
                  + ", ".join(f"{m} {num(e['start'][m])} -> {num(summary[m]['final_train_reward'])}" for m in METHODS)
                  + "), so there is no reward both methods reached by training; the bounds below apply."]
    else:
        lines += ["", f"To reach the common training reward {num(e['common_target'])} (the lower of the two final "
                  f"rewards, smoothed): AlignProp {e['alignprop']['images_seen']} images / "
                  f"{num(e['alignprop']['wall_time_s'], 3)} s, DDPO {e['ddpo']['images_seen']} images / "
                  f"{num(e['ddpo']['wall_time_s'], 3)} s: DDPO needed {num(e['ddpo_over_alignprop_images_seen'], 3)}x "
                  f"the images and {num(e['ddpo_over_alignprop_wall_time_s'], 3)}x the wall time of AlignProp."]
    for name, other in (("alignprop", "ddpo"), ("ddpo", "alignprop")):
        hit = summary[name][f"to_reach_{other}_final"]
        where = f"after {hit['images_seen']} images ({num(hit['wall_time_s'], 3)} s)" if hit else "not within the budget"
        lines.append(f"- {name} reached {other}'s final training reward: {where}.")
    for key in ("images_seen", "wall_time_s"):
        for name, other in (("ddpo", "alignprop"), ("alignprop", "ddpo")):
            bound = e.get(f"{name}_over_{other}_{key}_lower_bound")
            if bound is not None:
                lines.append(f"- {name} / {other} {key.replace('_', ' ')} to reach {other}'s final reward: more than "
                             f"{num(bound, 3)}x (not reached within the budget).")
    if "fixed_noise" in summary:
        lines += ["", *fixed_noise_markdown(summary["fixed_noise"], reward)]
    return "\n".join(lines) + "\n"


def fixed_noise_markdown(f: dict, reward: str) -> list[str]:
    lines = [f"Fixed-noise curves: gain in `{reward}` over the base on the same {f['images_per_point']} images "
             f"(base {f['base_reward']:.4g}), paired; seconds are training steps only.", "",
             "| method | images | train time (s) | gain +- SE |", "| --- | --- | --- | --- |"]
    for name in METHODS:
        lines += [f"| {name} | {p['images']} | {p['seconds']:.3g} | {p['gain']:+.4f} +- {p['se']:.4f} |"
                  for p in f["curves"][name]]
    if f["no_common_level"]:
        lines += ["", f"No common level: {f['level_from']}'s final gain ({f['level']:+.4f} +- {f['level_se']:.4f}) is "
                  "within two standard errors of zero."]
    else:
        lines += ["", f"To reach {f['level']:+.4f} ({f['level_from']}'s final gain, the lower of the two; "
                  f"interpolated): AlignProp {f['alignprop']['images']:.3g} images / "
                  f"{f['alignprop']['seconds']:.3g} s, "
                  f"DDPO {f['ddpo']['images']:.3g} images / {f['ddpo']['seconds']:.3g} s: DDPO needed "
                  f"**{f['ddpo_over_alignprop_images']:.3g}x the images and {f['ddpo_over_alignprop_seconds']:.3g}x "
                  "the training time** of AlignProp."]
    return lines
