"""The sweep pipeline: one training run per (learning rate, truncation K, reward mix), at most
`ClusterSettings.sweep_parallelism` at once; every trial is evaluated on the same prompts and seed; the trial with
the best `selection_reward` is registered (with the gate)."""

from typing import NamedTuple, Optional

from kfp import dsl

from components import cache_models, evaluate, make_trials, prepare_prompts, register_model, select_best, \
    train_alignprop, validate_inputs
from pipelines.cluster import ClusterSettings, place

Outputs = NamedTuple("Outputs", [("model_version", str), ("model_uri", str)])


def build(settings: Optional[ClusterSettings] = None):
    settings = settings or ClusterSettings()

    @dsl.pipeline(name="alignprop-sweep", description="Sweep AlignProp's learning rate, truncation K and reward "
                                                      "weights; evaluate every trial; register the best.")
    def alignprop_sweep(
        base_model: str = "runwayml/stable-diffusion-v1-5",
        base_revision: str = "",
        prompts: str = "simple_animals",
        eval_prompts: str = "eval_animals",
        reward_weights: str = "s3://alignprop/reward-weights",
        learning_rates: list = [3e-4, 1e-3],
        truncation_ks: list = [1, 5],
        rewards: list = ["aesthetic:1.0", "aesthetic:1.0,hpsv2:0.5"],
        selection_reward: str = "aesthetic",
        num_steps: int = 100,
        preset: str = "sd15",
        config_overrides: str = "{}",
        images_per_prompt: int = 4,
        eval_seed: int = 1234,
        fid_reference: str = "base",
        fid_extractor: str = "clip-vit-large-patch14",
        model_name: str = "alignprop-sd15",
        gate: bool = True,
        gate_margin: float = 0.0,
        max_fid_drift: float = 10.0,
        tracking_uri: str = "",
        cache_root: str = "s3://alignprop/cache",
    ) -> Outputs:
        """Sweep learning rate x truncation K x reward mix, evaluate every trial, register the best one.

        Args:
            base_model: Base model: a hub id (pin it with base_revision), a cache manifest, or "world" (tiny CPU model).
            base_revision: Hub commit of the base model; empty for the default branch.
            prompts: Training prompts: a built-in set or a .txt/.jsonl/.csv file (s3:// or local).
            eval_prompts: Evaluation prompts, the same for every trial.
            reward_weights: Where the learned rewards' weights are (published s3:// prefix, cache manifest or directory).
            learning_rates: AdamW learning rates to try.
            truncation_ks: Truncation K values to try (the last K denoising steps keep their graph).
            rewards: Reward mixes to train on, e.g. "aesthetic:1.0,hpsv2:0.5".
            selection_reward: Reward every trial is evaluated on and ranked by.
            num_steps: Optimizer steps per trial.
            preset: Config preset the other values are applied over: sd15 or tiny.
            config_overrides: JSON object of further TrainConfig fields, applied to every trial.
            images_per_prompt: Images generated per evaluation prompt and trial.
            eval_seed: Seed of the evaluation noise, shared by every trial.
            fid_reference: FID reference: "base" (the base model's own samples, so FID measures drift), a directory of real images, or empty for no FID.
            fid_extractor: FID features: a CLIP/DINOv2 directory name under reward_weights (the aesthetic reward's clip-vit-large-patch14), a directory, inception, or auto.
            model_name: Registered model name in MLflow.
            gate: Promote the best trial to the first stage only if it beats the current holder.
            gate_margin: Reward improvement over the current holder the gate requires.
            max_fid_drift: Largest FID increase over the base model the gate allows; negative to skip the FID check.
            tracking_uri: MLflow tracking URI; empty to use MLFLOW_TRACKING_URI from the alignprop-mlflow secret.
            cache_root: Model cache root (s3://bucket/prefix, or a directory for local runs).
        """
        checked = place(validate_inputs(
            preset=preset, base_model=base_model, prompts=prompts, eval_prompts=eval_prompts,
            reward=selection_reward, num_steps=num_steps, learning_rate=1e-3, config_overrides=config_overrides,
            nodes=1, procs_per_node=1, run_ddpo=False, tracking_uri=tracking_uri,
            accelerators_per_pod=settings.accelerator_limit), settings)
        checked.set_display_name("validate inputs")
        trials = place(make_trials(config_json=checked.outputs["config_json"], learning_rates=learning_rates,
                                   truncation_ks=truncation_ks, rewards=rewards), settings)
        prompt_sets = place(prepare_prompts(source=prompts, eval_source=eval_prompts, eval_fraction=0.0, seed=0),
                            settings, retry=True).after(checked)
        cached = place(cache_models(base_model=base_model, base_revision=base_revision,
                                    reward_weights=reward_weights, cache_root=cache_root), settings,
                       hub=True, retry=True).after(checked)
        with dsl.ParallelFor(trials.output, parallelism=settings.sweep_parallelism, name="trials") as trial:
            trained = place(train_alignprop(
                config_json=trial, base_model_ref=cached.outputs["base_model_ref"],
                reward_weights_ref=cached.outputs["reward_weights_ref"],
                train_prompts=prompt_sets.outputs["train_prompts"], nodes=1, procs_per_node=1, runs_uri="",
                trainjob_json="{}", timeout_s=settings.train_timeout_s,
                step_accelerators=settings.accelerator_limit, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                settings, gpu=True, mlflow=True)
            evaluated = place(evaluate(
                base_model_ref=cached.outputs["base_model_ref"],
                reward_weights_ref=cached.outputs["reward_weights_ref"],
                alignprop_adapter=trained.outputs["adapter"], eval_prompts=prompt_sets.outputs["eval_prompts"],
                rewards=selection_reward, images_per_prompt=images_per_prompt, seed=eval_seed,
                fid_reference=fid_reference, fid_extractor=fid_extractor), settings, gpu=True)
        best = place(select_best(adapters=dsl.Collected(trained.outputs["adapter"]),
                                 evaluations=dsl.Collected(evaluated.outputs["eval_metrics"]),
                                 selection_reward=selection_reward), settings)
        registered = place(register_model(
            adapter=best.outputs["best_adapter"], eval_metrics=best.outputs["best_eval"], model_name=model_name,
            tracking_uri=tracking_uri, gate=gate, gate_margin=gate_margin, max_fid_drift=max_fid_drift,
            primary_reward=selection_reward, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), settings, mlflow=True)
        registered.set_caching_options(False)
        return Outputs(model_version=registered.outputs["version"], model_uri=registered.outputs["model_uri"])

    return alignprop_sweep


alignprop_sweep = build()
