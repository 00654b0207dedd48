"""The main pipeline: validate -> prepare prompts, cache models -> train AlignProp (and, optionally, the DDPO
baseline in parallel) -> evaluate -> register with the promotion gate.

Defaults are for Stable Diffusion 1.5 on one GPU (the `sd15` preset: AlignProp's published settings).
`alignprop pipeline run --local` runs it through kfp.local on the CPU with the tiny world model.
"""

from typing import NamedTuple, Optional

from kfp import dsl

from components import cache_models, evaluate, prepare_prompts, register_model, train_alignprop, train_ddpo, \
    validate_inputs
from pipelines.cluster import ClusterSettings, place

Outputs = NamedTuple("Outputs", [("model_version", str), ("model_uri", str), ("promoted", bool), ("report_uri", str)])


def build(settings: Optional[ClusterSettings] = None):
    """The pipeline function for these cluster settings (compile-time constants)."""
    settings = settings or ClusterSettings()

    @dsl.pipeline(name="alignprop", description="Align a diffusion model to a reward by reward backpropagation "
                                                "(AlignProp), evaluate it and register it in MLflow.")
    def alignprop_pipeline(
        base_model: str = "runwayml/stable-diffusion-v1-5",
        base_revision: str = "",
        prompts: str = "simple_animals",
        eval_prompts: str = "eval_animals",
        eval_fraction: float = 0.2,
        reward: str = "aesthetic",
        reward_weights: str = "s3://alignprop/reward-weights",
        num_steps: int = 100,
        learning_rate: float = 1e-3,
        preset: str = "sd15",
        config_overrides: str = "{}",
        run_ddpo: bool = False,
        nodes: int = 1,
        procs_per_node: int = 1,
        eval_rewards: str = "",
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
        runs_uri: str = "s3://alignprop/runs",
    ) -> Outputs:
        """Train, evaluate and register a LoRA adapter aligned to a reward.

        Args:
            base_model: Base model: a hub id (pin it with base_revision), a cache manifest, or "world" (tiny CPU model).
            base_revision: Hub commit of the base model; empty for the default branch.
            prompts: Training prompts: a built-in set (simple_animals, object_count, general, world_counts) or a .txt/.jsonl/.csv file (s3:// or local).
            eval_prompts: Evaluation prompts (a set or file, disjoint from training); empty to hold out eval_fraction of the training prompts.
            eval_fraction: Share of the training prompts held out for evaluation when eval_prompts is empty.
            reward: Reward to maximise: a name (aesthetic, hpsv2, pickscore, ...) or a weighted mix such as "aesthetic:1.0,hpsv2:0.5".
            reward_weights: Where the learned rewards' weights are: a published s3:// prefix, cache manifest or directory; empty if the reward needs none.
            num_steps: Optimizer steps of AlignProp (and of DDPO).
            learning_rate: AdamW learning rate of the LoRA weights.
            preset: Config preset the other values are applied over: sd15 (50 DDIM steps, K ~ U[5, 15], fp16) or tiny.
            config_overrides: JSON object of further TrainConfig fields, e.g. {"lora_rank": 8, "truncation_max": 10}.
            run_ddpo: Also train the DDPO policy-gradient baseline with the same budget, in parallel, and compare it in the report.
            nodes: Training nodes; more than 1 runs a Kubeflow Trainer TrainJob (outputs go to runs_uri).
            procs_per_node: Training processes per node, one per GPU.
            eval_rewards: Comma-separated rewards measured in evaluation; empty for the training reward.
            images_per_prompt: Images generated per evaluation prompt and model.
            eval_seed: Seed of the evaluation noise, shared by every model compared.
            fid_reference: FID reference: "base" (the base model's own samples, so FID measures drift), a directory of real images, or empty for no FID.
            fid_extractor: FID features: a CLIP/DINOv2 directory name under reward_weights (the aesthetic reward's clip-vit-large-patch14), a directory, inception, or auto.
            model_name: Registered model name in MLflow.
            gate: Promote the new version to the first stage only if it beats the current holder.
            gate_margin: Reward improvement over the current holder the gate requires.
            max_fid_drift: Largest FID increase over the base model the gate allows; negative to skip the FID check.
            tracking_uri: MLflow tracking URI; empty to use MLFLOW_TRACKING_URI from the alignprop-mlflow secret.
            cache_root: Model cache root (s3://bucket/prefix, or a directory for local runs).
            runs_uri: s3:// prefix where multi-node TrainJobs publish their runs.
        """
        checked = place(validate_inputs(
            preset=preset, base_model=base_model, prompts=prompts, eval_prompts=eval_prompts, reward=reward,
            num_steps=num_steps, learning_rate=learning_rate, config_overrides=config_overrides, nodes=nodes,
            procs_per_node=procs_per_node, run_ddpo=run_ddpo, tracking_uri=tracking_uri,
            accelerators_per_pod=settings.accelerator_limit), settings)
        checked.set_display_name("validate inputs")
        prompt_sets = place(prepare_prompts(source=prompts, eval_source=eval_prompts, eval_fraction=eval_fraction,
                                            seed=0), settings, retry=True).after(checked)
        cached = place(cache_models(base_model=base_model, base_revision=base_revision,
                                    reward_weights=reward_weights, cache_root=cache_root), settings,
                       hub=True, retry=True).after(checked)
        training = dict(config_json=checked.outputs["config_json"], base_model_ref=cached.outputs["base_model_ref"],
                        reward_weights_ref=cached.outputs["reward_weights_ref"],
                        train_prompts=prompt_sets.outputs["train_prompts"], nodes=nodes,
                        procs_per_node=procs_per_node, runs_uri=runs_uri, trainjob_json=settings.trainjob_json(),
                        timeout_s=settings.train_timeout_s,
                        step_accelerators=checked.outputs["train_step_accelerators"],
                        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)

        def train_evaluate_register(with_ddpo: bool):
            """One branch: AlignProp (and DDPO beside it, in parallel) -> evaluate -> register."""
            # a train step that only waits for a multi-node TrainJob holds no accelerator itself
            step_gpus = training["step_accelerators"]
            aligned = place(train_alignprop(**training), settings, gpu=True, mlflow=True, accelerators=step_gpus)
            aligned.set_display_name("train AlignProp")
            extra = {}
            if with_ddpo:
                baseline = place(train_ddpo(**training), settings, gpu=True, mlflow=True, accelerators=step_gpus)
                baseline.set_display_name("train DDPO baseline")
                extra["ddpo_adapter"] = baseline.outputs["adapter"]
            evaluated = place(evaluate(
                base_model_ref=cached.outputs["base_model_ref"],
                reward_weights_ref=cached.outputs["reward_weights_ref"],
                alignprop_adapter=aligned.outputs["adapter"], eval_prompts=prompt_sets.outputs["eval_prompts"],
                rewards=eval_rewards, images_per_prompt=images_per_prompt, seed=eval_seed,
                fid_reference=fid_reference, fid_extractor=fid_extractor, **extra),
                settings, gpu=True, mlflow=True)
            registered = place(register_model(
                adapter=aligned.outputs["adapter"], eval_metrics=evaluated.outputs["eval_metrics"],
                model_name=model_name, tracking_uri=tracking_uri, gate=gate, gate_margin=gate_margin,
                max_fid_drift=max_fid_drift, primary_reward="",
                pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), settings, mlflow=True)
            registered.set_caching_options(False)  # every run registers a version
            return evaluated, registered

        # dsl.If, not a Python if: the branch is chosen at run time from the run_ddpo parameter
        with dsl.If(run_ddpo == True, name="with-ddpo-baseline"):  # noqa: E712
            evaluated_both, registered_both = train_evaluate_register(with_ddpo=True)
        with dsl.Else(name="alignprop-only"):
            evaluated_one, registered_one = train_evaluate_register(with_ddpo=False)
        return Outputs(model_version=dsl.OneOf(registered_both.outputs["version"], registered_one.outputs["version"]),
                       model_uri=dsl.OneOf(registered_both.outputs["model_uri"], registered_one.outputs["model_uri"]),
                       promoted=dsl.OneOf(registered_both.outputs["promoted"], registered_one.outputs["promoted"]),
                       report_uri=dsl.OneOf(evaluated_both.outputs["report_uri"],
                                            evaluated_one.outputs["report_uri"]))

    return alignprop_pipeline


alignprop_pipeline = build()
