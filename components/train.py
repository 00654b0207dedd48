"""Train AlignProp, and the DDPO baseline: in the step's pod (one node) or as a Kubeflow Trainer TrainJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_alignprop(config_json: str, base_model_ref: str, reward_weights_ref: str, train_prompts: Input[Dataset],
                    nodes: int, procs_per_node: int, runs_uri: str, trainjob_json: str, timeout_s: int,
                    step_accelerators: int, pipeline_run_id: str, adapter: Output[Model],
                    metrics: Output[Metrics]):
    """Train a LoRA adapter by reward backpropagation; the run directory (adapter, config.json, metrics.jsonl)
    becomes the `adapter` artifact.

    Args:
        config_json: the validated TrainConfig.
        base_model_ref: cache manifest URI of the base model.
        reward_weights_ref: cache manifest URI of the reward weights; empty when none.
        train_prompts: prompts to train on (JSONL).
        nodes: 1 trains in this pod; more submits a TrainJob.
        procs_per_node: processes per node (one per GPU).
        runs_uri: s3:// prefix where a TrainJob publishes its run.
        trainjob_json: JSON of further TrainJob settings (image, accelerators, node selector, tolerations).
        timeout_s: how long to wait for a TrainJob.
        step_accelerators: accelerators of this step's pod (0 when it only waits for a TrainJob).
        pipeline_run_id: the KFP run, recorded on the MLflow run.
    """
    import logging
    import os

    from alignprop.launch import pipeline_train_step

    logging.basicConfig(level=logging.INFO)
    logging.info("%d node(s) x %d process(es); this pod holds %d accelerator(s)", nodes, procs_per_node,
                 step_accelerators)
    config, summary = pipeline_train_step("alignprop", config_json, base_model_ref, reward_weights_ref,
                                          os.path.join(train_prompts.path, "prompts.jsonl"), adapter.path, nodes,
                                          procs_per_node, runs_uri, trainjob_json, timeout_s, pipeline_run_id)
    for name, value in summary.items():
        if value is not None:
            metrics.log_metric(name, value)
    adapter.metadata.update({"method": "alignprop", "reward": config.reward, "base_model": config.pretrained_model})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_ddpo(config_json: str, base_model_ref: str, reward_weights_ref: str, train_prompts: Input[Dataset],
               nodes: int, procs_per_node: int, runs_uri: str, trainjob_json: str, timeout_s: int,
               step_accelerators: int, pipeline_run_id: str, adapter: Output[Model],
               metrics: Output[Metrics]):
    """Train the DDPO baseline (policy gradient, arXiv 2305.13301) with the same model, prompts, reward and
    number of steps, at DDPO's published sampler and learning-rate settings.

    Args:
        config_json: the validated TrainConfig (AlignProp's; DDPO's paper settings are applied over it).
        base_model_ref: cache manifest URI of the base model.
        reward_weights_ref: cache manifest URI of the reward weights; empty when none.
        train_prompts: prompts to train on (JSONL).
        nodes: 1 trains in this pod; more submits a TrainJob.
        procs_per_node: processes per node (one per GPU).
        runs_uri: s3:// prefix where a TrainJob publishes its run.
        trainjob_json: JSON of further TrainJob settings (image, accelerators, node selector, tolerations).
        timeout_s: how long to wait for a TrainJob.
        step_accelerators: accelerators of this step's pod (0 when it only waits for a TrainJob).
        pipeline_run_id: the KFP run, recorded on the MLflow run.
    """
    import logging
    import os

    from alignprop.launch import pipeline_train_step

    logging.basicConfig(level=logging.INFO)
    logging.info("%d node(s) x %d process(es); this pod holds %d accelerator(s)", nodes, procs_per_node,
                 step_accelerators)
    config, summary = pipeline_train_step("ddpo", config_json, base_model_ref, reward_weights_ref,
                                          os.path.join(train_prompts.path, "prompts.jsonl"), adapter.path, nodes,
                                          procs_per_node, runs_uri, trainjob_json, timeout_s, pipeline_run_id)
    for name, value in summary.items():
        if value is not None:
            metrics.log_metric(name, value)
    adapter.metadata.update({"method": "ddpo", "reward": config.reward, "base_model": config.pretrained_model})
