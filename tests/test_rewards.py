"""The reward table, mixes and normalisation, input checks, weights-directory errors, the JPEG rewards on literal
images, and the `alignprop rewards` commands."""

from __future__ import annotations

import importlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignprop.cli import main
from alignprop.errors import UserError
from alignprop.rewards import REWARDS, load_reward, parse_mix
from alignprop.rewards.jpeg import jpeg_sizes_kb

LEARNED = ("aesthetic", "hpsv2", "pickscore", "object_count", "compressibility")


def images(n=2, side=16, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
def test_every_table_entry_names_an_importable_factory_and_declares_itself():
    for name, spec in REWARDS.items():
        module, _, function = spec.factory.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        assert spec.description
    for name in LEARNED:
        assert REWARDS[name].weights and REWARDS[name].differentiable
    assert not REWARDS["jpeg_compressibility"].differentiable and not REWARDS["jpeg_incompressibility"].differentiable


def test_reward_modules_keep_torchvision_and_open_clip_off_the_import_path():
    import subprocess
    import sys

    code = ("import sys; import alignprop.rewards.aesthetic, alignprop.rewards.hps, alignprop.rewards.pickscore, "
            "alignprop.rewards.object_count, alignprop.rewards.compressibility, alignprop.rewards.jpeg; "
            "print(sorted(m for m in ('torchvision', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["brightness", "saturation", "redness"])
def test_weight_free_rewards_reach_the_pixels(name):
    x = images(2).requires_grad_(True)
    load_reward(name)(x, ["p", "q"]).sum().backward()
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Mixes and normalisation
# ---------------------------------------------------------------------------------------------
def test_a_mix_is_the_weighted_sum_of_its_terms():
    x = images(4)
    mix = load_reward("brightness:2.0, saturation:-0.5,jpeg_compressibility:0.1")
    expected = (2.0 * load_reward("brightness")(x, ["p"] * 4) - 0.5 * load_reward("saturation")(x, ["p"] * 4)
                + 0.1 * load_reward("jpeg_compressibility")(x, ["p"] * 4))
    assert torch.allclose(mix(x, ["p"] * 4), expected)
    assert not mix.differentiable and load_reward("brightness:1,saturation:1").differentiable
    assert parse_mix("aesthetic") == [("aesthetic", 1.0)]


def test_normalisation_standardises_by_the_running_mean_and_std():
    reward = load_reward("brightness", normalize=True)
    seen = []
    for seed in range(4):
        x = images(5, seed=seed) * (0.2 + 0.2 * seed)  # a drifting distribution
        raw = load_reward("brightness")(x, ["p"] * 5)
        seen.extend(raw.tolist())
        out = reward(x, ["p"] * 5)
        expected = (raw - np.mean(seen)) / np.std(seen)  # every value seen so far, this batch included
        assert torch.allclose(out, expected.float(), atol=1e-5)

    mix = load_reward("brightness:1,saturation:3", normalize=True)  # each term standardised on its own
    (b, wb), (s, ws) = mix.terms
    assert (b.name, wb, s.name, ws) == ("brightness", 1.0, "saturation", 3.0) and b.normalize and s.normalize
    raw = {"b": [], "s": []}
    for seed in range(3):
        x = images(6, seed=seed)
        raw["b"].extend(load_reward("brightness")(x, ["p"] * 6).tolist())
        raw["s"].extend(load_reward("saturation")(x, ["p"] * 6).tolist())
        out = mix(x, ["p"] * 6)
    standard = {k: (torch.tensor(v[-6:]) - np.mean(v)) / np.std(v) for k, v in raw.items()}
    assert torch.allclose(out, (standard["b"] + 3 * standard["s"]).float(), atol=1e-4)
    assert b.count == s.count == 18
    (single, weight), = load_reward("brightness:2", normalize=True).terms  # a weighted single term too
    assert single.normalize and weight == 2.0


def test_reward_options_reach_the_factory_and_unknown_ones_are_refused():
    x = torch.full((1, 3, 16, 16), 0.5)
    q50 = load_reward("jpeg_incompressibility", options={"jpeg_incompressibility": {"quality": 50}})(x, ["p"])
    assert torch.allclose(q50, jpeg_sizes_kb(x, quality=50))
    with pytest.raises(UserError, match="no option 'scal'"):
        load_reward("jpeg_compressibility", options={"jpeg_compressibility": {"scal": 2}})
    with pytest.raises(UserError, match="not in the reward spec"):
        load_reward("brightness", options={"hpsv2": {"scale": 100}})


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    (torch.full((2, 3, 8, 8), 1.5), r"in \[0, 1\]"),
    (torch.full((2, 3, 8, 8), -0.2), r"in \[0, 1\]"),
    (torch.rand(3, 8, 8), r"shape \[B, 3, H, W\]"),
    (torch.rand(2, 1, 8, 8), r"shape \[B, 3, H, W\]"),
])
def test_images_outside_the_range_or_of_the_wrong_shape_are_refused(bad, message):
    for name in ("brightness", "jpeg_compressibility"):
        with pytest.raises(UserError, match=message):
            load_reward(name)(bad, ["p", "q"])


def test_a_prompt_count_that_does_not_match_the_images_is_refused():
    with pytest.raises(UserError, match="got 2 images but 3 prompts"):
        load_reward("brightness:1,saturation:1")(images(2), ["a", "b", "c"])


def test_unknown_reward_names_and_bad_weights_are_clear_errors():
    with pytest.raises(UserError, match="unknown reward 'aesthetics'"):
        parse_mix("aesthetics:1")
    with pytest.raises(UserError, match="is not a number"):
        parse_mix("aesthetic:lots")


# ---------------------------------------------------------------------------------------------
# Weights directories
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LEARNED)
def test_a_learned_reward_without_weights_says_where_to_get_them(name, tmp_path):
    with pytest.raises(UserError, match="needs weights but no weights directory was given"):
        load_reward(name)
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'} does not exist.*alignprop cache add"):
        load_reward(name, weights_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=f"{tmp_path}/.* not found.*expects under the weights directory"):
        load_reward(name, weights_dir=str(tmp_path))  # exists, but holds nothing


def test_weights_load_lazily_from_a_model_cache_manifest(tmp_path, monkeypatch):
    from alignprop import cache
    from alignprop.rewards.compressibility import JpegSizeNet

    monkeypatch.setenv("ALIGNPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGNPROP_MODELS_DIR", str(tmp_path / "models"))
    from safetensors.torch import save_file

    weights = tmp_path / "weights"
    (weights / "compressibility").mkdir(parents=True)
    torch.manual_seed(0)
    net = JpegSizeNet()
    save_file(net.state_dict(), weights / "compressibility" / "model.safetensors")
    result = cache.add(str(weights))
    x = images(2)
    for reference in (result.manifest_uri, result.cache_uri):
        scores = load_reward("compressibility", weights_dir=reference)(x, ["p", "q"])
        assert torch.allclose(scores, -net(x))
    assert (tmp_path / "models" / result.manifest["id"] / "compressibility" / "model.safetensors").is_file()


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    from alignprop.rewards.weights import load_state_dict

    path = tmp_path / "head.pth"
    torch.save({"layers": torch.nn.Linear(2, 2)}, path)  # a module, not tensors: needs unpickling code
    with pytest.raises(UserError, match="weights_only=True"):
        load_state_dict(path)


# ---------------------------------------------------------------------------------------------
# JPEG rewards
# ---------------------------------------------------------------------------------------------
def _pil_jpeg_kb(array: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_on_literal_images():
    g = np.random.default_rng(0)
    flat = np.full((64, 64, 3), 128, np.uint8)
    gradient = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 64, 3)).copy()
    noise = g.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    arrays = [flat, gradient, noise]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    sizes = jpeg_sizes_kb(x)
    assert sizes.tolist() == pytest.approx([_pil_jpeg_kb(a) for a in arrays])  # kB = 1000 bytes, quality 95
    assert sizes[0] < sizes[1] < sizes[2] and sizes[2] > 5 * sizes[0]
    compressibility = load_reward("jpeg_compressibility")(x, ["p"] * 3)
    assert torch.equal(compressibility, -sizes)
    assert torch.equal(load_reward("jpeg_incompressibility")(x, ["p"] * 3), sizes)
    assert compressibility.argmax() == 0 and not compressibility.requires_grad


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_rewards_list_prints_the_table(capsys):
    assert main(["rewards", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "differentiable"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(REWARDS)
    assert rows["jpeg_compressibility"].split()[1] == "no" and rows["aesthetic"].split()[1] == "yes"
    assert "sac+logos+ava1-l14-linearMSE" in rows["aesthetic"] and "HPS_v2.1_compressed.pt" in rows["hpsv2"]


def _image_dir(tmp_path, n=3):
    directory = tmp_path / "images"
    directory.mkdir()
    arrays = [np.full((16, 24, 3), 40 * (i + 1), np.uint8) for i in range(n)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(directory / f"{i:02d}.png")
    return directory, arrays


def _table(stdout: str) -> dict[str, list[float]]:
    lines = [line.split() for line in stdout.splitlines() if line.split() and line.split()[0] != "image"]
    return {cells[0]: [float(c) for c in cells[1:]] for cells in lines if len(cells) > 1}


def test_rewards_score_prints_per_image_scores_and_their_mean(tmp_path, capsys):
    directory, arrays = _image_dir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    assert main(["rewards", "score", "--reward", "brightness", "--images", str(directory),
                 "--prompts", str(prompts)]) == 0
    table = _table(capsys.readouterr().out)
    expected = [a.mean() / 255 for a in arrays]  # grey images: luma = the grey level
    assert [table[f"{i:02d}.png"][0] for i in range(3)] == pytest.approx(expected, abs=1e-4)
    assert table["mean"][0] == pytest.approx(np.mean(expected), abs=1e-4)

    jsonl = tmp_path / "captions.jsonl"  # as `alignprop world render` writes: file + prompt, any order
    jsonl.write_text("".join(json.dumps({"file": f"{i:02d}.png", "prompt": "p"}) + "\n" for i in (2, 0, 1)))
    assert main(["rewards", "score", "--reward", "brightness:2,jpeg_compressibility:1", "--images", str(directory),
                 "--prompts", str(jsonl)]) == 0
    table = _table(capsys.readouterr().out)
    for i in range(3):
        b, j, total = table[f"{i:02d}.png"]
        assert b == pytest.approx(expected[i], abs=1e-4) and j == pytest.approx(-_pil_jpeg_kb(arrays[i]), abs=1e-4)
        assert total == pytest.approx(2 * b + j, abs=1e-3)


def test_rewards_score_errors_are_one_line_exit_2(tmp_path, capsys):
    directory, _ = _image_dir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("only one\n")
    assert main(["rewards", "score", "--reward", "brightness", "--images", str(directory),
                 "--prompts", str(prompts)]) == 2
    assert "1 prompts for 3 images" in capsys.readouterr().err
    prompts.write_text("a\nb\nc\n")
    assert main(["rewards", "score", "--reward", "aesthetic", "--images", str(directory), "--prompts", str(prompts),
                 "--weights-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
