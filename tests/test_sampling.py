"""The differentiable sampler: gradients, truncation, and equivalence with diffusers' pipeline."""

import random

import pytest
import torch
from diffusers import StableDiffusionPipeline

import helpers
from alignprop import models, sampling

PROMPTS = ["two red circles", "one blue square"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return helpers.tiny_model_dir(tmp_path_factory)


@pytest.fixture
def parts(tiny):
    torch.manual_seed(0)
    parts = models.load_parts(str(tiny))
    models.add_lora(parts.unet, rank=4, init_weights=False)  # random non-zero LoRA: gradients are informative
    return parts


def _loss(parts, grad_steps, use_checkpoint, steps=6, guidance=3.0, eta=0.0):
    embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, PROMPTS, "cpu")
    negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], "cpu")
    generator = torch.Generator().manual_seed(1)
    latents = sampling.initial_latents(2, parts.unet.config, parts.scheduler, generator, "cpu")
    latents = sampling.denoise(parts.unet, parts.scheduler, latents, embeds, negative, steps, guidance, eta=eta,
                               grad_steps=grad_steps, use_checkpoint=use_checkpoint, generator=generator)
    return sampling.decode(parts.vae, latents).mean()


def _manual_start(parts, steps):
    """What `_loss` starts from, for chains written out by hand: [uncond; cond] embeddings and the same x_T."""
    embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, PROMPTS, "cpu")
    negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], "cpu")
    generator = torch.Generator().manual_seed(1)
    latents = sampling.initial_latents(2, parts.unet.config, parts.scheduler, generator, "cpu")
    parts.scheduler.set_timesteps(steps)
    return torch.cat([negative.expand(2, -1, -1), embeds]), latents


def _grads(parts, loss):
    params = list(helpers.lora_params(parts.unet).values())
    return torch.autograd.grad(loss, params, allow_unused=True)


def test_checkpointed_gradient_equals_plain_gradient(parts):
    plain = _grads(parts, _loss(parts, grad_steps=None, use_checkpoint=False))
    ckpt = _grads(parts, _loss(parts, grad_steps=None, use_checkpoint=True))
    assert any(g is not None and g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_last_k_truncation_matches_manual_computation(parts):
    steps, k = 6, 2
    truncated = _grads(parts, _loss(parts, grad_steps=k, use_checkpoint=True, steps=steps))

    # Manual: the first steps - k steps with no graph at all, then the last k by hand.
    cond, latents = _manual_start(parts, steps)
    timesteps = parts.scheduler.timesteps
    with torch.no_grad():
        for t in timesteps[: steps - k]:
            noise = sampling.predict_noise(parts.unet, latents, t, cond, 3.0, use_checkpoint=False)
            latents = parts.scheduler.step(noise, t, latents).prev_sample
    for t in timesteps[steps - k:]:
        noise = sampling.predict_noise(parts.unet, latents, t, cond, 3.0, use_checkpoint=False)
        latents = parts.scheduler.step(noise, t, latents).prev_sample
    manual = _grads(parts, sampling.decode(parts.vae, latents).mean())

    full = _grads(parts, _loss(parts, grad_steps=None, use_checkpoint=True, steps=steps))
    for a, b in zip(truncated, manual):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(truncated, full)), "truncation changed nothing"


def test_steps_before_the_cut_get_no_gradient(parts):
    """The initial noise is upstream of the cut: with K < T no gradient reaches it."""
    embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, PROMPTS, "cpu")
    negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], "cpu")
    for k, reaches in ((2, False), (4, True)):
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out = sampling.denoise(parts.unet, parts.scheduler, latents, embeds, negative, 4, 3.0, grad_steps=k)
        assert out.requires_grad
        grad = torch.autograd.grad(out.sum(), latents, allow_unused=True)[0]
        assert (grad is not None and grad.abs().sum() > 0) == reaches


@pytest.mark.parametrize("eta,guidance", [(0.0, 5.0), (1.0, 3.0), (0.0, 1.0)])
def test_no_grad_sampler_matches_diffusers_pipeline(tiny, eta, guidance):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS, num_inference_steps=8, guidance_scale=guidance, eta=eta, output_type="pt",
                    generator=torch.Generator().manual_seed(3)).images

    parts = models.load_parts(str(tiny))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, PROMPTS, "cpu")
        negative = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, [""], "cpu")
        latents = sampling.initial_latents(2, parts.unet.config, parts.scheduler, generator, "cpu")
        latents = sampling.denoise(parts.unet, parts.scheduler, latents, embeds, negative, 8, guidance, eta=eta,
                                   generator=generator)
        images = sampling.decode(parts.vae, latents)
    assert images.shape == expected.shape
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-5)


def test_decode_returns_images_in_unit_range_once(parts):
    """Normalised exactly once: a latent decoding to [-1, 1] pixels maps to [0, 1], not to [0.5, 0.75]."""
    latents = torch.randn(1, 4, 16, 16) * 3
    images = sampling.decode(parts.vae, latents)
    raw = parts.vae.decode(latents / parts.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("mode,kwargs,allowed", [
    ("full", {}, {20}),
    ("fixed", {"k": 3}, {3}),
    ("uniform", {"k_min": 2, "k_max": 5}, {2, 3, 4, 5}),
    ("gaussian", {"mean": 10, "std": 30}, set(range(1, 21))),
])
def test_truncation_draws(mode, kwargs, allowed):
    rng = random.Random(0)
    draws = {sampling.draw_truncation_k(mode, 20, rng, **kwargs) for _ in range(300)}
    assert draws <= allowed
    if mode in ("uniform",):
        assert draws == allowed  # every value in the range is drawn
    if mode == "gaussian":
        assert 1 in draws and 20 in draws  # clipped to [1, T]


def test_step_generator_is_a_function_of_position():
    a = torch.randn(3, generator=sampling.step_generator(0, 5, 1))
    b = torch.randn(3, generator=sampling.step_generator(0, 5, 1))
    c = torch.randn(3, generator=sampling.step_generator(0, 5, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- the timestep gate (adapter_min_timestep): LoRA on the high-noise steps only ---------------------------------
def _unet_out(parts, t, latents, embeds):
    return parts.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]


def test_gated_lora_is_the_base_model_below_the_gate_and_the_lora_above(parts):
    embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, PROMPTS, "cpu")
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora = {t: _unet_out(parts, t, latents, embeds) for t in (801, 301)}
        parts.unet.disable_adapters()
        base = {t: _unet_out(parts, t, latents, embeds) for t in (801, 301)}
        parts.unet.enable_adapters()
        scalings = [dict(m.scaling) for m in parts.unet.modules() if hasattr(m, "scaling")]
        gate = models.gate_lora(parts.unet, 500)
        gated = {t: _unet_out(parts, t, latents, embeds) for t in (801, 301)}
        assert [dict(m.scaling) for m in parts.unet.modules() if hasattr(m, "scaling")] == scalings  # restored
        gate.remove()
        after = _unet_out(parts, 301, latents, embeds)
    assert not torch.allclose(lora[301], base[301])  # the LoRA is not a no-op, so the checks below can fail
    torch.testing.assert_close(gated[801], lora[801], rtol=0, atol=0)
    torch.testing.assert_close(gated[301], base[301], rtol=0, atol=0)
    torch.testing.assert_close(after, lora[301], rtol=0, atol=0)  # remove() takes the gate off
    assert models.gate_lora(parts.unet, 0) is None


def test_gated_gradient_matches_a_manual_chain_and_survives_checkpointing(parts):
    """Through the full chain: the LoRA's gradient comes only from the steps at or above the gate, and the
    checkpointed recomputation in the backward pass sees the same gate as the forward pass."""
    steps, gate_t = 6, 500
    gate = models.gate_lora(parts.unet, gate_t)
    ckpt = _grads(parts, _loss(parts, grad_steps=None, use_checkpoint=True, steps=steps))
    plain = _grads(parts, _loss(parts, grad_steps=None, use_checkpoint=False, steps=steps))
    gate.remove()
    ungated = _grads(parts, _loss(parts, grad_steps=None, use_checkpoint=True, steps=steps))

    # Manual: the steps below the gate run with diffusers' disable_adapters() instead of the hooks.
    cond, latents = _manual_start(parts, steps)
    for t in parts.scheduler.timesteps:
        if t < gate_t:
            parts.unet.disable_adapters()
        noise = sampling.predict_noise(parts.unet, latents, t, cond, 3.0, use_checkpoint=False)
        parts.unet.enable_adapters()
        latents = parts.scheduler.step(noise, t, latents).prev_sample
    manual = _grads(parts, sampling.decode(parts.vae, latents).mean())
    assert any(g is not None and g.abs().sum() > 0 for g in manual)
    for a, b, c in zip(ckpt, plain, manual):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(ckpt, ungated)), "the gate changed nothing"


def test_gate_refuses_a_call_that_mixes_timesteps_across_it(parts):
    embeds = sampling.encode_prompts(parts.tokenizer, parts.text_encoder, PROMPTS, "cpu")
    latents = torch.randn(2, 4, 16, 16)
    gate = models.gate_lora(parts.unet, 500)
    with pytest.raises(ValueError, match="mixes timesteps"), torch.no_grad():
        _unet_out(parts, torch.tensor([801, 301]), latents, embeds)
    gate.remove()
