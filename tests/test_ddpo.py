"""DDPO baseline: the DDIM log-probability, the PPO objective, stat tracking, the run, and its config."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

import helpers
from alignprop import cli, ddpo, models, runtime
from alignprop.config import ConfigError, TrainConfig
from alignprop.ddpo_math import PerPromptStatTracker, ddim_step_with_logprob, ppo_clipped_loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return helpers.tiny_model_dir(tmp_path_factory)


def _scheduler(steps=10):
    scheduler = DDIMScheduler(**models.SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("index", [0, 3, 9])  # 9: the last step, whose "previous" alpha is final_alpha_cumprod
def test_ddim_step_is_diffusers_step_and_logprob_is_the_gaussian_density(index):
    scheduler = _scheduler()
    torch.manual_seed(0)
    latents, noise_pred, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[index]
    expected = scheduler.step(noise_pred, t, latents, eta=1.0, variance_noise=noise).prev_sample
    std = scheduler._get_variance(t, t - 100).sqrt()  # eta = 1
    # sampling: mean + std * noise with the same noise is diffusers' sample (the draw comes from the generator)
    drawn, _ = ddim_step_with_logprob(scheduler, noise_pred, t, latents, 1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, expected - std * noise + std * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)),
                               rtol=1e-5, atol=1e-5)
    # the log-density of diffusers' sample, by hand: x = mean + std * noise => -(noise^2)/2 - log std - log sqrt(2 pi)
    _, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, latents, 1.0, prev_latents=expected)
    hand = (-(noise**2) / 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, hand, rtol=1e-4, atol=1e-4)


def test_logprob_with_one_timestep_per_sample_equals_per_sample_calls():
    scheduler = _scheduler()
    torch.manual_seed(1)
    latents, noise_pred, prev = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = scheduler.timesteps[[0, 4, 9]]
    _, batched = ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, 0.7, prev_latents=prev)
    for i, t in enumerate(timesteps):
        _, single = ddim_step_with_logprob(scheduler, noise_pred[i:i + 1], t, latents[i:i + 1], 0.7,
                                           prev_latents=prev[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], single)


def test_logprob_of_a_deterministic_step_is_refused():
    scheduler = _scheduler()
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_logprob(scheduler, torch.zeros(1, 4, 2, 2), scheduler.timesteps[0], torch.zeros(1, 4, 2, 2), 0.0)


def test_ppo_clipped_objective_matches_hand_computation():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, 2.0, -1.0, -3.0])
    loss, ratio = ppo_clipped_loss(new, old, adv, clip_range=0.1)
    # per sample: max(-A r, -A clip(r, 0.9, 1.1))
    hand = [max(-1 * 1.0, -1 * 1.0), max(-2 * 1.5, -2 * 1.1), max(1 * 0.5, 1 * 0.9), max(3 * 1.05, 3 * 1.05)]
    assert loss.item() == pytest.approx(sum(hand) / 4, rel=1e-6)
    torch.testing.assert_close(ratio, torch.tensor([1.0, 1.5, 0.5, 1.05]))
    # at ratio 1 the gradient is the plain policy gradient -A * grad(log p)
    log_prob = torch.zeros(4, requires_grad=True)
    ppo_clipped_loss(log_prob, torch.zeros(4), adv, clip_range=1e-4)[0].backward()
    torch.testing.assert_close(log_prob.grad, -adv / 4)


def test_stat_tracker_normalises_per_prompt_once_it_has_enough_history():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    rewards = np.array([1.0, 3.0, 10.0, 30.0, 5.0])
    adv = tracker.update(["a", "a", "b", "b", "c"], rewards)
    np.testing.assert_allclose(adv[:4], [-1, 1, -1, 1], atol=1e-5)  # per prompt
    np.testing.assert_allclose(adv[4], (5.0 - rewards.mean()) / rewards.std(), rtol=1e-5)  # "c": batch statistics
    adv = tracker.update(["a"], np.array([2.0]))  # history of "a" is now [1, 3, 2]
    np.testing.assert_allclose(adv, [0.0], atol=1e-5)
    state = tracker.state_dict()
    other = PerPromptStatTracker(4, 2)
    other.load_state_dict(state)
    assert other.state_dict() == state == {"history": {"a": [1.0, 3.0, 2.0], "b": [10.0, 30.0], "c": [5.0]}}


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\na dog\n")
    return path


def _config(tiny, tmp_path, prompt, **kw):
    values = dict(method="ddpo", pretrained_model=str(tiny), prompts=str(prompt), reward="jpeg_compressibility",
                  output_dir=str(tmp_path / "ddpo"), num_steps=2, num_inference_steps=4, eta=1.0,
                  guidance_scale=3.0, train_batch_size=2, ddpo_samples_per_step=4, tracking=False,
                  learning_rate=1e-2)
    values.update(kw)
    return TrainConfig(**values).validate()


def test_ddpo_run_ratio_is_one_at_the_first_update_and_outputs_match_alignprop(tiny, tmp_path, prompt_file):
    out = ddpo.train_ddpo(_config(tiny, tmp_path, prompt_file))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["images_seen"] for r in rows] == [4, 8] and 0 < rows[0]["wall_time_s"] < rows[1]["wall_time_s"]
    for r in rows:
        assert r["updates"] == 2  # 4 samples per step / minibatch 2
        assert r["ratio_first_update"] < 1e-5  # the weights that sampled are the weights that score
        assert r["clipfrac"] > 0  # ... and only after an update can the ratio leave [1 - eps, 1 + eps]
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert json.loads((out / "config.json").read_text())["method"] == "ddpo"
    adapter = load_file(out / runtime.ADAPTER_FILE)
    assert adapter and all(k.startswith("unet.") for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora.up" in k)  # LoRA B moved off zero


def test_ddpo_validates_and_keeps_the_best_adapter_like_alignprop(tiny, tmp_path, prompt_file):
    out = ddpo.train_ddpo(_config(tiny, tmp_path, prompt_file, validation_every=1, validation_images=2,
                                  keep_best=True))
    validation = {m["step"]: m["val_reward"] for m in runtime.read_metrics(out / "metrics.jsonl") if "val_reward" in m}
    assert sorted(validation) == [0, 1, 2]
    kept = json.loads((out / "kept.json").read_text())
    assert kept["step"] == max(validation, key=validation.get)
    assert (out / runtime.ADAPTER_FILE).read_bytes() == (out / runtime.BEST_DIR / runtime.ADAPTER_FILE).read_bytes()


def test_ddpo_needs_a_stochastic_sampler(tiny, tmp_path, prompt_file):
    with pytest.raises(ConfigError, match="eta > 0"):
        ddpo.train_ddpo(_config(tiny, tmp_path, prompt_file, eta=0.0))
    with pytest.raises(ConfigError, match="multiple of train_batch_size"):
        ddpo.train_ddpo(_config(tiny, tmp_path, prompt_file, ddpo_samples_per_step=3))


def test_paper_defaults_sit_between_preset_and_user_values(tmp_path):
    config = ddpo.load_ddpo_config("tiny", None, ["learning_rate=1e-4"])
    assert config.method == "ddpo" and config.eta == 1.0 and config.guidance_scale == 5.0
    assert config.learning_rate == 1e-4  # the user's value wins
    assert (config.ddpo_clip_range, config.ddpo_adv_clip_max, config.ddpo_num_inner_epochs) == (1e-4, 5.0, 1)
    sd15 = ddpo.load_ddpo_config("sd15")
    assert (sd15.learning_rate, sd15.guidance_scale, sd15.num_inference_steps, sd15.gradient_accumulation_steps) == \
        (3e-4, 5.0, 50, 1)
    ddpo.validate_ddpo(sd15)
    (tmp_path / "c.json").write_text(json.dumps({"eta": 0.5, "num_steps": 3}))
    assert ddpo.load_ddpo_config("tiny", str(tmp_path / "c.json"), ["num_steps=4"]).eta == 0.5


def test_cli_train_method_ddpo_fails_cleanly_on_a_deterministic_sampler(tmp_path, capsys):
    status = cli.main(["train", "--method", "ddpo", "--set", "eta=0", "--output", str(tmp_path / "out")])
    assert status == 2
    assert "eta > 0" in capsys.readouterr().err


def test_resume_after_a_crash_ends_with_the_uninterrupted_adapter(tiny, tmp_path, prompt_file, monkeypatch):
    # min_count 2: from step 2 on, advantages use each prompt's history, which must come back from the checkpoint
    # linear schedule: the resumed epoch must run at half the peak learning rate, as the uninterrupted one did
    kw = dict(num_steps=2, ddpo_stat_tracking_buffer=4, ddpo_stat_tracking_min_count=2, lr_scheduler="linear")
    reference = ddpo.train_ddpo(_config(tiny, tmp_path / "a", prompt_file, **kw))

    real_update = ddpo.ppo_update
    calls = []

    def crash_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated preemption")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(ddpo, "ppo_update", crash_in_step_two)
    config = _config(tiny, tmp_path / "b", prompt_file, checkpoint_every=1, **kw)
    with pytest.raises(KeyboardInterrupt):
        ddpo.train_ddpo(config)
    monkeypatch.setattr(ddpo, "ppo_update", real_update)
    assert not (tmp_path / "b" / "ddpo" / runtime.ADAPTER_FILE).exists()
    resumed = ddpo.train_ddpo(_config(tiny, tmp_path / "b", prompt_file, checkpoint_every=1, resume=True, **kw))
    a, b = load_file(reference / runtime.ADAPTER_FILE), load_file(resumed / runtime.ADAPTER_FILE)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    peak = config.learning_rate
    assert [r["lr"] for r in rows] == pytest.approx([peak, peak / 2], rel=1e-9)


def test_a_ddpo_update_raises_the_importance_weighted_jpeg_compressibility(tiny, tmp_path):
    """After one PPO update on a non-differentiable reward, the updated policy gives the more compressible of the
    sampled trajectories more probability: the importance-weighted estimate of the reward under the new policy,
    from the old samples, is above their plain mean (it would fall if the objective's sign or the advantages were
    wrong). That it shows up in fresh samples after 128 images is tests/test_learning.py's check."""
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("a cat\na dog\n")
    config = _config(tiny, tmp_path, prompt_file, num_steps=1, ddpo_samples_per_step=16, train_batch_size=16,
                     learning_rate=1e-3)
    tracker = PerPromptStatTracker(16, 16)
    with runtime.setup_run(config) as run:
        negative = ddpo.sampling.encode_prompts(run.parts.tokenizer, run.parts.text_encoder, [""], "cpu")
        trajectories = ddpo.collect(run, 0, negative)
        rewards = ddpo.score(run, trajectories, 0)
        advantages, _ = ddpo.compute_advantages(run, tracker, trajectories.prompts, rewards)
        ddpo.ppo_update(run, trajectories, negative, advantages, torch.Generator().manual_seed(0))
        everyone = torch.arange(len(rewards))
        with torch.no_grad():
            log_ratio = sum(torch.log(ddpo._timestep_loss(run, trajectories, negative, advantages, everyone,
                                                            torch.full_like(everyone, j))[1])
                            for j in range(config.num_inference_steps))
    weights = torch.softmax(log_ratio.double(), 0)  # self-normalised importance weights p_new / p_old
    assert rewards.std() > 0
    assert (weights * rewards.double()).sum() > rewards.double().mean()
    assert torch.corrcoef(torch.stack([log_ratio.double(), rewards.double()]))[0, 1] > 0.5
