"""The evaluation stage: fixed noise, reward statistics, FID, metrics.json, report.html, and clear failures."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from alignprop import cli, models
from alignprop.errors import UserError
from alignprop.evaluate import AdapterError, AdapterLoaded, EvalConfig, evaluate, generate, summarize
from alignprop.fid import FIDError
from alignprop.runtime import ADAPTER_FILE

PROMPTS = ["two red circles", "one blue square", "three green triangles"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return helpers.tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    """A zero adapter (LoRA B = 0, as initialised) and a random one, in diffusers format."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    for name, init in (("zero", True), ("random", False)):
        parts = models.load_parts(str(tiny))
        models.add_lora(parts.unet, init_weights=init)
        if not init:
            for n, p in parts.unet.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(0, 0.5)  # large enough to change the images visibly
        models.save_lora(parts.unet, root / name)
    return {"zero": str(root / "zero"), "random": str(root / "random")}


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def small(tiny, prompt_file, out, **kw) -> EvalConfig:
    values = dict(pretrained_model=str(tiny), prompts=str(prompt_file), seeds=[0, 1], rewards=["brightness"],
                  num_inference_steps=3, batch_size=4, output_dir=str(out))
    values.update(kw)
    return EvalConfig(**values)


def _images(parts, config, prompts):
    return torch.cat([images for _, images in generate(parts, prompts, config.seeds, config, "cpu")])


def test_same_seeds_same_images_across_runs_and_across_models_with_a_zero_adapter(tiny, adapters, prompt_file, tmp_path):
    config = small(tiny, prompt_file, tmp_path, eta=0.5)  # eta > 0: the sampler's own noise is fixed too
    parts = models.load_parts(str(tiny))
    base = _images(parts, config, PROMPTS)
    assert torch.equal(base, _images(parts, config, PROMPTS))  # across runs
    assert not torch.equal(base[0], base[1])  # different (seed, prompt) pairs do differ
    with AdapterLoaded(parts, "zero", adapters["zero"]):
        assert torch.equal(base, _images(parts, config, PROMPTS))  # across models
    with AdapterLoaded(parts, "random", adapters["random"]):
        assert (base - _images(parts, config, PROMPTS)).abs().max() > 1e-3  # the adapter is really applied
    assert torch.equal(base, _images(parts, config, PROMPTS))  # and removed again afterwards
    # an image's noise does not depend on the batch it is generated in
    one_by_one = _images(parts, small(tiny, prompt_file, tmp_path, eta=0.0, batch_size=1), PROMPTS)
    torch.testing.assert_close(one_by_one, _images(parts, small(tiny, prompt_file, tmp_path, eta=0.0), PROMPTS),
                               atol=1e-5, rtol=0)


def test_summary_statistics_and_confidence_interval():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t_{0.975, 3} * std / sqrt(n)
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(5 / 3)) and s["n"] == 4
    assert s["ci95"] == pytest.approx([2.5 - half, 2.5 + half])


def test_config_round_trips_through_json():
    config = EvalConfig(adapters={"alignprop": "a", "ddpo": "b"}, seeds=[3, 4], fid_reference="base",
                        training_runs={"alignprop": "a"}, world_metrics=False)
    assert EvalConfig.from_json(config.to_json()) == config


def test_evaluate_writes_metrics_and_report(tiny, adapters, prompt_file, tmp_path, monkeypatch):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    clip_dir = tmp_path / "clip"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(clip_dir)
    run_dir = tmp_path / "train-run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "reward_mean": 0.1 * i, "images_seen": 4 * i, "wall_time_s": float(i)}) + "\n"
        for i in range(1, 6)))
    out = tmp_path / "eval"
    config = small(tiny, prompt_file, out, adapters=adapters, rewards=["brightness", "jpeg_compressibility"],
                   fid_reference="base", fid_extractor=str(clip_dir), training_runs={"alignprop": str(run_dir)})
    metrics = evaluate(config)

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["models"].keys() == {"base", "zero", "random"}
    for name, entry in on_disk["models"].items():
        for reward in ("brightness", "jpeg_compressibility"):
            stats = entry["rewards"][reward]
            assert stats["n"] == len(PROMPTS) * 2
            assert stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1]
        assert entry["fid"] >= 0 and "clip" in entry["fid_extractor"]
    base, zero, rand = (metrics["models"][k] for k in ("base", "zero", "random"))
    assert zero["rewards"] == base["rewards"] and zero["fid"] == base["fid"]  # same noise, zero adapter
    assert rand["rewards"]["brightness"]["mean"] != base["rewards"]["brightness"]["mean"]
    assert base["fid_drift"] == 0 and rand["fid_drift"] == rand["fid"] - base["fid"]
    assert "world" not in base  # a random-init model is not the world model

    report = (out / "report.html").read_text()
    assert report.count('<section class="grid">') == len(PROMPTS)
    for prompt in PROMPTS:
        assert f"<h3>{prompt}</h3>" in report
    assert report.count("data:image/png;base64,") == len(PROMPTS) * 2 * 3  # prompts x seeds x models
    table = report[report.index('<table id="metrics">'):]
    table = table[:table.index("</table>")]
    assert all(f'<td class="name">{name}</td>' in table for name in ("base", "zero", "random"))
    assert "jpeg_compressibility" in table and "FID" in table
    assert '<svg id="curves"' in report and "alignprop" in report
    assert "http" not in report.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained


def test_world_ground_truth_metrics_are_recorded_when_asked(tiny, prompt_file, tmp_path):
    metrics = evaluate(small(tiny, prompt_file, tmp_path, seeds=[0], world_metrics=True))
    world = metrics["models"]["base"]["world"]
    assert world["n_images"] == len(PROMPTS) and 0 <= world["count_accuracy"] <= 1
    assert set(world["per_prompt"]) == set(PROMPTS)


def test_zero_eval_prompts_fail_before_loading_the_model(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="no prompts"):
        evaluate(EvalConfig(pretrained_model=str(tmp_path / "no-model"), prompts=str(empty)))


def test_missing_adapter_fails_before_loading_the_model(tmp_path, prompt_file):
    with pytest.raises(AdapterError, match="does not exist"):
        evaluate(EvalConfig(pretrained_model=str(tmp_path / "no-model"), prompts=str(prompt_file),
                            adapters={"alignprop": str(tmp_path / "nowhere")}))


@pytest.mark.parametrize("problem", ["shape", "layer", "not-lora"])
def test_adapter_from_a_different_architecture_fails_clearly(tiny, adapters, prompt_file, tmp_path, problem):
    state = load_file(f"{adapters['zero']}/{ADAPTER_FILE}")
    key = next(k for k in state if k.endswith("attn2.to_k.lora.down.weight"))
    if problem == "shape":  # e.g. an SD 2.x adapter (1024-d cross-attention) on an SD 1.x UNet (768-d)
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] * 2)
        message = "in_features=32 but the adapter"
    elif problem == "layer":
        state["unet.down_blocks.7.attentions.0.proj_in.lora.down.weight"] = torch.zeros(4, 32)
        message = "does not exist in this UNet"
    else:
        state = {"text_encoder.layer.weight": torch.zeros(2, 2)}
        message = "holds no UNet LoRA weights"
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, bad / ADAPTER_FILE)
    with pytest.raises(AdapterError, match=message):
        evaluate(small(tiny, prompt_file, tmp_path / "out", adapters={"other": str(bad)}))
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_an_unreadable_adapter_config_fails_clearly_and_leaves_the_base_model_clean(tiny, adapters, prompt_file,
                                                                                      tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(adapters["random"], bad)
    (bad / "config.json").write_text("{not json")  # e.g. a truncated copy of the run's config
    config = small(tiny, prompt_file, tmp_path)
    parts = models.load_parts(str(tiny))
    base = _images(parts, config, PROMPTS)
    with pytest.raises(models.ModelError, match="cannot read the adapter's training config"):
        with AdapterLoaded(parts, "bad", str(bad)):
            pass
    assert torch.equal(base, _images(parts, config, PROMPTS))  # no LoRA was left in the UNet
    with AdapterLoaded(parts, "random", adapters["random"]):  # and the next adapter still loads
        assert not torch.equal(base, _images(parts, config, PROMPTS))


def test_unreadable_reference_directory_fails_before_loading_the_model(tmp_path, prompt_file):
    (tmp_path / "ref").mkdir()
    with pytest.raises(FIDError, match="holds no images"):
        evaluate(EvalConfig(pretrained_model=str(tmp_path / "no-model"), prompts=str(prompt_file),
                            fid_reference=str(tmp_path / "ref")))


def test_cli_evaluate(tiny, adapters, prompt_file, tmp_path, capsys):
    out = tmp_path / "cli"
    status = cli.main(["evaluate", "--model", str(tiny), "--adapter", f"zero={adapters['zero']}", "--prompts",
                       str(prompt_file), "--seeds", "0", "--reward", "brightness", "--steps", "2",
                       "--output", str(out)])
    assert status == 0
    assert "zero: brightness" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["models"].keys() == {"base", "zero"}
    assert cli.main(["evaluate", "--model", str(tiny), "--adapter", "no-equals-sign"]) == 2
    assert "is not NAME=DIR" in capsys.readouterr().err
