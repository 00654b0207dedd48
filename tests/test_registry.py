"""The model registry against a real MLflow server: registration, the gate, promotion, loading a version back,
concurrent registrations and failures."""

import json
import math
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import helpers
from alignprop import registry, tracking
from alignprop.cli import main
from alignprop.config import TrainConfig
from alignprop.models import add_lora, load_parts, save_lora
from alignprop.registry import GatePolicy, gate_decision, read_eval_metrics
from mlflow_server import free_port, mlflow_server  # noqa: F401  (fixture)

STEPS, GUIDANCE = 4, 3.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return helpers.tiny_model_dir(tmp_path_factory)


def make_adapter(root: Path, base: Path, seed: int) -> Path:
    """A random non-zero LoRA saved like a finished training run (no training needed)."""
    parts = load_parts(str(base))
    torch.manual_seed(seed)
    add_lora(parts.unet, init_weights=False)
    save_lora(parts.unet, root)
    config = TrainConfig(pretrained_model=str(base), reward="brightness", num_inference_steps=STEPS,
                         guidance_scale=GUIDANCE, output_dir=str(root), seed=seed, tracking=False)
    (root / "config.json").write_text(config.to_json())
    (root / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.1 * seed}) + "\n")
    return root


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / f"a{seed}", tiny, seed) for seed in (1, 2)]


def eval_metrics(path: Path, reward: float, fid: float = 5.0, base_fid: float = 3.0) -> Path:
    """An evaluation metrics.json of the shape `alignprop evaluate` writes."""
    path.write_text(json.dumps({"models": {
        "base": {"rewards": {"brightness": {"mean": 0.4, "std": 0.1, "ci95": [0.35, 0.45]}}, "fid": base_fid},
        "alignprop": {"rewards": {"brightness": {"mean": reward, "std": 0.1, "ci95": [reward - .05, reward + .05]}},
                      "fid": fid, "fid_extractor": "tiny-test"}}}))
    return path


def new_name() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def client_for(server) -> MlflowClient:
    return MlflowClient(server.uri, server.uri)


# ---------------------------------------------------------------------------------------------------------------
# The gate, registration and promotion
# ---------------------------------------------------------------------------------------------------------------
def test_gate_promotes_only_the_better_version(mlflow_server, adapters, tmp_path, capsys):
    name, client = new_name(), client_for(mlflow_server)
    policy = GatePolicy(margin=0.01, max_fid_drift=5.0)

    def register(adapter, reward, fid=5.0):
        metrics = eval_metrics(tmp_path / f"eval-{uuid.uuid4().hex}.json", reward, fid)
        return registry.register_adapter(adapter, name, mlflow_server.uri, eval_metrics=metrics, gate=True,
                                         policy=policy)

    first = register(adapters[0], reward=0.50)
    assert first.decision.promoted and first.version == "1"
    worse = register(adapters[1], reward=0.505)  # better, but not by more than the margin
    drifted = register(adapters[1], reward=0.90, fid=9.0)  # FID drift 6 > 5
    better = register(adapters[1], reward=0.60)
    assert (worse.decision.promoted, drifted.decision.promoted, better.decision.promoted) == (False, False, True)
    assert "does not beat" in worse.decision.reason and "FID drift 6" in drifted.decision.reason

    aliases = client.get_registered_model(name).aliases
    assert aliases == {"staging": better.version, "candidate": better.version}
    refused = client.get_model_version(name, worse.version).tags
    assert refused["gate.decision"] == "refused" and refused["gate.reason"] == worse.decision.reason
    event = json.loads(next(v for k, v in refused.items() if k.startswith("event.")))
    assert event["action"] == "refused" and event["stage"] == "staging" and event["by"]
    replaced = client.get_model_version(name, first.version).tags
    assert replaced["stage.staging.replaced_by_version"] == better.version
    assert client.get_model_version(name, better.version).tags["stage.staging.promoted_by"] == "gate"

    tags = client.get_model_version(name, better.version).tags  # traceability
    assert tags["reward.brightness.mean"] == "0.6" and tags["fid_drift"] == "2.0" and tags["fid"] == "5.0"
    assert tags["base_model"] == json.loads((adapters[1] / "config.json").read_text())["pretrained_model"]
    assert tags["base_model.embedded"] == "true" and tags["train_reward"] == "brightness"
    assert len(tags["git_commit"]) == 40 and tags["adapter.sha256"]
    run = client.get_run(client.get_model_version(name, better.version).run_id)
    assert run.data.params["reward"] == "brightness" and "eval.rewards.brightness.mean" in run.data.metrics

    assert main(["models", "list", "--name", name, "--tracking-uri", mlflow_server.uri]) == 0
    listing = capsys.readouterr().out
    assert f"staging     v{better.version}" in listing and "brightness=0.6" in listing


@pytest.mark.slow
def test_production_version_generates_the_adapters_images(mlflow_server, adapters, tiny, tmp_path, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from alignprop import cache

    name = new_name()
    version = registry.register_adapter(adapters[0], name, mlflow_server.uri).version
    registry.promote(name, version, "staging", mlflow_server.uri)
    registry.promote(name, version, "production", mlflow_server.uri)

    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@production")
    prompts = ["a cat", "two red circles"]
    images = model.predict({"prompt": prompts, "seed": 0})

    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def direct():
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return pipe(prompts, generator=generators, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    output_type="np").images

    base_images = direct()
    pipe.load_lora_weights(adapters[0])
    expected = direct()
    assert images.shape == (2, 32, 32, 3)
    torch.testing.assert_close(torch.from_numpy(images), torch.from_numpy(expected), atol=1e-4, rtol=0)
    assert abs(images - base_images).max() > 1e-2  # the LoRA is really applied
    shifted = model.predict({"prompt": prompts[1:], "seed": 1})  # image i uses seed + i, whatever the batch
    torch.testing.assert_close(torch.from_numpy(shifted[0]), torch.from_numpy(images[1]), atol=1e-6, rtol=0)
    tags = client_for(mlflow_server).get_model_version(name, version).tags
    assert tags["base_model.embedded"] == "true"

    # An adapter trained with a timestep gate is served with it (unfused): a gate above every step is the base model.
    gated_dir = tmp_path / "gated"
    shutil.copytree(adapters[0], gated_dir)
    config = json.loads((gated_dir / "config.json").read_text())
    (gated_dir / "config.json").write_text(json.dumps({**config, "adapter_min_timestep": 1000}))
    gated = registry.register_adapter(gated_dir, name, mlflow_server.uri).version
    served = mlflow.pyfunc.load_model(f"models:/{name}/{gated}").predict({"prompt": prompts, "seed": 0})
    torch.testing.assert_close(torch.from_numpy(served), torch.from_numpy(base_images), atol=1e-4, rtol=0)

    # A base that is not embedded travels as its cache manifest and is fetched (sha256-checked) when loaded.
    monkeypatch.setenv("ALIGNPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGNPROP_MODELS_DIR", str(tmp_path / "models"))
    added = cache.add(str(tiny))
    by_reference = registry.register_adapter(adapters[0], name, mlflow_server.uri, base_model=added.manifest_uri,
                                             embed_base="never").version
    tags = client_for(mlflow_server).get_model_version(name, by_reference).tags
    assert (tags["base_model.embedded"], tags["base_model.id"]) == ("false", added.manifest["id"])
    assert tags["base_model.manifest"] == added.manifest_uri
    monkeypatch.setenv("ALIGNPROP_MODELS_DIR", str(tmp_path / "serving-host"))
    fetched = mlflow.pyfunc.load_model(f"models:/{name}/{by_reference}").predict({"prompt": prompts, "seed": 0})
    assert (tmp_path / "serving-host" / added.manifest["id"] / "model_index.json").is_file()
    torch.testing.assert_close(torch.from_numpy(fetched), torch.from_numpy(images), atol=1e-6, rtol=0)


def test_rollback_custom_ladder_and_legacy_stages(mlflow_server, adapters, tmp_path, capsys):
    name, client, uri = new_name(), client_for(mlflow_server), mlflow_server.uri
    ladder = ["dev", "prod"]
    v1 = registry.register_adapter(adapters[0], name, uri, stages=ladder).version
    v2 = registry.register_adapter(adapters[1], name, uri).version  # the ladder is remembered by the model
    assert registry.resolve_stages(client, name) == ladder
    for version in (v1, v2):
        registry.promote(name, version, "dev", uri)
        registry.promote(name, version, "prod", uri, mirror_legacy_stages=True)
    assert client.get_registered_model(name).aliases["prod"] == v2
    assert main(["promote", "--name", name, "--version", v1, "--to", "prod", "--tracking-uri", uri,
                 "--reason", "rollback: v2 regressed", "--legacy-stages"]) == 0  # rollback
    assert client.get_registered_model(name).aliases["prod"] == v1
    tags = client.get_model_version(name, v1).tags
    assert tags["stage.prod.reason"] == "rollback: v2 regressed"
    assert client.get_model_version(name, v2).tags["stage.prod.replaced_by_version"] == v1
    assert client.get_model_version(name, v1).current_stage == "Production"
    assert client.get_model_version(name, v2).current_stage == "Archived"
    capsys.readouterr()
    assert main(["models", "list", "--name", name, "--tracking-uri", uri, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["holders"] == {"dev": v2, "prod": v1, "candidate": v2} and listing["previous"]["prod"] == v2


def test_promotion_refusals_are_clear(mlflow_server, adapters, capsys):
    name, uri = new_name(), mlflow_server.uri
    version = registry.register_adapter(adapters[0], name, uri).version

    def refused(*args) -> str:
        assert main(["promote", "--name", name, "--tracking-uri", uri, *args]) == 2
        return capsys.readouterr().err

    assert f"{name} has no version 99; existing versions: {version}" in refused("--version", "99", "--to", "staging")
    assert "no version abc" in refused("--version", "abc", "--to", "staging")
    assert "unknown stage 'prod'" in refused("--version", version, "--to", "prod")
    assert "never been in 'staging'" in refused("--version", version, "--to", "production")
    assert main(["promote", "--name", "nope-" + name, "--version", "1", "--to", "staging", "--tracking-uri", uri]) == 2
    assert "no registered model 'nope-" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # the gate refuses a version without evaluation: exit status 1
        main(["promote", "--name", name, "--auto", "--tracking-uri", uri])
    assert exit_.value.code == 1 and "NOT promoted" in capsys.readouterr().out
    assert client_for(mlflow_server).get_registered_model(name).aliases == {"candidate": version}


# ---------------------------------------------------------------------------------------------------------------
# Concurrency and failures
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_registrations_at_once_both_land(mlflow_server, adapters, tmp_path):
    name, client = new_name(), client_for(mlflow_server)
    rewards = [0.5, 0.6]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MLFLOW_TRACKING_URI": mlflow_server.uri}
    procs = [subprocess.Popen([str(helpers.VENV_BIN / "alignprop"), "register", str(adapter), "--name", name,
                               "--gate", "--eval-metrics", str(eval_metrics(tmp_path / f"e{i}.json", reward))],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, (adapter, reward) in enumerate(zip(adapters, rewards))]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    versions = client.search_model_versions(f"name='{name}'")
    assert sorted(v.version for v in versions) == ["1", "2"] and all(v.status == "READY" for v in versions)
    aliases = client.get_registered_model(name).aliases
    assert aliases["candidate"] == "2"
    for alias, version in aliases.items():  # no alias points at a version that is not there
        assert client.get_model_version_by_alias(name, alias).version == version
    best = next(v for v in versions if v.tags["reward.brightness.mean"] == "0.6")
    assert aliases["staging"] == best.version  # the gate saw the other registration, whatever the order
    lock = client.search_registered_models(f"name='{name}{registry.LOCK_SUFFIX}'")
    assert lock == []


class TagWritesTogether:
    """An MlflowClient whose registered-model tag writes wait at a shared barrier, so that every thread that
    decided to write the ladder sends its write at the same moment. Under the registry lock only one thread is
    ever there: its wait times out and it writes alone."""

    def __init__(self, client, barrier):
        self._client, self._barrier = client, barrier

    def __getattr__(self, name):
        return getattr(self._client, name)

    def set_registered_model_tag(self, *args, **kwargs):
        try:
            self._barrier.wait(timeout=0.5)
        except threading.BrokenBarrierError:
            pass
        return self._client.set_registered_model_tag(*args, **kwargs)


def race_init_model(server, name: str, processes: int = 4) -> tuple[list, list]:
    """`processes` threads run a new name's first registration step at once; their ladders and errors."""
    results, errors, barrier = [], [], threading.Barrier(processes)

    def init():
        try:
            results.append(registry._init_model(TagWritesTogether(client_for(server), barrier), name, None))
        except Exception as e:  # noqa: BLE001  (any failure fails the caller's assertion)
            errors.append(e)

    threads = [threading.Thread(target=init) for _ in range(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_first_registrations_racing_on_a_new_name_all_get_its_ladder(mlflow_server):
    """The stage ladder is stored on the registered model by the first registration. Without the lock, racing
    first registrations both inserted that tag and one failed on the tag table's unique key (a CI failure)."""
    client = client_for(mlflow_server)
    for _ in range(16):  # without the lock, 5 of 6 runs of 8 rounds failed
        name = new_name()
        results, errors = race_init_model(mlflow_server, name, processes=8)
        assert errors == [] and results == [list(registry.DEFAULT_STAGES)] * 8
        assert client.get_registered_model(name).tags[registry.STAGES_TAG] == ",".join(registry.DEFAULT_STAGES)
        assert client.search_registered_models(f"name='{name}{registry.LOCK_SUFFIX}'") == []


def test_unreachable_server_fails_fast_and_register_can_be_rerun(mlflow_server, adapters, tmp_path, capsys):
    adapter = adapters[0]
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    assert main(["register", str(adapter), "--name", "x", "--tracking-uri", dead]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and dead in err and "unreachable" in err
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before  # the local outputs survive as they were

    name = new_name()
    assert main(["register", str(adapter), "--name", name, "--tracking-uri", mlflow_server.uri]) == 0
    assert client_for(mlflow_server).get_registered_model(name).aliases == {"candidate": "1"}


def test_register_links_the_training_run_when_it_is_on_the_same_server(mlflow_server, adapters, tmp_path):
    import shutil

    adapter = Path(shutil.copytree(adapters[0], tmp_path / "run"))
    config = json.loads((adapter / "config.json").read_text())
    tracker = tracking.start_run(config, "alignprop", mlflow_server.uri, experiment_name="test-registry",
                                 output_dir=adapter)
    tracker.finish(adapter)
    result = registry.register_adapter(adapter, new_name(), mlflow_server.uri)
    version = client_for(mlflow_server).get_model_version(result.name, result.version)
    assert version.run_id == tracker.run_id and version.tags["train_run_id"] == tracker.run_id


def test_register_refuses_bad_inputs_before_contacting_the_server(adapters, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # never reached: every check below is local
    with pytest.raises(registry.RegistryError, match="holds no pytorch_lora_weights"):
        registry.register_adapter(tmp_path, "x", dead)
    with pytest.raises(registry.RegistryError, match=r"has no model 'ddpo'; it has \['alignprop', 'base'\]"):
        registry.register_adapter(adapters[0], "x", dead, eval_metrics=eval_metrics(tmp_path / "e.json", 0.5),
                                  model_key="ddpo")
    with pytest.raises(registry.RegistryError, match="cannot read evaluation metrics"):
        registry.register_adapter(adapters[0], "x", dead, eval_metrics=tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------------------------
# Pure rules
# ---------------------------------------------------------------------------------------------------------------
def test_gate_decision_rules():
    policy = GatePolicy(margin=0.1, max_fid_drift=2.0)
    cand = {"reward.r.mean": "1.0", "fid_drift": "1.5"}
    assert gate_decision(cand, None, policy, "r")[0]
    assert gate_decision(cand, {"reward.r.mean": "0.85"}, policy, "r")[0]
    assert not gate_decision(cand, {"reward.r.mean": "0.9"}, policy, "r")[0]  # exactly the margin: not "beats"
    assert not gate_decision({**cand, "fid_drift": "2.5"}, None, policy, "r")[0]
    assert "no FID drift" in gate_decision({"reward.r.mean": "1.0"}, None, policy, "r")[1]
    assert gate_decision({"reward.r.mean": "1.0"}, None, GatePolicy(max_fid_drift=math.inf), "r")[0]
    assert "has no evaluated 'r'" in gate_decision({"fid_drift": "0"}, None, policy, "r")[1]
    assert "incumbent" in gate_decision(cand, {}, policy, "r")[1]  # an incumbent without the number: refuse
    assert not gate_decision(cand, None, policy, None)[0]


def test_read_eval_metrics(tmp_path):
    summary = read_eval_metrics(eval_metrics(tmp_path / "m.json", 0.7, fid=8.0, base_fid=3.0))
    assert summary.rewards["brightness"]["mean"] == 0.7 and summary.fid == 8.0 and summary.fid_drift == 5.0
    assert summary.fid_extractor == "tiny-test"
    data = {"models": {"alignprop": {"rewards": {"a": 0.3, "b": {"mean": "n/a"}}, "fid": 4.0}}}
    (tmp_path / "n.json").write_text(json.dumps(data))
    summary = read_eval_metrics(tmp_path / "n.json")  # no base FID: the reference set is the base's samples
    assert summary.rewards == {"a": {"mean": 0.3}} and summary.fid_drift == 4.0
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(registry.RegistryError, match="not valid JSON"):
        read_eval_metrics(tmp_path / "bad.json")


def test_registry_works_with_the_default_sqlite_store(adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    metrics = eval_metrics(tmp_path / "e.json", 0.5)
    result = registry.register_adapter(adapters[0], "local", eval_metrics=metrics, gate=True)
    assert result.decision.promoted
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_model_version_by_alias("local", "staging").version == result.version
    mlmodel = client.download_artifacts(result.run_id, "", str(tmp_path / "dl"))
    assert any((Path(mlmodel) / d / "MLmodel").is_file() for d in os.listdir(mlmodel))


def test_the_lock_retries_when_the_holder_releases_it_during_a_create(mlflow_server):
    """mlflow's server words a name clash by looking the model up; if the holder deleted the lock in between, the
    create answers RESOURCE_DOES_NOT_EXIST (seen in CI with two registrations at once). That is contention: the
    lock must retry, not fail the registration."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    class ReleasedMidCreate:  # a real client; its first lock create meets the race
        def __init__(self, client):
            self.client, self.raced = client, False

        def create_registered_model(self, name, **kw):
            if not self.raced:
                self.raced = True
                raise MlflowException(f"Registered Model with name={name} not found",
                                      error_code=RESOURCE_DOES_NOT_EXIST)
            return self.client.create_registered_model(name, **kw)

        def __getattr__(self, attr):
            return getattr(self.client, attr)

    name, client = new_name(), client_for(mlflow_server)
    racing = ReleasedMidCreate(client)
    with registry._alias_lock(racing, name, wait_s=30):
        assert racing.raced and client.get_registered_model(name + registry.LOCK_SUFFIX)
    assert client.search_registered_models(f"name='{name}{registry.LOCK_SUFFIX}'") == []
