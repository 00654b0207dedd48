"""The AlignProp trainer: what it changes, multi-process all-reduce, exact resume, and failing cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import helpers
from alignprop import runtime, train
from alignprop.config import TrainConfig
from alignprop.rewards import REWARDS, RewardSpec
from servers import free_ports

ANIMALS = ["a cat", "a dog", "a horse", "a cow", "a pig", "a fish", "a tiger", "a lion"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return helpers.tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "animals.txt"
    path.write_text("\n".join(ANIMALS) + "\n")
    return path


def small_config(tiny, prompt_file, out, **overrides) -> TrainConfig:
    values = dict(pretrained_model=str(tiny), prompts=str(prompt_file), reward="brightness", output_dir=str(out),
                  num_steps=2, num_inference_steps=6, truncation="fixed", truncation_k=2, train_batch_size=2,
                  tracking=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values).validate()


def test_a_step_changes_lora_weights_only(tiny, prompt_file, tmp_path):
    config = small_config(tiny, prompt_file, tmp_path / "run", num_steps=1)
    with runtime.setup_run(config) as run:
        unet = run.accelerator.unwrap_model(run.unet)
        before = {n: p.detach().clone() for n, p in unet.named_parameters()}
        frozen_others = {n: p.detach().clone() for m in (run.parts.vae, run.parts.text_encoder)
                         for n, p in m.named_parameters()}
        train.train_loop(run)
        after = dict(unet.named_parameters())
        changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
        lora = {n for n, p in after.items() if p.requires_grad}
        assert changed and changed <= lora, f"non-LoRA weights changed: {sorted(changed - lora)[:3]}"
        assert all(".lora_" in n for n in lora)
        for m in (run.parts.vae, run.parts.text_encoder):
            for n, p in m.named_parameters():
                assert torch.equal(frozen_others[n], p.detach())
        run.finish()
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["num_steps"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert {"reward_mean", "reward_std", "loss", "grad_norm", "step_time_s", "peak_mem_gib"} <= set(rows[0])


def test_the_learning_rate_schedule_drives_the_optimizer(tiny, prompt_file, tmp_path):
    """linear with one warm-up step: lr 0, then the peak, then half of it; a step at lr 0 leaves the LoRA as it is."""
    config = small_config(tiny, prompt_file, tmp_path / "run", num_steps=3, learning_rate=1e-3,
                          lr_scheduler="linear", lr_warmup_steps=1)
    snapshots = []
    with runtime.setup_run(config) as run:
        unet = run.accelerator.unwrap_model(run.unet)
        lora = lambda: {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}  # noqa: E731
        snapshots.append(lora())
        run.maybe_checkpoint = lambda: snapshots.append(lora())
        train.train_loop(run)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 1e-3, 5e-4], abs=1e-12)
    moved = [any(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(snapshots, snapshots[1:])]
    assert moved == [False, True, True]


def test_adapter_loads_with_diffusers(tiny, prompt_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = train.train(small_config(tiny, prompt_file, tmp_path / "run", num_steps=1))
    state = load_file(out / runtime.ADAPTER_FILE)
    assert state and all(k.startswith("unet.") for k in state)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny))
    pipe.load_lora_weights(str(out))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_prompts_are_split_across_processes(tiny, prompt_file, tmp_path):
    config = small_config(tiny, prompt_file, tmp_path / "run", train_batch_size=2, gradient_accumulation_steps=2)

    class FakeAccelerator:
        num_processes = 2

        def __init__(self, rank):
            self.process_index = rank

    def stream(rank):
        run = runtime.Run(config, FakeAccelerator(rank), None, None, [], None, None, ANIMALS, None)
        return [p for step in range(2) for micro in range(2) for p in run.prompts_for(step, micro)]

    rank0, rank1 = stream(0), stream(1)
    first_epoch = rank0[:2] + rank1[:2] + rank0[2:4] + rank1[2:4]
    assert sorted(first_epoch) == sorted(ANIMALS)  # one epoch covers every prompt exactly once
    assert rank0 != rank1


LAUNCHERS = {
    "ddp": ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"],
    "deepspeed_zero2": ["--config_file", str(helpers.ROOT / "alignprop/configs/accelerate_deepspeed_zero2.yaml")],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_end_with_identical_lora_weights(tiny, prompt_file, tmp_path, launcher):
    out = tmp_path / "ddp"
    config_path = tmp_path / "config.json"
    # one warm-up step: lr 0 on step 1, so only step 2 may move the LoRA, on every rank
    # validation on 3 images: an uneven split over the ranks, whose mean must be all-reduced
    config_path.write_text(small_config(tiny, prompt_file, out, checkpoint_every=1, lr_scheduler="linear",
                                        lr_warmup_steps=1, validation_every=1, validation_images=3).to_json())
    result = subprocess.run(
        [str(helpers.VENV_BIN / "accelerate"), "launch", *LAUNCHERS[launcher],
         "--main_process_port", str(free_ports(1)[0]),  # not the fixed default 29500, which may be taken
         str(Path(__file__).parent / "ddp_worker.py"), str(config_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    # A group still alive when the interpreter shuts down lets gloo abort a finished run now and then (SIGABRT,
    # "terminate called without an active exception"); the run must destroy it at exit.
    alive = {rank: json.loads(path.read_text()) for rank in (0, 1)
             if (path := out / f"rank{rank}-group-alive-at-exit.json").exists()}
    assert not any(alive.values()), f"process group alive at interpreter exit (rank: alive) {alive}"
    assert result.returncode == 0, result.stderr[-3000:]
    assert alive == {0: False, 1: False}
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert set(rank0) == set(rank1)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora.up" in k or "lora_B" in k)
    for k in rank0:
        torch.testing.assert_close(rank0[k], rank1[k], rtol=0, atol=0)
    prompts0 = json.loads((out / "rank0-prompts.json").read_text())
    prompts1 = json.loads((out / "rank1-prompts.json").read_text())
    assert prompts0 and prompts0 != prompts1
    for rank in (0, 1):
        assert json.loads((out / f"rank{rank}-moved.json").read_text()) == [False, True]
    assert (out / runtime.ADAPTER_FILE).exists()
    validation = {m["step"]: m["val_reward"] for m in runtime.read_metrics(out / "metrics.jsonl") if "val_reward" in m}
    assert sorted(validation) == [0, 1, 2]
    assert validation[1] == pytest.approx(validation[0], abs=1e-6)  # lr 0 on step 1: the same adapter, the same score
    checkpoint = out / "checkpoints" / "checkpoint-000001"
    assert (checkpoint / "random_states_1.pkl").exists()  # every rank took part in saving state
    if launcher == "deepspeed_zero2":  # optimizer state sharded over the two ranks
        assert len(list(checkpoint.glob("pytorch_model/zero_pp_rank_*_optim_states.pt"))) == 2


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if metrics.exists() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines() if l):
            return
        time.sleep(0.1)
    raise TimeoutError(f"step {step} never logged")


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tiny, prompt_file, tmp_path):
    common = ["--set", f"pretrained_model={tiny}", "--set", f"prompts={prompt_file}", "--set", "reward=brightness",
              "--set", "num_steps=6", "--set", "num_inference_steps=6", "--set", "truncation=uniform",
              "--set", "truncation_min=1", "--set", "truncation_max=3", "--set", "eta=1.0",
              "--set", "checkpoint_every=2", "--set", "tracking=false",
              "--set", "lr_scheduler=cosine", "--set", "lr_warmup_steps=1",  # the resumed run rebuilds the schedule
              # validated at 0, 3 and 6: the kill after step 3 leaves best/ ahead of checkpoint 2, which resume restores
              "--set", "validation_every=3", "--set", "validation_images=2", "--set", "keep_best=true"]
    straight = helpers.run_cli("train", *common, "--output", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([str(helpers.VENV_BIN / "alignprop"), "train", *common, "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_step(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / runtime.ADAPTER_FILE).exists()
    assert [p.name for p in runtime.list_checkpoints(out)] == ["checkpoint-000002"]

    resumed = helpers.run_cli("train", *common, "--output", str(out), "--set", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = load_file(tmp_path / "straight" / runtime.ADAPTER_FILE), load_file(out / runtime.ADAPTER_FILE)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    rows = runtime.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # step 0: the base model's validation
    straight = runtime.read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r.get("lr") for r in rows] == [r.get("lr") for r in straight] and len({r.get("lr") for r in rows}) == 7
    kept, kept_straight = (json.loads((d / "kept.json").read_text()) for d in (out, tmp_path / "straight"))
    assert kept["val_rewards"].keys() == {"0", "3", "6"}
    assert kept["step"] == kept_straight["step"]
    assert kept["val_rewards"] == pytest.approx(kept_straight["val_rewards"], rel=1e-5)


# --- validation and keep_best ----------------------------------------------------------------------------
def _train_with_snapshots(config):
    """Train; return the LoRA weights after every step (index = step; 0 = the initial, no-op LoRA), keyed like the
    adapter file."""
    from alignprop import models

    snapshots = []
    with runtime.setup_run(config) as run:
        unet, checkpoint = run.accelerator.unwrap_model(run.unet), run.maybe_checkpoint

        def snapshot():
            snapshots.append({f"unet.{k}": v.detach().clone() for k, v in models.lora_state_dict(unet).items()})

        snapshot()
        run.maybe_checkpoint = lambda: (snapshot(), checkpoint())[1]
        train.train_loop(run)
        run.finish()
    return snapshots


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_keep_best_finishes_with_the_best_validated_adapter(tiny, prompt_file, tmp_path, direction):
    """direction -1 trains against the validation reward (darker images, scored by brightness), so every step
    scores below the base and the kept adapter must be step 0's no-op LoRA, not the last step's."""
    out = tmp_path / "run"
    config = small_config(tiny, prompt_file, out, num_steps=4, learning_rate=3e-2, validation_every=1,
                          validation_images=4, keep_best=True, reward_loss_coefficient=direction)
    snapshots = _train_with_snapshots(config)
    validation = {m["step"]: m["val_reward"] for m in runtime.read_metrics(out / "metrics.jsonl") if "val_reward" in m}
    assert sorted(validation) == [0, 1, 2, 3, 4]
    assert len(set(validation.values())) == 5  # every step moved the adapter, and validation saw it
    best = max(validation, key=validation.get)
    kept = json.loads((out / "kept.json").read_text())
    assert kept["step"] == best and kept["val_reward"] == pytest.approx(validation[best])
    assert kept["last_step"] == 4 and kept["last_val_reward"] == pytest.approx(validation[4])
    if direction < 0:
        assert best == 0 and all(validation[s] < validation[0] for s in range(1, 5))
    else:
        assert best > 0
    adapter = load_file(out / runtime.ADAPTER_FILE)
    assert set(adapter) == set(snapshots[best])
    for key in adapter:
        torch.testing.assert_close(adapter[key], snapshots[best][key].float().cpu(), rtol=0, atol=0)
    if best != 4:
        assert any(not torch.equal(adapter[k], snapshots[4][k].float().cpu()) for k in adapter)


def test_validation_scores_fixed_samples_whatever_the_training_seed(tiny, prompt_file, tmp_path):
    scores = []
    for seed in (0, 1):
        config = small_config(tiny, prompt_file, tmp_path / f"run{seed}", seed=seed, validation_every=1,
                              validation_images=3)
        with runtime.setup_run(config) as run:
            scores.append((run.validation_reward(), run.validation_reward()))
    assert scores[0][0] == scores[0][1] == scores[1][0] == scores[1][1]  # the LoRA starts as a no-op


def test_validation_prompts_come_from_their_own_set(tiny, prompt_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("a red car\na blue boat\n")
    config = small_config(tiny, prompt_file, tmp_path / "run", validation_every=1, validation_prompts=str(other))
    with runtime.setup_run(config) as run:
        assert run.validation_prompts == ["a red car", "a blue boat"] and run.prompts == ANIMALS


def test_a_fresh_run_drops_the_previous_runs_kept_adapter(tiny, prompt_file, tmp_path):
    out = tmp_path / "run"
    train.train(small_config(tiny, prompt_file, out, num_steps=1, validation_every=1, validation_images=2,
                             keep_best=True))
    assert (out / "kept.json").exists() and (out / runtime.BEST_DIR / runtime.ADAPTER_FILE).exists()
    train.train(small_config(tiny, prompt_file, out, num_steps=1, overwrite=True))
    assert not (out / "kept.json").exists() and not (out / runtime.BEST_DIR).exists()


@pytest.mark.parametrize("overrides,message", [
    (["keep_best=true"], "invalid keep_best=True: needs validation"),
    (["validation_every=-1"], "invalid validation_every=-1"),
    (["validation_every=2", "validation_images=0"], "invalid validation_images=0"),
])
def test_invalid_validation_settings_fail_cleanly(tmp_path, capsys, overrides, message):
    args = [a for o in overrides for a in ("--set", o)]
    code, err = _train_cli(capsys, *args, "--output", str(tmp_path / "o"))
    assert code != 0 and message in err
    assert not (tmp_path / "o").exists()


# --- failing cleanly ----------------------------------------------------------------------------------
def _train_cli(capsys, *args):
    from alignprop.cli import main

    code = main(["train", *args])
    return code, capsys.readouterr().err


def _no_finished_output(out: Path):
    assert not (out / runtime.ADAPTER_FILE).exists()


def test_zero_prompts_fails_cleanly(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, err = _train_cli(capsys, "--set", f"pretrained_model={tiny}", "--set", f"prompts={empty}",
                           "--set", "reward=brightness", "--output", str(tmp_path / "o"), "--set", "tracking=false")
    assert code != 0 and "prompt" in err.lower() and "error" in err
    _no_finished_output(tmp_path / "o")


def test_nan_reward_fails_cleanly(tiny, prompt_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(REWARDS, "nan_for_test", RewardSpec("helpers:nan_reward", True, "", "returns NaN"))
    code, err = _train_cli(capsys, "--set", f"pretrained_model={tiny}", "--set", f"prompts={prompt_file}",
                           "--set", "reward=nan_for_test", "--set", "num_inference_steps=4",
                           "--output", str(tmp_path / "o"), "--set", "tracking=false")
    assert code != 0 and "non-finite" in err and "no adapter was written" in err
    _no_finished_output(tmp_path / "o")


def test_unknown_reward_fails_before_loading(tmp_path, capsys):
    code, err = _train_cli(capsys, "--set", "reward=beauty", "--output", str(tmp_path / "o"))
    assert code != 0 and "unknown reward 'beauty'" in err and "brightness" in err
    assert not (tmp_path / "o").exists()


def test_missing_model_directory_fails_cleanly(prompt_file, tmp_path, capsys):
    code, err = _train_cli(capsys, "--set", f"pretrained_model={tmp_path / 'nope'}", "--set", "reward=brightness",
                           "--set", f"prompts={prompt_file}", "--output", str(tmp_path / "o"))
    assert code != 0 and "does not exist" in err and "make-tiny-model" in err
    _no_finished_output(tmp_path / "o")


@pytest.mark.parametrize("overrides,message", [
    (["truncation=uniform", "truncation_min=5", "truncation_max=3"], "invalid truncation range [5, 3]"),
    (["truncation=uniform", "truncation_min=1", "truncation_max=99"], "invalid truncation range [1, 99]"),
    (["truncation=fixed", "truncation_k=0"], "invalid truncation_k=0"),
    (["truncation=sometimes"], "invalid truncation='sometimes'"),
])
def test_invalid_truncation_fails_cleanly(tmp_path, capsys, overrides, message):
    args = [a for o in overrides for a in ("--set", o)]
    code, err = _train_cli(capsys, *args, "--output", str(tmp_path / "o"))
    assert code != 0 and message in err
    assert not (tmp_path / "o").exists()


def test_existing_adapter_is_never_overwritten_by_default(tiny, prompt_file, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / runtime.ADAPTER_FILE).write_bytes(b"precious")
    code, err = _train_cli(capsys, "--set", f"pretrained_model={tiny}", "--set", f"prompts={prompt_file}",
                           "--set", "reward=brightness", "--output", str(out))
    assert code != 0 and "already holds a finished adapter" in err
    assert (out / runtime.ADAPTER_FILE).read_bytes() == b"precious"


def test_cli_exit_status_is_nonzero_for_bad_input(tmp_path):
    result = helpers.run_cli("train", "--set", "num_steps=0", "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "invalid num_steps=0" in result.stderr
