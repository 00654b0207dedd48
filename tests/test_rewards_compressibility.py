"""The differentiable compressibility surrogate: fitted on a few hundred tiny images it tracks the true JPEG size
on held-out images; it loads through the reward table; the CLI trains it on a diffusion model's own samples."""

from __future__ import annotations

import json

import pytest
import torch

import helpers
from alignprop.cli import main
from alignprop.rewards import load_reward
from alignprop.rewards.compressibility import fit_compressibility
from alignprop.rewards.jpeg import jpeg_sizes_kb


def procedural_images(n: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Gradients, stripes of random frequency and noise of random strength: JPEG sizes over a wide range."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    images = []
    for _ in range(n):
        r = torch.rand(8, generator=g)
        base = torch.stack([r[c] + (r[3] - 0.5) * x + (r[4] - 0.5) * y for c in range(3)])
        base = base + 0.3 * r[5] * torch.sin((1 + 30 * r[6] ** 2) * 6.28 * (x * r[7] + y * r[0]))
        base = base + torch.randn(3, side, side, generator=g) * 0.2 * r[1] ** 2
        images.append(base.clamp(0, 1))
    return torch.stack(images)


@pytest.fixture
def one_thread():
    """Tiny convolutions on a CPU shared with other jobs run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_fitted_surrogate_tracks_true_jpeg_size_and_is_a_differentiable_reward(tmp_path, one_thread):
    out = tmp_path / "weights" / "compressibility"
    config = fit_compressibility(procedural_images(300), out, steps=300, seed=0, source="procedural")
    assert config["held_out"]["pearson"] > 0.5 and config["held_out"]["spearman"] > 0.5
    assert json.loads((out / "config.json").read_text())["held_out"] == config["held_out"]

    reward = load_reward("compressibility", weights_dir=str(tmp_path / "weights"))
    assert reward.differentiable
    test = procedural_images(64, seed=99).requires_grad_(True)  # never seen
    scores = reward(test, ["x"] * 64)
    true = -jpeg_sizes_kb(test)
    assert torch.corrcoef(torch.stack([scores.detach(), true]))[0, 1] > 0.5
    flat, noisy = torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert reward(flat, ["x"]) > reward(noisy, ["x"])
    scores.sum().backward()
    assert test.grad.abs().sum() > 0


def test_fit_compressibility_cli_on_a_models_samples(tmp_path_factory, tmp_path, capsys, one_thread):
    model = helpers.tiny_model_dir(tmp_path_factory)
    out = tmp_path / "compressibility"
    assert main(["rewards", "fit-compressibility", "--model", str(model), "--out", str(out), "--num-images", "12",
                 "--num-inference-steps", "2", "--steps", "5", "--prompts", "simple_animals"]) == 0
    stdout = capsys.readouterr().out
    printed = json.loads(stdout[stdout.index("{\n"):])  # (libraries may log a line before it)
    saved = json.loads((out / "config.json").read_text())
    assert printed["held_out"] == saved["held_out"] and saved["num_images"] == 12 and saved["source"] == str(model)
    assert saved["resolution"] == [32, 32] and (out / "model.safetensors").is_file()


def test_fit_compressibility_needs_images(tmp_path, capsys):
    assert main(["rewards", "fit-compressibility", "--out", str(tmp_path / "x")]) == 2
    assert "needs --model" in capsys.readouterr().err
