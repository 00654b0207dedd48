"""The first step of every DAG: check all parameters before any work, and resolve the training config."""

from typing import NamedTuple

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_inputs(preset: str, base_model: str, prompts: str, eval_prompts: str, reward: str, num_steps: int,
                    learning_rate: float, config_overrides: str, nodes: int, procs_per_node: int, run_ddpo: bool,
                    tracking_uri: str, accelerators_per_pod: int) -> NamedTuple(
                        "Checked", [("config_json", str), ("train_step_accelerators", int)]):
    """Check every parameter and return the resolved TrainConfig as JSON; raise, naming the parameter and the
    fix, on bad input (nodes < 1, an unknown reward, an empty prompt set, an invalid config value). Also returns
    the accelerators the train step's own pod needs: none when it only waits for a multi-node TrainJob.

    Args:
        preset: config preset the other values are applied over (sd15 or tiny).
        base_model: base model (hub id, directory, cache manifest, or "world").
        prompts: training prompt set (built-in name or file, local or s3://).
        eval_prompts: evaluation prompt set; empty to hold out part of the training prompts.
        reward: reward name or weighted mix such as "aesthetic:1.0,hpsv2:0.5".
        num_steps: optimizer steps.
        learning_rate: AdamW learning rate.
        config_overrides: JSON object of further TrainConfig fields.
        nodes: training nodes (more than 1: a Kubeflow Trainer TrainJob).
        procs_per_node: training processes per node (one per GPU).
        run_ddpo: whether the DDPO baseline is trained too.
        tracking_uri: MLflow tracking URI; empty for $MLFLOW_TRACKING_URI.
        accelerators_per_pod: accelerators a training pod gets (the cluster settings').
    """
    import json
    import logging
    from collections import namedtuple

    from alignprop.config import PRESETS, ConfigError, update
    from alignprop.prompts import read_prompts
    from alignprop.rewards import parse_mix

    logging.basicConfig(level=logging.INFO)
    if nodes < 1:
        raise ConfigError(f"invalid nodes={nodes}: must be at least 1 (1 trains in the step's own pod)")
    if procs_per_node < 1:
        raise ConfigError(f"invalid procs_per_node={procs_per_node}: must be at least 1 (one per GPU)")
    if preset not in PRESETS:
        raise ConfigError(f"invalid preset={preset!r}: use one of {', '.join(PRESETS)}")
    try:
        overrides = json.loads(config_overrides or "{}")
    except json.JSONDecodeError as e:
        raise ConfigError(f"config_overrides is not a JSON object: {e}") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"config_overrides must be a JSON object of TrainConfig fields, got {config_overrides!r}")
    values = {"pretrained_model": base_model, "prompts": prompts, "reward": reward, "num_steps": num_steps,
              "learning_rate": learning_rate, "tracking_uri": tracking_uri or None}
    config = update(update(PRESETS[preset](), values), overrides).validate()
    parse_mix(config.reward)  # unknown reward names fail here
    for source in filter(None, (config.prompts, eval_prompts)):
        report = read_prompts(source)  # an empty or unreadable set fails here
        print(f"prompts {source}: {report.summary()}")
    if run_ddpo:
        from alignprop.ddpo import PAPER_DEFAULTS, validate_ddpo

        validate_ddpo(update(config, {"method": "ddpo", **PAPER_DEFAULTS}))
    print(f"config: {config.to_json()}")
    Checked = namedtuple("Checked", ["config_json", "train_step_accelerators"])
    return Checked(config.to_json(), accelerators_per_pod if nodes == 1 else 0)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def make_trials(config_json: str, learning_rates: list, truncation_ks: list, rewards: list) -> list:
    """The sweep grid: one TrainConfig JSON per (learning rate, truncation K, reward mix), each validated.

    Args:
        config_json: the validated base config.
        learning_rates: AdamW learning rates to try.
        truncation_ks: K values (the last K denoising steps keep their graph) to try.
        rewards: reward mixes to try, e.g. "aesthetic:1.0,hpsv2:0.5".
    """
    import itertools

    from alignprop.config import ConfigError, TrainConfig, update
    from alignprop.rewards import parse_mix

    if not (learning_rates and truncation_ks and rewards):
        raise ConfigError("the sweep needs at least one learning rate, one truncation K and one reward")
    base = TrainConfig.from_json(config_json)
    trials = []
    for lr, k, reward in itertools.product(learning_rates, truncation_ks, rewards):
        parse_mix(reward)
        trial = update(base, {"learning_rate": float(lr), "truncation": "fixed", "truncation_k": int(k),
                              "reward": reward}).validate()
        trials.append(trial.to_json())
    print(f"{len(trials)} trials")
    return trials
