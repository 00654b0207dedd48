"""The pipelines: compiled YAML (tasks, dependencies, parameter descriptions, accelerators, secrets by reference
only), the submit/schedule commands against a stand-in kfp.Client, and the main pipeline run end to end through
kfp.local on the tiny world model."""

import json
import sys

import pytest
import yaml

import helpers

sys.path.insert(0, str(helpers.ROOT))  # pipelines/ and components/ sit next to alignprop/ in the checkout

from alignprop import cli  # noqa: E402
from pipelines import run  # noqa: E402

SECRET_SENTINELS = {"AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret-9f3c", "AWS_ACCESS_KEY_ID": "sentinel-aws-id-77d1",
                    "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-pw-c0de"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Both pipelines compiled through the CLI, with secret values present in the environment (they must not leak)."""
    out = tmp_path_factory.mktemp("compiled")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SECRET_SENTINELS.items():
            mp.setenv(name, value)
        for name in run.PIPELINES:
            assert cli.main(["pipeline", "compile", "--pipeline", name, "--output", str(out / f"{name}.yaml"),
                             "--image", "registry.example/alignprop:0.1.0"]) == 0
    return {name: (out / f"{name}.yaml").read_text() for name in run.PIPELINES}


def spec_of(text):
    pipeline_spec, platform_spec = yaml.safe_load_all(text)
    return pipeline_spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def dag(spec, component=None):
    node = spec["root"] if component is None else spec["components"][component]
    return {name: set(task.get("dependentTasks", [])) for name, task in node["dag"]["tasks"].items()}


def test_main_pipeline_tasks_and_dependencies(compiled):
    spec, _ = spec_of(compiled["alignprop"])
    assert dag(spec) == {"validate-inputs": set(), "prepare-prompts": {"validate-inputs"},
                         "cache-models": {"validate-inputs"},
                         "condition-branches-1": {"validate-inputs", "prepare-prompts", "cache-models"}}
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]
    conditions = {name: task["triggerPolicy"]["condition"] for name, task in branches.items()}
    with_ddpo = next(name for name, c in conditions.items() if not c.startswith("!"))
    without = next(name for name, c in conditions.items() if c.startswith("!"))
    assert "run_ddpo" in conditions[with_ddpo]
    # DDPO trains beside AlignProp (no edge between them), evaluation waits for both, registration for evaluation
    assert dag(spec, f"comp-{with_ddpo}") == {"train-alignprop": set(), "train-ddpo": set(),
                                              "evaluate": {"train-alignprop", "train-ddpo"},
                                              "register-model": {"evaluate", "train-alignprop"}}
    assert dag(spec, f"comp-{without}") == {"train-alignprop-2": set(), "evaluate-2": {"train-alignprop-2"},
                                            "register-model-2": {"evaluate-2", "train-alignprop-2"}}


def test_every_parameter_has_a_description_and_sd15_defaults(compiled):
    for name, text in compiled.items():
        spec, _ = spec_of(text)
        parameters = spec["root"]["inputDefinitions"]["parameters"]
        undocumented = [p for p, d in parameters.items() if len(d.get("description", "")) < 10]
        assert not undocumented, f"{name}: {undocumented}"
    parameters = spec_of(compiled["alignprop"])[0]["root"]["inputDefinitions"]["parameters"]
    assert parameters["base_model"]["defaultValue"] == "runwayml/stable-diffusion-v1-5"
    assert parameters["preset"]["defaultValue"] == "sd15" and parameters["nodes"]["defaultValue"] == 1
    assert parameters["run_ddpo"]["parameterType"] == "BOOLEAN"


def test_training_and_evaluation_get_an_accelerator_and_gpu_placement(compiled):
    spec, platform = spec_of(compiled["alignprop"])
    executors = spec["deploymentSpec"]["executors"]
    for executor in ("exec-train-alignprop", "exec-train-ddpo", "exec-evaluate"):
        container = executors[executor]["container"]
        assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
        count = container["resources"]["accelerator"]["resourceCount"]
        if executor.startswith("exec-train"):  # decided by the validate step: 1, or 0 while a TrainJob trains
            assert count == "{{$.inputs.parameters['pipelinechannel--validate-inputs-train_step_accelerators']}}"
        else:
            assert count == "1"
        assert container["image"] == "registry.example/alignprop:0.1.0"
        assert "pip install" not in " ".join(container["command"])  # install_kfp_package=False: nothing at run time
        assert platform[executor]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in platform[executor]["tolerations"]
    assert "accelerator" not in executors["exec-register-model"]["container"].get("resources", {})
    # a multi-node TrainJob gets the same accelerators, node selector and tolerations, by the train step's argument
    branch = next(c for c in spec["components"] if "train-alignprop" in spec["components"][c].get("dag", {}).get(
        "tasks", {}))
    argument = spec["components"][branch]["dag"]["tasks"]["train-alignprop"]["inputs"]["parameters"]["trainjob_json"]
    trainjob = json.loads(argument["runtimeValue"]["constant"])
    assert (trainjob["accelerator_resource"], trainjob["accelerators_per_node"]) == ("nvidia.com/gpu", 1)
    assert trainjob["image"] == "registry.example/alignprop:0.1.0"
    assert trainjob["node_selector"] == {"nvidia.com/gpu.present": "true"}


def test_secrets_by_reference_only(compiled):
    for name, text in compiled.items():
        for value in SECRET_SENTINELS.values():
            assert value not in text, f"a secret value leaked into the compiled {name} pipeline"
        _, platform = spec_of(text)
        for executor, settings in platform.items():
            secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in settings["secretAsEnv"]}
            assert secrets["alignprop-s3"] >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, executor
            assert settings["pvcMount"][0]["mountPath"] == "/cache"
        registering = [e for e in platform if e.startswith("exec-register-model")]
        assert registering and all("alignprop-mlflow" in {s["secretName"] for s in platform[e]["secretAsEnv"]}
                                   for e in registering)


def test_sweep_runs_trials_in_parallel_with_a_limit_and_registers_the_best(compiled):
    spec, _ = spec_of(compiled["sweep"])
    tasks = dag(spec)
    loop = next(name for name in tasks if name.startswith("for-loop"))
    assert spec["root"]["dag"]["tasks"][loop]["parameterIterator"]["items"]["inputParameter"]
    assert spec["root"]["dag"]["tasks"][loop]["iteratorPolicy"]["parallelismLimit"] == 4
    assert dag(spec, f"comp-{loop}") == {"train-alignprop": set(), "evaluate": {"train-alignprop"}}
    assert loop in tasks["select-best"] and tasks["register-model"] == {"select-best"}
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {"learning_rates", "truncation_ks", "rewards"} <= {p for p, d in parameters.items()
                                                               if d["parameterType"] == "LIST"}


# ---------------------------------------------------------------------------------------------------------------
# submit and schedule (a stand-in for kfp.Client records what would be sent)
# ---------------------------------------------------------------------------------------------------------------
class FakeClient:
    calls = []

    def __init__(self, host, namespace=None):
        self.calls.append(("init", host, namespace))

    def create_run_from_pipeline_package(self, pipeline_file, **kwargs):
        self.calls.append(("run", yaml.safe_load_all(open(pipeline_file)).__next__()["pipelineInfo"]["name"], kwargs))
        return type("Result", (), {"run_id": "run-123"})()

    def create_experiment(self, name, namespace=None):
        return type("Experiment", (), {"experiment_id": f"exp-{name}"})()

    def create_recurring_run(self, pipeline_package_path, **kwargs):
        name = next(yaml.safe_load_all(open(pipeline_package_path)))["pipelineInfo"]["name"]
        self.calls.append(("recurring", name, kwargs))
        return type("Recurring", (), {"recurring_run_id": "rr-9"})()


@pytest.fixture
def fake_kfp(monkeypatch):
    FakeClient.calls = []
    monkeypatch.setattr(run, "_client", lambda host, namespace: FakeClient(host, namespace))
    return FakeClient.calls


def test_submit_sends_the_compiled_pipeline_with_typed_arguments(fake_kfp, capsys):
    assert cli.main(["pipeline", "submit", "--host", "http://kfp.example:8080", "--param", "num_steps=50",
                     "--param", "run_ddpo=true", "--param", "learning_rate=3e-4", "--namespace", "team-a"]) == 0
    assert fake_kfp[0] == ("init", "http://kfp.example:8080", "team-a")
    kind, name, kwargs = fake_kfp[1]
    assert (kind, name) == ("run", "alignprop")
    assert kwargs["arguments"] == {"num_steps": 50, "run_ddpo": True, "learning_rate": 3e-4}
    assert kwargs["service_account"] == "alignprop-pipeline" and kwargs["experiment_name"] == "alignprop"
    assert "run run-123 started" in capsys.readouterr().out


def test_schedule_is_nightly_one_at_a_time_without_catch_up(fake_kfp):
    assert cli.main(["pipeline", "schedule", "--host", "http://kfp", "--cron", "0 0 2 * * *",
                     "--pipeline", "sweep", "--param", 'learning_rates=[1e-4, 1e-3]']) == 0
    kind, name, kwargs = fake_kfp[-1]
    assert (kind, name) == ("recurring", "alignprop-sweep")
    assert kwargs["cron_expression"] == "0 0 2 * * *"
    assert kwargs["max_concurrency"] == 1 and kwargs["no_catchup"] is True and kwargs["enabled"] is True
    assert kwargs["params"] == {"learning_rates": [1e-4, 1e-3]} and kwargs["experiment_id"] == "exp-alignprop"


@pytest.mark.parametrize("argv, message", [
    (["schedule", "--host", "h", "--cron", "0 2 * * *"], "has 5 fields; Kubeflow Pipelines uses 6, seconds first"),
    (["submit", "--host", "h", "--param", "nodez=2"], "expected NAME=VALUE with NAME one of"),
    (["submit", "--host", "h", "--param", "nodes=two"], "nodes='two'"),
    (["submit", "--host", "h", "--param", "run_ddpo=maybe"], "expected true or false"),
    (["run"], "pass --local"),
])
def test_bad_pipeline_commands_fail_clearly(fake_kfp, capsys, argv, message):
    assert cli.main(["pipeline", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not [c for c in fake_kfp if c[0] != "init"]  # nothing was sent


# ---------------------------------------------------------------------------------------------------------------
# The main pipeline through kfp.local (SubprocessRunner, this environment, the CPU)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_run(tmp_path, tmp_path_factory, monkeypatch):
    """A tiny random-init model and small prompt files: every stage runs, DDPO included, in about a minute."""
    monkeypatch.setenv("ALIGNPROP_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    (tmp_path / "train.txt").write_text("a cat\na dog\na horse\na cow\n")
    (tmp_path / "eval.txt").write_text("a tiger\na lion\n")
    overrides = {"num_inference_steps": 4, "truncation_k": 2, "train_batch_size": 1, "ddpo_samples_per_step": 1}
    return dict(base_model=str(helpers.tiny_model_dir(tmp_path_factory)), prompts=str(tmp_path / "train.txt"),
                eval_prompts=str(tmp_path / "eval.txt"), reward="brightness", eval_rewards="brightness,saturation",
                num_steps=2, config_overrides=json.dumps(overrides), fid_reference="", max_fid_drift=-1.0)


@pytest.mark.slow
def test_main_pipeline_runs_end_to_end_locally(small_run, tmp_path):
    import mlflow

    from alignprop.prompts import load_prompts

    result = run.run_local(tmp_path / "work", params=small_run)
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    version = client.get_model_version("alignprop-world", result.model_version)
    assert version.status == "READY" and result.model_uri == f"models:/alignprop-world/{result.model_version}"
    assert version.tags["primary_reward"] == "brightness"
    assert result.promoted  # the first version beats nobody: the gate (FID check off) promotes it
    assert str(client.get_model_version_by_alias("alignprop-world", "staging").version) == result.model_version
    page = result.report.read_text()
    assert result.report.suffix == ".html" and "<html" in page and "ddpo" in page  # AlignProp and DDPO side by side
    metrics = json.loads((result.report.parent / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "alignprop", "ddpo"}
    assert metrics["prompts"] == ["a tiger", "a lion"]  # the evaluation set, read as prompts (not as JSON lines)
    for method in ("alignprop", "ddpo"):
        (config_file,) = result.pipeline_root.rglob(f"train-{method}/adapter/config.json")
        config = json.loads(config_file.read_text())
        assert config["method"] == method and load_prompts(config["prompts"]) == ["a cat", "a dog", "a horse", "a cow"]
    assert set(metrics["models"]["alignprop"]["rewards"]) == {"brightness", "saturation"}


@pytest.mark.slow
def test_bad_parameter_stops_the_dag_before_training(small_run, tmp_path, capfd):
    with pytest.raises(RuntimeError, match="validate-inputs"):
        run.run_local(tmp_path / "work", params={**small_run, "nodes": 0})
    assert "invalid nodes=0: must be at least 1" in capfd.readouterr().out  # the task's log names the problem
    root = tmp_path / "work" / "pipeline-root"
    assert not list(root.rglob("train-*")) and not list(root.rglob("cache-models"))  # nothing ran after it
