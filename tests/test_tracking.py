"""Experiment tracking against a real MLflow server: what a run logs, where it goes, and failing cleanly."""

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

import helpers
from alignprop import tracking
from alignprop.config import TrainConfig
from mlflow_server import ARTIFACT_PREFIX, free_port, mlflow_server  # noqa: F401  (fixture)

ADAPTER = "pytorch_lora_weights.safetensors"


def fake_run_dir(root: Path, steps: int = 2) -> Path:
    """What a finished training run leaves in --output (contents are stand-ins; tracking does not parse them)."""
    root.mkdir(parents=True)
    (root / ADAPTER).write_bytes(b"lora weights " + bytes(range(64)))
    (root / "config.json").write_text(TrainConfig(output_dir=str(root)).to_json())
    with open(root / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "reward_mean": 0.1 * step, "loss": -0.1 * step}) + "\n")
    (root / "checkpoints" / "checkpoint-000001").mkdir(parents=True)
    (root / "checkpoints" / "checkpoint-000001" / "state.bin").write_bytes(b"x")
    return root


def s3_keys(s3, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_a_run_logs_params_metrics_images_and_adapter(mlflow_server, s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("KFP_RUN_ID", "kfp-run-42")
    out = fake_run_dir(tmp_path / "run")
    params = TrainConfig(output_dir=str(out), lora_target_modules=["to_q", "to_v"]).to_dict()
    tracker = tracking.start_run(params, "alignprop", mlflow_server.uri, experiment_name="test-tracking",
                                 output_dir=out)
    for step in (1, 2):
        tracker.log_metrics({"reward_mean": 0.1 * step, "loss": -0.1 * step, "nan": float("nan"), "flag": True},
                            step=step)
    images = torch.zeros(3, 3, 8, 8)
    images[1] = 1.0  # the middle image is white: checks the grid layout
    tracker.log_images("samples", images, step=2)
    tracker.finish(out)

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("test-tracking")
    found = client.search_runs([experiment.experiment_id], "tags.`alignprop.pipeline_run_id` = 'kfp-run-42'")
    assert [r.info.run_id for r in found] == [tracker.run_id]
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == tracking.flatten_params(params)
    assert json.loads(run.data.params["lora_target_modules"]) == ["to_q", "to_v"]
    assert run.data.tags[tracking.TAG_RUN_TYPE] == "alignprop"
    assert len(run.data.tags[tracking.TAG_GIT_COMMIT]) == 40
    history = client.get_metric_history(tracker.run_id, "reward_mean")
    assert [(m.step, round(m.value, 6)) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.1), (2, 0.2)]
    assert "nan" not in run.data.metrics and "flag" not in run.data.metrics
    assert run.data.metrics["final.reward_mean"] == pytest.approx(0.2)

    outputs = {Path(a.path).name for a in client.list_artifacts(tracker.run_id, "outputs")}
    assert {ADAPTER, "config.json", "metrics.jsonl", tracking.TRACKING_FILE} <= outputs
    assert "checkpoints" not in outputs
    local = Path(client.download_artifacts(tracker.run_id, f"outputs/{ADAPTER}", str(tmp_path / "dl")))
    assert local.read_bytes() == (out / ADAPTER).read_bytes()
    assert any(key.endswith(f"{tracker.run_id}/artifacts/outputs/{ADAPTER}")  # proxied into the S3 bucket
               for key in s3_keys(s3_server, ARTIFACT_PREFIX))
    pngs = [a.path for a in client.list_artifacts(tracker.run_id, "images") if a.path.endswith(".png")]
    full = [np.asarray(Image.open(client.download_artifacts(tracker.run_id, p, str(tmp_path / "im"))))
            for p in pngs]
    grid = next(g for g in full if g.shape[:2] == (8, 24))  # 3 images of 8x8 side by side (plus a thumbnail)
    assert grid[:, 8:16].min() == 255 and grid[:, :8].max() == 0 and grid[:, 16:].max() == 0

    info = json.loads((out / tracking.TRACKING_FILE).read_text())
    assert info["run_id"] == tracker.run_id and info["status"] == "FINISHED"
    assert info["tracking_uri"] == mlflow_server.uri and info["pipeline_run_id"] == "kfp-run-42"


def test_resume_continues_the_same_run(mlflow_server, tmp_path):
    out = fake_run_dir(tmp_path / "run")
    params = TrainConfig(output_dir=str(out)).to_dict()
    first = tracking.start_run(params, "alignprop", mlflow_server.uri, experiment_name="test-tracking",
                               output_dir=out)
    first.log_metrics({"reward_mean": 0.1}, step=1)
    first.finish(None, status="FAILED")
    resumed = tracking.start_run({**params, "resume": True}, "alignprop", mlflow_server.uri,
                                 experiment_name="test-tracking", output_dir=out)
    assert resumed.run_id == first.run_id
    resumed.log_metrics({"reward_mean": 0.3}, step=2)
    resumed.finish(out)
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "reward_mean")) == [1, 2]
    fresh = tracking.start_run(params, "alignprop", mlflow_server.uri, experiment_name="test-tracking",
                               output_dir=out)  # not resuming: a new run
    assert fresh.run_id != first.run_id


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking.resolve_tracking_uri() == "http://example:5000"
    assert tracking.resolve_tracking_uri("http://given:1") == "http://given:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracker = tracking.start_run({"seed": 3}, "evaluate", experiment_name="local")
    tracker.log_metrics({"fid": 1.5}, step=0)
    tracker.finish()
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"seed": "3"} and run.data.metrics == {"fid": 1.5}


def test_unreachable_server_fails_fast_and_clearly(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="unreachable") as error:
        tracking.start_run({"a": 1}, "alignprop", uri, output_dir=tmp_path)
    assert time.monotonic() - start < 5
    assert uri in str(error.value) and "tracking=false" in str(error.value)
    assert not (tmp_path / tracking.TRACKING_FILE).exists()
    assert isinstance(tracking.start_run({"a": 1}, "alignprop", uri, enabled=False), tracking.NullTracker)


def test_losing_the_server_mid_run_warns_once_and_keeps_going(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = tracking.MlflowTracker(MlflowClient(uri), "0" * 32, uri, output_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="alignprop.tracking"):
        for step in range(3):
            tracker.log_metrics({"loss": 1.0}, step=step)
        tracker.log_images("samples", torch.rand(1, 3, 4, 4), step=3)
        tracker.finish(None)
    assert tracker.broken
    assert len([r for r in caplog.records if "tracking is off" in r.message]) == 1
    assert "incomplete" in json.loads((tmp_path / tracking.TRACKING_FILE).read_text())["status"]


def test_image_grid_layout():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.5, 1.0)])
    grid = tracking.image_grid(images, max_columns=2)
    assert grid.shape == (4, 4, 3) and grid.dtype == np.uint8
    assert grid[0, 0, 0] == 0 and grid[0, 2, 0] == 128 and grid[2, 0, 0] == 255 and grid[2, 2, 0] == 0


@pytest.mark.slow
def test_training_logs_to_the_server(mlflow_server, tmp_path_factory, tmp_path):
    from alignprop.train import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    config = TrainConfig(pretrained_model=str(helpers.tiny_model_dir(tmp_path_factory)), prompts=str(prompts),
                         reward="brightness", output_dir=str(tmp_path / "run"), num_steps=2, num_inference_steps=3,
                         truncation_k=1, train_batch_size=1, tracking=True, tracking_uri=mlflow_server.uri,
                         experiment_name="test-train-tracking", sample_every=1).validate()
    out = train(config)
    info = json.loads((Path(out) / tracking.TRACKING_FILE).read_text())
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["reward"] == "brightness"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward_mean")) == [1, 2]
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "outputs")} >= {ADAPTER, "metrics.jsonl"}
    assert any(a.path.endswith(".png") for a in client.list_artifacts(run.info.run_id, "images"))
