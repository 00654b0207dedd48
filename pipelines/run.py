"""What `alignprop pipeline compile|submit|schedule|run` do: compile a pipeline for given cluster settings, submit
it or schedule it on a Kubeflow Pipelines server (kfp.Client), or run it here through kfp.local."""

import functools
import inspect
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alignprop.errors import UserError
from pipelines.cluster import ClusterSettings

logger = logging.getLogger(__name__)

PIPELINES = {"alignprop": "pipelines.alignprop_pipeline", "sweep": "pipelines.sweep_pipeline"}
SERVICE_ACCOUNT = "alignprop-pipeline"  # k8s/serviceaccount.yaml


class PipelineError(UserError):
    """Bad pipeline command input; the message says what to change."""


def get_pipeline(name: str = "alignprop", settings: Optional[ClusterSettings] = None):
    """The pipeline function built for these cluster settings (the defaults when None)."""
    import importlib

    if name not in PIPELINES:
        raise PipelineError(f"unknown pipeline {name!r}; use one of {', '.join(PIPELINES)}")
    if settings is None:
        return _default_pipeline(name)
    return importlib.import_module(PIPELINES[name]).build(settings)


@functools.lru_cache(maxsize=None)
def _default_pipeline(name: str):
    return get_pipeline(name, ClusterSettings())  # building one runs its Python body once: worth keeping


def compile_pipeline(name: str, output: str | Path, settings: Optional[ClusterSettings] = None) -> Path:
    from kfp import compiler

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(get_pipeline(name, settings), str(output))
    return output


def parse_params(pipeline, pairs: list[str]) -> dict:
    """`key=value` strings -> pipeline arguments, typed like the parameter's default (lists as JSON)."""
    defaults = {n: p.default for n, p in inspect.signature(pipeline.pipeline_func).parameters.items()}
    params = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in defaults:
            raise PipelineError(f"--param {pair!r}: expected NAME=VALUE with NAME one of {', '.join(defaults)}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                params[key] = raw.lower() in ("true", "1")
            elif isinstance(default, (int, float)):
                params[key] = type(default)(raw)
                if params[key] != params[key] or abs(params[key]) == float("inf"):
                    raise ValueError("KFP parameters must be finite numbers (use e.g. 1e9 for 'no limit')")
            elif isinstance(default, list):
                params[key] = json.loads(raw)
                if not isinstance(params[key], list):
                    raise ValueError("expected a JSON list")
            else:
                params[key] = raw
        except ValueError as e:
            raise PipelineError(f"--param {key}={raw!r}: {e}") from None
    return params


def check_cron(expression: str) -> str:
    """KFP's cron has six fields, seconds first (nightly at 02:00 is `0 0 2 * * *`)."""
    fields = expression.split()
    if len(fields) != 6:
        raise PipelineError(f"cron {expression!r} has {len(fields)} fields; Kubeflow Pipelines uses 6, seconds "
                            "first: nightly at 02:00 is '0 0 2 * * *'")
    return " ".join(fields)


def _client(host: str, namespace: Optional[str]):
    import kfp

    return kfp.Client(host=host, namespace=namespace)


def submit(host: str, name: str = "alignprop", params: Optional[dict] = None,
           settings: Optional[ClusterSettings] = None, experiment: str = "alignprop", run_name: Optional[str] = None,
           namespace: Optional[str] = None, service_account: str = SERVICE_ACCOUNT) -> str:
    """Compile and start one run; returns the run id."""
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(name, Path(tmp) / f"{name}.yaml", settings)
        result = _client(host, namespace).create_run_from_pipeline_package(
            str(package), arguments=params or {}, run_name=run_name, experiment_name=experiment,
            namespace=namespace, service_account=service_account)
    return result.run_id


def schedule(host: str, cron: str, name: str = "alignprop", params: Optional[dict] = None,
             settings: Optional[ClusterSettings] = None, experiment: str = "alignprop",
             job_name: str = "alignprop-nightly", namespace: Optional[str] = None,
             service_account: str = SERVICE_ACCOUNT) -> str:
    """A recurring run: one at a time (max_concurrency 1) and no catch-up of missed slots. Returns its id."""
    cron = check_cron(cron)
    client = _client(host, namespace)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(name, Path(tmp) / f"{name}.yaml", settings)
        recurring = client.create_recurring_run(
            experiment_id=experiment_id, job_name=job_name, cron_expression=cron, max_concurrency=1,
            no_catchup=True, params=params or {}, pipeline_package_path=str(package), enabled=True,
            service_account=service_account)
    return recurring.recurring_run_id


# ---------------------------------------------------------------------------------------------------------------
# Local runs
# ---------------------------------------------------------------------------------------------------------------
def local_params(workdir: Path, preset: str = "tiny") -> dict:
    """Arguments of a CPU run on the tiny world model: every stage, DDPO included, in a few minutes on 2 cores."""
    if preset != "tiny":
        raise PipelineError(f"a local run supports --preset tiny only (got {preset!r}); sd15 needs a GPU cluster: "
                            "use `alignprop pipeline submit`")
    # 40 steps of 4 images at lr 3e-3, K=1, 20 DDIM steps: the setting of benchmarks/world_alignment.py --images 160,
    # where held-out count accuracy rose by 0.078 +- 0.031 (see README, "Does alignment work here?"); DDPO gets the
    # same 160 images
    overrides = {"num_inference_steps": 20, "truncation_k": 1, "train_batch_size": 4, "ddpo_samples_per_step": 4,
                 "sample_every": 0}
    return dict(base_model="world", base_revision="", prompts="world_counts", eval_prompts="world_heldout",
                reward="world_count", reward_weights="", num_steps=40, learning_rate=3e-3, preset="tiny",
                config_overrides=json.dumps(overrides), run_ddpo=True, nodes=1, procs_per_node=1,
                eval_rewards="world_count,world_color", images_per_prompt=4, eval_seed=1234, fid_reference="base",
                fid_extractor="auto", model_name="alignprop-world", gate=True, gate_margin=0.0, max_fid_drift=10.0,
                tracking_uri=f"sqlite:///{(workdir / 'mlflow.db').resolve()}", cache_root=str(workdir / "cache"),
                runs_uri="")


@dataclass
class LocalResult:
    model_version: str
    model_uri: str
    promoted: bool  # did the gate promote the version to the first stage
    report: Path
    tracking_uri: str
    pipeline_root: Path


def run_local(workdir: str | Path = "outputs/pipeline-local", preset: str = "tiny",
              params: Optional[dict] = None) -> LocalResult:
    """The main pipeline, end to end, through kfp.local.SubprocessRunner in this environment (CPU)."""
    from kfp import local

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    arguments = {**local_params(workdir, preset), **(params or {})}
    os.environ.setdefault("ALIGNPROP_MODELS_DIR", str(workdir / "models"))  # the steps' subprocesses inherit it
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "pipeline-root"),
               raise_on_error=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # the project image runs alignprop
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")  # GPUs etc.
        outputs = get_pipeline("alignprop", ClusterSettings(retries=0))(**arguments).outputs
    report = Path(outputs["report_uri"]).with_name("eval_metrics") / "report.html"  # the same page, named .html
    return LocalResult(outputs["model_version"], outputs["model_uri"], outputs["promoted"], report,
                       arguments["tracking_uri"], workdir / "pipeline-root")
