"""Shared test helpers (import as `helpers`): tiny models are built once per session and reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tiny_model_dir(tmp_path_factory, seed: int = 0) -> Path:
    """A random-init SD-shaped pipeline written once per session (see alignprop.models.make_tiny_model)."""
    from alignprop.models import make_tiny_model

    root = tmp_path_factory.getbasetemp() / f"tiny-model-{seed}"
    if not (root / "model_index.json").exists():
        make_tiny_model(root, seed=seed)
    return root


def nan_reward(**_):
    """A reward that returns NaN: the trainer must stop with a clear error."""

    def reward(images, prompts):
        return images.mean(dim=(1, 2, 3)) * float("nan")

    return reward


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None):
    """Run the installed `alignprop` console script; returns CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    return subprocess.run([str(VENV_BIN / "alignprop"), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd)


def lora_params(unet) -> dict[str, torch.Tensor]:
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}
