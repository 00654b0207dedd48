"""Register the adapter as an MLflow model version (alias `candidate`) and run the promotion gate; for sweeps, pick
the best trial first."""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_model(adapter: Input[Model], eval_metrics: Input[Artifact], model_name: str, tracking_uri: str,
                   gate: bool, gate_margin: float, max_fid_drift: float, primary_reward: str, pipeline_run_id: str,
                   metrics: Output[Metrics]) -> NamedTuple("Registered", [("version", str), ("model_uri", str),
                                                                          ("promoted", bool)]):
    """Log the adapter with its evaluation as a new version of `model_name`; with `gate`, promote it to the
    first stage only if it beats the current holder.

    Args:
        adapter: the trained run directory.
        eval_metrics: metrics.json of the evaluation.
        model_name: registered model name.
        tracking_uri: MLflow tracking URI; empty for $MLFLOW_TRACKING_URI.
        gate: whether to run the promotion gate.
        gate_margin: reward improvement over the incumbent the gate requires.
        max_fid_drift: largest FID drift the gate allows; negative to skip the FID check.
        primary_reward: reward the gate compares; empty for the training reward.
        pipeline_run_id: the KFP run, recorded on the registration's MLflow run.
    """
    import logging
    import os
    from collections import namedtuple

    from alignprop.registry import GatePolicy, register_adapter

    logging.basicConfig(level=logging.INFO)
    os.environ["ALIGNPROP_PIPELINE_RUN_ID"] = pipeline_run_id
    max_drift = float("inf") if max_fid_drift < 0 else max_fid_drift  # KFP parameters cannot be infinite
    policy = GatePolicy(primary_reward=primary_reward or None, margin=gate_margin, max_fid_drift=max_drift)
    metrics_file = os.path.join(eval_metrics.path, "metrics.json")
    result = register_adapter(adapter.path, model_name, tracking_uri=tracking_uri or None, eval_metrics=metrics_file,
                              model_key="alignprop", primary_reward=primary_reward or None, gate=gate,
                              policy=policy)
    promoted = bool(result.decision and result.decision.promoted)
    print(f"registered {result.name} version {result.version} ({result.model_uri})")
    if result.decision is not None:
        print(f"gate: {'promoted to ' + result.decision.stage if promoted else 'not promoted'}: "
              f"{result.decision.reason}")
    metrics.log_metric("version", int(result.version))
    metrics.log_metric("promoted", int(promoted))
    Registered = namedtuple("Registered", ["version", "model_uri", "promoted"])
    return Registered(str(result.version), result.model_uri, promoted)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def select_best(adapters: Input[List[Model]], evaluations: Input[List[Artifact]], selection_reward: str,
                best_adapter: Output[Model], best_eval: Output[Artifact], leaderboard: Output[HTML],
                metrics: Output[Metrics]):
    """Pick the sweep trial whose evaluated `selection_reward` is highest; copy its run and evaluation.

    Args:
        adapters: every trial's run directory.
        evaluations: every trial's evaluation (same order).
        selection_reward: reward the trials are ranked by (all trials are evaluated on it).
    """
    import html
    import json
    import os
    import shutil

    from alignprop.errors import UserError
    from alignprop.registry import read_eval_metrics

    rows = []
    for adapter, evaluation in zip(adapters, evaluations):
        summary = read_eval_metrics(os.path.join(evaluation.path, "metrics.json"), "alignprop")
        if selection_reward not in summary.rewards:
            raise UserError(f"trial {adapter.path} was not evaluated on {selection_reward!r} (it has "
                            f"{sorted(summary.rewards)}); add it to the evaluation rewards")
        with open(os.path.join(adapter.path, "config.json")) as f:
            config = json.load(f)
        rows.append((summary.rewards[selection_reward]["mean"], summary.fid_drift, config, adapter, evaluation))
    rows.sort(key=lambda row: row[0], reverse=True)
    score, drift, config, adapter, evaluation = rows[0]
    shutil.copytree(adapter.path, best_adapter.path, dirs_exist_ok=True)
    shutil.copytree(evaluation.path, best_eval.path, dirs_exist_ok=True)
    best_adapter.metadata.update({"learning_rate": config["learning_rate"], "truncation_k": config["truncation_k"],
                                  "reward": config["reward"], selection_reward: score})
    metrics.log_metric(f"best_{selection_reward}", score)
    metrics.log_metric("trials", len(rows))
    cells = "".join(
        f"<tr><td>{rank}</td><td>{s:.4f}</td><td>{'' if d is None else f'{d:.2f}'}</td><td>{c['learning_rate']:g}</td>"
        f"<td>{c['truncation_k']}</td><td>{html.escape(c['reward'])}</td></tr>"
        for rank, (s, d, c, _, _) in enumerate(rows, 1))
    with open(leaderboard.path, "w") as f:
        f.write(f"<html><body><h2>Sweep leaderboard ({html.escape(selection_reward)})</h2><table border=1>"
                f"<tr><th>rank</th><th>{html.escape(selection_reward)}</th><th>FID drift</th><th>learning rate</th>"
                f"<th>K</th><th>reward</th></tr>{cells}</table></body></html>")
