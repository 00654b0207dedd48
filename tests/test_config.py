import json
import re

import pytest

from alignprop.config import ConfigError, TrainConfig, load_config, sd15, tiny


def test_json_round_trip():
    config = sd15()
    assert TrainConfig.from_json(config.to_json()) == config


def test_presets_are_valid_and_sd15_has_published_defaults():
    tiny().validate()
    c = sd15().validate()
    assert (c.num_inference_steps, c.guidance_scale, c.lora_rank, c.learning_rate) == (50, 7.5, 4, 1e-3)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"learning_rate": 0.5, "num_steps": 7}))
    c = load_config("tiny", str(path), ["num_steps=9", "lora_target_modules=to_q,to_v", "revision=none",
                                        "gradient_checkpointing=false"])
    assert (c.learning_rate, c.num_steps, c.lora_target_modules) == (0.5, 9, ["to_q", "to_v"])
    assert c.revision is None and c.gradient_checkpointing is False


@pytest.mark.parametrize("pairs,message", [
    (["nope=1"], "unknown config key 'nope'"),
    (["num_steps=ten"], "invalid value for num_steps"),
    (["learning_rate"], "is not key=value"),
    (["mixed_precision=fp8"], "invalid mixed_precision='fp8'"),
    (["gradient_checkpointing=maybe"], "expected true or false"),
    (["lr_scheduler=step"], "invalid lr_scheduler='step': unknown schedule; use one of constant, "),
    (["lr_scheduler=cosine", "lr_warmup_steps=20"], "invalid lr_warmup_steps=20: must lie in [0, num_steps=20)"),
    (["lr_warmup_steps=5"], "is ignored by lr_scheduler=constant; use --set lr_scheduler=constant_with_warmup"),
])
def test_bad_overrides_are_rejected(pairs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", None, pairs)


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config("tiny", str(bad))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


@pytest.mark.parametrize("pairs,message", [
    (["adapter_min_timestep=-1"], "must be >= 0"),
    (["adapter_min_timestep=990"], "above every timestep of the 20 DDIM steps \\(the first is 951\\)"),
    (["adapter_min_timestep=600"], "acts on the first 8 of 20 steps only, but truncation=fixed keeps the graph of "
                                   "the last 1 at most"),
    (["adapter_min_timestep=600", "truncation=uniform", "truncation_max=12"], "use --set truncation=full or a K above 12"),
])
def test_a_gate_that_leaves_the_lora_no_step_or_no_gradient_is_refused(pairs, message):
    from diffusers import DDIMScheduler

    from alignprop.models import SD_SCHEDULER_CONFIG
    from alignprop.runtime import check_adapter_gate

    with pytest.raises(ConfigError, match=message):
        check_adapter_gate(load_config("tiny", None, pairs), DDIMScheduler(**SD_SCHEDULER_CONFIG))


def test_a_gate_the_full_chain_reaches_is_accepted():
    from diffusers import DDIMScheduler

    from alignprop.models import SD_SCHEDULER_CONFIG
    from alignprop.runtime import check_adapter_gate

    for pairs in (["adapter_min_timestep=600", "truncation=full"],
                  ["adapter_min_timestep=600", "truncation=uniform", "truncation_max=13"], []):
        check_adapter_gate(load_config("tiny", None, pairs), DDIMScheduler(**SD_SCHEDULER_CONFIG))
