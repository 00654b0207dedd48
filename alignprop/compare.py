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
        per_step = c.ddpo_samples_per_step if name == "ddpo" else c.train_batch_size * c.gradient_accumulation_steps
        steps = config.budget_images // per_step
        if steps < 1:
            raise ConfigError(f"budget_images={config.budget_images} is less than one {name} step ({per_step} images); "
                              "raise the budget")
        configs[name] = update(c, {"num_steps": steps}).validate()
    validate_ddpo(configs["ddpo"])
    from alignprop.rewards import REWARDS, parse_mix

    if not all(REWARDS[name].differentiable for name, _ in parse_mix(configs["alignprop"].reward)):
        raise ConfigError(f"reward {configs['alignprop'].reward!r} is not differentiable: AlignProp cannot train on "
                          "it, so there is nothing to compare; pick a differentiable reward (alignprop rewards list)")
    return configs


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
    curves = {name: read_curve(Path(c.output_dir) / "metrics.jsonl") for name, c in trained.items()}
    summary = analyse(curves, config.smoothing)
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
    return "\n".join(lines) + "\n"
