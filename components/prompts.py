"""Prepare prompts: validate a prompt source and write the train and eval sets (JSONL with stable ids)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_prompts(source: str, eval_source: str, eval_fraction: float, seed: int, train_prompts: Output[Dataset],
                    eval_prompts: Output[Dataset], metrics: Output[Metrics]):
    """Write the training prompts and the evaluation prompts (a separate set, or a seeded held-out part), each as
    prompts.jsonl in its artifact directory.

    Args:
        source: training prompt set (built-in name or file, local or s3://).
        eval_source: evaluation prompt set; empty to hold out eval_fraction of the training prompts.
        eval_fraction: share of prompts held out for evaluation when eval_source is empty.
        seed: seed of the split.
    """
    import logging
    import os

    from alignprop.prompts import prepare

    logging.basicConfig(level=logging.INFO)
    # each artifact is a directory holding prompts.jsonl: the file's suffix tells readers its format
    train_file, eval_file = (os.path.join(a.path, "prompts.jsonl") for a in (train_prompts, eval_prompts))
    if eval_source:
        train = prepare(source, train_file)
        held_out = prepare(eval_source, eval_file)
        n_train, n_eval = train.train, held_out.train
    else:
        train = prepare(source, train_file, eval_file, eval_fraction, seed)
        n_train, n_eval = train.train, train.eval
    metrics.log_metric("train_prompts", n_train)
    metrics.log_metric("eval_prompts", n_eval)
    train_prompts.metadata["prompts"] = n_train
    eval_prompts.metadata["prompts"] = n_eval
