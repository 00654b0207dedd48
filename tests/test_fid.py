"""FID: the distance itself (against scipy), the feature extractors, and reference sets that must be rejected."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from alignprop import fid
from alignprop.world.render import render_dataset


class FlatFeatures(nn.Module):
    """The pixels themselves as features: FID then equals the Fréchet distance of the raw vectors."""

    num_features = 12

    def forward(self, images):
        return images.flatten(1).double()


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Reference: d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (Heusel et al. 2017)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_reference():
    torch.manual_seed(0)
    real = torch.rand(60, 3, 2, 2)
    fake = torch.rand(45, 3, 2, 2) ** 2 + 0.1  # a different mean and covariance
    fd = fid.FrechetDistance(FlatFeatures())
    fd.add_reference(real[:30])
    fd.add_reference(real[30:])  # batches accumulate
    fd.add(fake)
    value = fd.compute()
    expected = scipy_frechet(real.flatten(1).double().numpy(), fake.flatten(1).double().numpy())
    assert expected > 0.1
    assert value == pytest.approx(expected, rel=1e-6)
    # the reference features are kept: a second set is measured against the same reference
    fd.add(real)
    assert fd.compute() == pytest.approx(0.0, abs=1e-9)


def test_fid_of_world_renders_against_themselves_is_zero_and_not_against_others():
    images = torch.from_numpy(render_dataset(40, seed=0)[0]).permute(0, 3, 1, 2)
    other = torch.from_numpy(render_dataset(40, seed=1, heldout=True)[0]).permute(0, 3, 1, 2)
    extractor, name, _ = fid.build_extractor("world")
    assert "world_count" in name and extractor(images[:2]).shape == (2, extractor.num_features)
    fd = fid.FrechetDistance(extractor)
    fd.add_reference(images)
    fd.add(images)
    itself = fd.compute()
    fd.add(other)
    different = fd.compute()
    fd.add(torch.rand_like(images))  # noise is far from renders
    noise = fd.compute()
    assert itself < 1e-6 * max(different, 1.0)
    assert 0 < different < noise


@pytest.mark.parametrize("kind", ["clip", "clip_vision", "dinov2"])
def test_transformers_vision_extractors_load_from_a_directory(tmp_path, kind):
    from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config,
                              Dinov2Model)

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    if kind == "clip":  # a full CLIP checkpoint: the projected image embedding is used
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                    vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path)
        dims, label = 16, "image embedding"
    elif kind == "clip_vision":  # a vision tower without projection: its pooled output
        CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(tmp_path)
        dims, label = 32, "pooled output"
    else:
        Dinov2Model(Dinov2Config(**{**vision, "image_size": 28, "patch_size": 7})).save_pretrained(tmp_path)
        dims, label = 32, "pooled output"
    extractor, name, _ = fid.build_extractor(str(tmp_path))
    assert label in name and str(tmp_path) in name
    images = torch.rand(6, 3, 40, 40)  # any size: the extractor resizes to its own input
    assert extractor(images).shape == (6, dims) == (6, extractor.num_features)
    fd = fid.FrechetDistance(extractor)
    fd.add_reference(images)
    fd.add(images)
    assert fd.compute() < 1e-6


def test_inception_without_torch_fidelity_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(fid, "inception_available", lambda: False)
    with pytest.raises(fid.FIDError, match="torch-fidelity"):
        fid.build_extractor("inception")
    with pytest.raises(fid.FIDError, match="CLIP or DINOv2"):
        fid.build_extractor("auto")  # no world model default and no Inception: say what to pass
    assert "world_count" in fid.build_extractor("auto", default="world")[1]
    with pytest.raises(fid.FIDError, match="unknown FID extractor"):
        fid.build_extractor("no-such-extractor")


def _save(path, size, color=(200, 10, 10)):
    Image.new("RGB", size, color).save(path)


def test_reference_directory_loads_rgb_in_unit_range(tmp_path):
    _save(tmp_path / "a.png", (32, 32))
    Image.new("L", (32, 32), 128).save(tmp_path / "b.jpg")  # greyscale is converted to RGB
    (tmp_path / "captions.jsonl").write_text("{}\n")  # non-images are ignored
    images = fid.load_image_dir(tmp_path)
    assert images.shape == (2, 3, 32, 32)
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    assert images[0, 0, 0, 0].item() == pytest.approx(200 / 255)


def test_missing_or_empty_reference_directory_fails(tmp_path):
    with pytest.raises(fid.FIDError, match="does not exist"):
        fid.load_image_dir(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(fid.FIDError, match="holds no images"):
        fid.load_image_dir(tmp_path)


def test_unreadable_reference_image_fails_naming_the_file(tmp_path):
    _save(tmp_path / "a.png", (32, 32))
    (tmp_path / "b.png").write_bytes(b"this is not a png")
    with pytest.raises(fid.FIDError, match="b.png"):
        fid.load_image_dir(tmp_path)


def test_reference_images_of_mixed_sizes_are_rejected(tmp_path):
    _save(tmp_path / "a.png", (32, 32))
    _save(tmp_path / "b.png", (64, 48))
    with pytest.raises(fid.FIDError, match="differ in size: a.png is 32x32 but b.png is 64x48"):
        fid.load_image_dir(tmp_path)


def test_fid_needs_two_images_per_set():
    fd = fid.FrechetDistance(FlatFeatures())
    fd.add_reference(torch.rand(4, 3, 2, 2))
    fd.add(torch.rand(1, 3, 2, 2))
    with pytest.raises(fid.FIDError, match="at least 2"):
        fd.compute()
