"""DDPO baseline: the DDIM log-probability, the PPO objective, stat tracking, and learning a non-differentiable reward."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import helpers
from alignprop import ddpo, models, runtime
from alignprop.config import ConfigError, TrainConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return helpers.tiny_model_dir(tmp_path_factory)


def test_ddim_step_matches_diffusers_and_logprob_is_the_gaussian_density():
    scheduler = DDIMScheduler(**models.SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    latents, noise_pred, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[3]
    expected = scheduler.step(noise_pred, t, latents, eta=1.0, variance_noise=noise).prev_sample
    # the mean is the eta-noise-free part; our sample with the same noise must equal diffusers'
    mean, _ = ddpo.ddim_step_with_logprob(scheduler, noise_pred, t, latents, 1.0,
                                          prev_latents=torch.zeros_like(latents))
    variance = scheduler._get_variance(t, t - 100)
    std = variance.sqrt()
    ours_mean = expected - std * noise
    _, log_prob = ddpo.ddim_step_with_logprob(scheduler, noise_pred, t, latents, 1.0, prev_latents=expected)
    hand = (-(noise**2) / 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, hand, rtol=1e-4, atol=1e-4)
    # and the mean it implies is diffusers' deterministic part
    _, lp_at_mean = ddpo.ddim_step_with_logprob(scheduler, noise_pred, t, latents, 1.0, prev_latents=ours_mean)
    assert (lp_at_mean > log_prob).all()  # the density peaks at the mean
    torch.testing.assert_close(lp_at_mean, torch.full_like(lp_at_mean, (-torch.log(std) - 0.5 * math.log(2 * math.pi)).item()),
                               rtol=1e-4, atol=1e-4)


def test_ppo_clipped_objective_matches_hand_computation():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, 2.0, -1.0, -3.0])
    loss, ratio = ddpo.ppo_clipped_loss(new, old, adv, clip_range=0.1)
    # per sample: max(-A r, -A clip(r, 0.9, 1.1))
    hand = [max(-1 * 1.0, -1 * 1.0), max(-2 * 1.5, -2 * 1.1), max(1 * 0.5, 1 * 0.9), max(3 * 1.05, 3 * 1.05)]
    assert loss.item() == pytest.approx(sum(hand) / 4, rel=1e-6)
    torch.testing.assert_close(ratio, torch.tensor([1.0, 1.5, 0.5, 1.05]))


def test_stat_tracker_normalises_per_prompt():
    tracker = ddpo.PerPromptStatTracker(buffer_size=8, min_count=2)
    adv = tracker.update(["a", "a", "b", "b"], np.array([1.0, 3.0, 10.0, 30.0]))
    np.testing.assert_allclose(adv, [-1, 1, -1, 1], atol=1e-5)
    state = tracker.state_dict()
    other = ddpo.PerPromptStatTracker(8, 2)
    other.load_state_dict(state)
    assert other.state_dict() == state


def _config(tiny, tmp_path, prompt, **kw):
    values = dict(method="ddpo", pretrained_model=str(tiny), prompts=str(prompt), reward="jpeg_compressibility",
                  output_dir=str(tmp_path / "ddpo"), num_steps=2, num_inference_steps=6, eta=1.0,
                  guidance_scale=3.0, train_batch_size=2, ddpo_samples_per_step=4, tracking=False,
                  ddpo_clip_range=1e-4, learning_rate=3e-4)
    values.update(kw)
    return TrainConfig(**values).validate()


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\na dog\n")
    return path


def test_importance_ratio_is_one_at_the_first_inner_step(tiny, tmp_path, prompt_file):
    config = _config(tiny, tmp_path, prompt_file)
    with runtime.setup_run(config) as run:
        negative = ddpo.sampling.encode_prompts(run.parts.tokenizer, run.parts.text_encoder, [""], "cpu")
        embeds, states, old_log_probs, _ = ddpo.sample_trajectories(
            run, ["a cat", "a dog"], negative, torch.Generator().manual_seed(0))
        cond = ddpo._with_negative(embeds, negative, config.guidance_scale)
        for j in (0, 3, 5):
            noise_pred = ddpo.sampling.predict_noise(run.unet, states[:, j], run.parts.scheduler.timesteps[j], cond,
                                                     config.guidance_scale, use_checkpoint=False)
            _, log_prob = ddpo.ddim_step_with_logprob(run.parts.scheduler, noise_pred, run.parts.scheduler.timesteps[j],
                                                      states[:, j], config.eta, prev_latents=states[:, j + 1])
            torch.testing.assert_close(torch.exp(log_prob - old_log_probs[:, j]), torch.ones(2), rtol=1e-4, atol=1e-4)


def test_ddpo_needs_a_stochastic_sampler(tiny, tmp_path, prompt_file):
    with pytest.raises(ConfigError, match="eta > 0"):
        ddpo.train_ddpo(_config(tiny, tmp_path, prompt_file, eta=0.0))


def test_ddpo_writes_the_same_outputs_as_alignprop(tiny, tmp_path, prompt_file):
    out = ddpo.train_ddpo(_config(tiny, tmp_path, prompt_file))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["images_seen"] == 8 and rows[-1]["wall_time_s"] > 0
    assert (out / runtime.ADAPTER_FILE).exists() and (out / "config.json").exists()
