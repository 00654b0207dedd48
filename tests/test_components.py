"""The KFP components' Python functions, called directly (no KFP runtime): validation of pipeline inputs, the sweep
grid, prompts, the model cache, the best-trial selection."""

import json
import sys

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

import helpers

sys.path.insert(0, str(helpers.ROOT))  # components/ sits next to alignprop/ in the checkout

from components import cache_models, make_trials, prepare_prompts, select_best, validate_inputs  # noqa: E402

from alignprop.config import ConfigError, TrainConfig  # noqa: E402
from alignprop.errors import UserError  # noqa: E402


def inputs(**overrides) -> dict:
    values = dict(preset="tiny", base_model="world", prompts="world_counts", eval_prompts="world_heldout",
                  reward="world_count", num_steps=3, learning_rate=1e-3, config_overrides='{"lora_rank": 2}',
                  nodes=1, procs_per_node=1, run_ddpo=True, tracking_uri="", accelerators_per_pod=4)
    values.update(overrides)
    return values


def test_validate_resolves_the_config_and_the_train_step_accelerators():
    checked = validate_inputs.python_func(**inputs())
    config = TrainConfig.from_json(checked.config_json)
    assert (config.num_steps, config.lora_rank, config.reward, config.pretrained_model) == (3, 2, "world_count",
                                                                                             "world")
    assert config.tracking_uri is None  # empty: $MLFLOW_TRACKING_URI decides
    assert checked.train_step_accelerators == 4  # one node: the step's pod trains
    assert validate_inputs.python_func(**inputs(nodes=3)).train_step_accelerators == 0  # it only waits for a TrainJob


@pytest.mark.parametrize("overrides, error, message", [
    (dict(nodes=0), ConfigError, "invalid nodes=0"),
    (dict(reward="beauty"), UserError, "beauty"),
    (dict(prompts="EMPTY"), UserError, "no prompts"),
    (dict(eval_prompts="EMPTY"), UserError, "no prompts"),
    (dict(config_overrides="[1, 2]"), ConfigError, "must be a JSON object"),
    (dict(config_overrides='{"num_stepz": 1}'), ConfigError, "unknown config key"),
    (dict(preset="sdxl"), ConfigError, "invalid preset='sdxl'"),
    (dict(config_overrides='{"ddpo_samples_per_step": 3}'), ConfigError, "must be a multiple of train_batch_size"),
])
def test_validate_rejects_bad_inputs_with_a_clear_message(tmp_path, overrides, error, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    overrides = {k: (str(empty) if v == "EMPTY" else v) for k, v in overrides.items()}
    with pytest.raises(error, match=message):
        validate_inputs.python_func(**inputs(**overrides))


def test_sweep_grid():
    base = validate_inputs.python_func(**inputs(run_ddpo=False)).config_json
    trials = [TrainConfig.from_json(t) for t in make_trials.python_func(
        config_json=base, learning_rates=[1e-4, 3e-4], truncation_ks=[1, 2, 3], rewards=["world_count",
                                                                                          "world_count:1,world_color:0.5"])]
    assert len(trials) == 12
    assert {(t.learning_rate, t.truncation_k, t.reward) for t in trials} == {
        (lr, k, r) for lr in (1e-4, 3e-4) for k in (1, 2, 3) for r in ("world_count", "world_count:1,world_color:0.5")}
    assert all(t.truncation == "fixed" and t.lora_rank == 2 for t in trials)
    with pytest.raises(ConfigError, match="truncation_k"):  # K beyond the sampling steps fails before training
        make_trials.python_func(config_json=base, learning_rates=[1e-4], truncation_ks=[99], rewards=["world_count"])


def test_prepare_prompts_split_and_separate_eval_set(tmp_path):
    train, held, metrics = Dataset(uri=str(tmp_path / "t")), Dataset(uri=str(tmp_path / "e")), \
        Metrics(uri=str(tmp_path / "m"))
    prepare_prompts.python_func(source="simple_animals", eval_source="", eval_fraction=0.25, seed=0,
                                train_prompts=train, eval_prompts=held, metrics=metrics)
    train_lines = (tmp_path / "t" / "prompts.jsonl").read_text().splitlines()  # .jsonl: read as JSONL downstream
    eval_lines = (tmp_path / "e" / "prompts.jsonl").read_text().splitlines()
    assert (len(train_lines), len(eval_lines)) == (18, 6)
    assert not {json.loads(x)["prompt"] for x in train_lines} & {json.loads(x)["prompt"] for x in eval_lines}
    assert metrics.metadata == {"train_prompts": 18, "eval_prompts": 6}
    prepare_prompts.python_func(source="simple_animals", eval_source="eval_animals", eval_fraction=0.0, seed=0,
                                train_prompts=train, eval_prompts=held, metrics=metrics)
    assert metrics.metadata == {"train_prompts": 24, "eval_prompts": 10}


def test_cache_models_adds_once_and_passes_references_through(tmp_path):
    tiny = tmp_path / "model"  # any directory: the cache stores files, it does not load them
    (tiny / "unet").mkdir(parents=True)
    (tiny / "model_index.json").write_text("{}")
    (tiny / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
    manifests = Artifact(uri=str(tmp_path / "manifests"))
    first = cache_models.python_func(base_model=str(tiny), base_revision="", reward_weights="",
                                     cache_root=str(tmp_path / "cache"), manifests=manifests)
    assert first.base_model_ref.startswith(str(tmp_path / "cache")) and first.reward_weights_ref == ""
    assert json.loads((tmp_path / "manifests" / "base.json").read_text())["id"] in first.base_model_ref
    again = cache_models.python_func(base_model=str(tiny), base_revision="", reward_weights="s3://b/weights",
                                     cache_root=str(tmp_path / "cache"), manifests=manifests)
    assert again.base_model_ref == first.base_model_ref  # content-addressed: the same model, the same manifest
    assert again.reward_weights_ref == "s3://b/weights"  # a published prefix is already a cache reference


def _trial(tmp_path, name, lr, score, reward="world_count"):
    run, evaluation = tmp_path / f"{name}-run", tmp_path / f"{name}-eval"
    run.mkdir()
    evaluation.mkdir()
    (run / "config.json").write_text(TrainConfig(learning_rate=lr, reward=reward).to_json())
    (run / "pytorch_lora_weights.safetensors").write_bytes(name.encode())
    (evaluation / "metrics.json").write_text(json.dumps({"models": {"alignprop": {
        "rewards": {reward: {"mean": score}}, "fid": 3.0}, "base": {"rewards": {reward: {"mean": 0.0}}}}}))
    return Model(uri=str(run)), Artifact(uri=str(evaluation))


def test_select_best_ranks_trials_by_the_selection_reward(tmp_path):
    trials = [_trial(tmp_path, "a", 1e-4, -0.5), _trial(tmp_path, "b", 3e-4, -0.1), _trial(tmp_path, "c", 1e-3, -0.9)]
    best, best_eval = Model(uri=str(tmp_path / "best")), Artifact(uri=str(tmp_path / "best-eval"))
    board, metrics = HTML(uri=str(tmp_path / "board.html")), Metrics(uri=str(tmp_path / "m"))
    select_best.python_func(adapters=[t[0] for t in trials], evaluations=[t[1] for t in trials],
                            selection_reward="world_count", best_adapter=best, best_eval=best_eval,
                            leaderboard=board, metrics=metrics)
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").read_bytes() == b"b"
    assert best.metadata["learning_rate"] == 3e-4 and metrics.metadata["trials"] == 3
    board_html = (tmp_path / "board.html").read_text()
    assert board_html.index("0.0003") < board_html.index("0.0001") < board_html.index("0.001<")
    with pytest.raises(UserError, match="was not evaluated on 'aesthetic'"):
        select_best.python_func(adapters=[trials[0][0]], evaluations=[trials[0][1]], selection_reward="aesthetic",
                                best_adapter=best, best_eval=best_eval, leaderboard=board, metrics=metrics)
