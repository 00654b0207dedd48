"""Where reward weights live and how they are read: never from the network at training time.

`weights_dir` (config `reward_weights_dir`, CLI `--weights-dir`) is one directory holding every learned reward's
weights, each under its own sub-path (`REWARDS[name].weights`, printed by `alignprop rewards list`). It may also be
a model-cache reference (a manifest `.json`, `cache://<id>` or a published `s3://` prefix): it is then fetched
and verified into the local cache by `alignprop.cache` the first time a reward needs it.

`.pth`/`.pt`/`.bin` files are read with `torch.load(weights_only=True)` (no code runs on load); safetensors
files are preferred where both exist.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignprop.rewards import RewardError

# Where each learned reward's published weights come from (the layout under weights_dir is REWARDS[name].weights).
SOURCES = {
    "aesthetic": "hub openai/clip-vit-large-patch14 and sac+logos+ava1-l14-linearMSE.pth from "
                 "github.com/christophschuhmann/improved-aesthetic-predictor",
    "hpsv2": "hub xswu/HPSv2 (HPS_v2.1_compressed.pt) and the tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "pickscore": "hub yuvalkirstain/PickScore_v1 and the processor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "object_count": "hub google/owlv2-base-patch16-ensemble (or google/owlvit-base-patch32)",
    "compressibility": "`alignprop rewards fit-compressibility --model MODEL --out WEIGHTS_DIR/compressibility`",
}


class WeightsError(RewardError):
    """Reward weights are missing, unreadable or have the wrong layout; the message names the path and the fix."""


def _how_to_get(reward: str) -> str:
    from alignprop.rewards import REWARDS

    return (f"{reward} expects under the weights directory: {REWARDS[reward].weights}; get them from "
            f"{SOURCES[reward]}, then pass the directory (or its `alignprop cache add` manifest) as --weights-dir "
            "or --set reward_weights_dir=... (see docs/rewards.md)")


def weights_root(weights_dir: str | Path | None, reward: str) -> Path:
    """The local weights directory: a directory as is; a manifest, `cache://` or `s3://` reference fetched."""
    if not weights_dir:
        raise WeightsError(f"reward {reward} needs weights but no weights directory was given. {_how_to_get(reward)}")
    text = str(weights_dir)
    if text.endswith(".json") or text.startswith(("s3://", "cache://")):
        from alignprop import cache  # only for cache references: keeps boto3 off the path of local runs

        return Path(cache.local_dir(text))
    path = Path(text).expanduser()
    if not path.is_dir():
        raise WeightsError(f"reward weights directory {path} does not exist. {_how_to_get(reward)}")
    return path


def find(weights_dir: str | Path | None, reward: str, *candidates: str) -> Path:
    """The first of `candidates` (paths relative to the weights directory) that exists."""
    root = weights_root(weights_dir, reward)
    for candidate in candidates:
        if (root / candidate).exists():
            return root / candidate
    raise WeightsError(f"reward {reward}: {root / candidates[0]} not found. {_how_to_get(reward)}")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a `.pth`/`.pt`/`.bin` pickle read with weights_only=True."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for pickles that need code; anything else for corrupt files
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {e}; convert it to "
                           "safetensors (safetensors.torch.save_file) or re-download it") from e


def check_keys(state: dict, expected: list[str], path: Path, what: str) -> None:
    """Raise naming the first missing (else the first unexpected) key of a state dict."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(f"{path} is not a {what} checkpoint: missing key {missing[0]!r} "
                           f"({len(missing)} missing; it has e.g. {sorted(state)[:3]})")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise WeightsError(f"{path} is not a {what} checkpoint: unexpected key {unexpected[0]!r}")


def from_pretrained(cls, directory: Path, what: str, **kwargs):
    """`cls.from_pretrained(directory)`, refusing a checkpoint whose keys do not fill the model (transformers
    would otherwise leave those weights randomly initialised and only warn)."""
    if not (directory / "config.json").is_file():
        raise WeightsError(f"{directory} has no config.json: it is not a transformers {what} directory")
    try:
        model, info = cls.from_pretrained(directory, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot load {what} from {directory}: {e}") from e
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise WeightsError(f"{directory} is not a {what} checkpoint: missing key {missing[0]!r} "
                           f"({len(missing)} missing)")
    return model.requires_grad_(False).eval()
