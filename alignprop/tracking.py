"""Experiment tracking with MLflow: params, per-step metrics, sample grids and the run's outputs.

    tracker = start_run(config.to_dict(), run_type="alignprop", tracking_uri=config.tracking_uri,
                        experiment_name=config.experiment_name, output_dir=config.output_dir)
    tracker.log_metrics({"reward_mean": ...}, step=step)
    tracker.log_images("samples", images_0_1_tensor, step=step)
    tracker.finish(output_dir, status="FINISHED" | "FAILED")   # logs the output files (the adapter) on success

The server is `tracking_uri`, else `$MLFLOW_TRACKING_URI`, else a sqlite store `mlflow.db` in the working
directory. Every run is tagged with its type, the git commit of the code and the pipeline run id, and its id is
written to `<output_dir>/tracking.json` so `alignprop register` (and a resumed run) can find it again.

A server that cannot be reached when a run starts is an error (before any work is done). Once a run is going,
a logging failure is logged as a warning and tracking stops for that run: hours of training are not thrown away
because the server went down; metrics.jsonl and the adapter stay on disk for `alignprop register`.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from alignprop.errors import UserError

logger = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"  # written into the run's output directory
PIPELINE_RUN_ENV = ("ALIGNPROP_PIPELINE_RUN_ID", "KFP_RUN_ID")  # first one set wins
GIT_COMMIT_ENV = "ALIGNPROP_GIT_COMMIT"  # set in images built without .git
SKIPPED_OUTPUTS = ("checkpoints",)  # output subdirectories not uploaded (resumable state, not results)
TAG_RUN_TYPE = "alignprop.run_type"
TAG_PIPELINE_RUN = "alignprop.pipeline_run_id"
TAG_OUTPUT_DIR = "alignprop.output_dir"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own key: the UI links it
TAG_GIT_DIRTY = "alignprop.git_dirty"
REACHABILITY_TIMEOUT_S = 10.0


class TrackingError(UserError):
    """The tracking server cannot be reached or refused a request; the message names the server and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Where the server is, and what the code is
# ---------------------------------------------------------------------------------------------------------------
def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the sqlite store `mlflow.db` in the working directory (absolute,
    so a later command run elsewhere still finds it through tracking.json)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail fast, with one clear message, when an http(s) tracking server does not answer.

    MLflow's own client retries a refused connection for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7,
    with exponential backoff); one probe of the server's /health endpoint answers the question in at most
    `timeout` seconds. Any HTTP answer counts as reachable: authentication problems surface from MLflow itself.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({_reason(e)}); start it, fix "
            "--tracking-uri / MLFLOW_TRACKING_URI, or disable tracking (--set tracking=false)") from e


def connect(tracking_uri: str | None = None):
    """An MlflowClient for the resolved tracking (and registry) URI, after checking the server answers."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def pipeline_run_id() -> str | None:
    """The Kubeflow pipeline run this process belongs to, if any."""
    return next((os.environ[k] for k in PIPELINE_RUN_ENV if os.environ.get(k)), None)


def git_commit() -> tuple[str | None, bool]:
    """(commit sha of the code that is running, whether its tracked files differ from that commit).

    $ALIGNPROP_GIT_COMMIT wins (container images carry no .git); else `git` in the package's checkout."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV], False
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, False
    return sha or None, bool(dirty)


def provenance_tags(run_type: str | None = None) -> dict[str, str]:
    """Tags that make a run or a model version traceable: run type, git commit, pipeline run, who and where."""
    sha, dirty = git_commit()
    tags = {TAG_RUN_TYPE: run_type, TAG_GIT_COMMIT: sha, TAG_GIT_DIRTY: str(dirty).lower() if sha else None,
            TAG_PIPELINE_RUN: pipeline_run_id(), "mlflow.user": current_user(), "alignprop.host": socket.gethostname()}
    return {k: v for k, v in tags.items() if v}


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (arbitrary uid in a container)
        return "unknown"


def _reason(error: Exception) -> str:
    import requests

    if isinstance(error, requests.Timeout):
        return "no answer within the timeout"
    text = str(error)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "Network is unreachable"):
        if marker in text:
            return marker.lower()
    return f"{type(error).__name__}: {short_error(error)}"


def short_error(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Trackers
# ---------------------------------------------------------------------------------------------------------------
class NullTracker:
    """Tracking disabled (or a non-main process): every call is a no-op."""

    run_id = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_images(self, name: str, images, step: int) -> None:
        pass

    def log_summary(self, metrics: dict, prefix: str = "") -> None:
        pass

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, output_dir=None, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """One MLflow run. Logging failures after the start turn into one warning and a tracker that does nothing."""

    def __init__(self, client, run_id: str, tracking_uri: str, output_dir: str | Path | None = None,
                 info: dict | None = None):
        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri
        self.output_dir = Path(output_dir) if output_dir else None
        self.info = info or {}
        self.broken = False

    # --- logging ---------------------------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(flat), 100):  # the REST API takes at most 100 params per batch
            self._call(self.client.log_batch, self.run_id, params=flat[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_metric_key(k), float(v), now, int(step)) for k, v in metrics.items() if _is_number(v)]
        if batch:
            self._call(self.client.log_batch, self.run_id, metrics=batch)

    def log_summary(self, metrics: dict, prefix: str = "") -> None:
        """Log a (nested) dict of final numbers once, keys joined with '.', e.g. evaluation results."""
        flat = {f"{prefix}{k}": v for k, v in flatten_params(metrics, keep_types=True).items()}
        self.log_metrics({k: v for k, v in flat.items() if _is_number(v)}, step=0)

    def log_images(self, name: str, images, step: int) -> None:
        """Log a batch of images (B, 3, H, W) in [0, 1] as one grid, stepped (the UI shows it per step)."""
        self._call(self.client.log_image, self.run_id, image_grid(images), key=name, step=int(step))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._call(self.client.log_artifacts, self.run_id, str(path), artifact_path)
        else:
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def finish(self, output_dir=None, status: str = "FINISHED") -> None:
        """Upload the output directory (adapter, config.json, metrics; not checkpoints) and end the run."""
        if output_dir is not None and status == "FINISHED":
            self.log_outputs(Path(output_dir))
        self._call(self.client.set_terminated, self.run_id, status)
        self.write_info(status=status if not self.broken else f"{status} (tracking incomplete)")

    def log_outputs(self, output_dir: Path) -> None:
        last = last_jsonl(output_dir / "metrics.jsonl")
        if last:
            self.log_summary({k: v for k, v in last.items() if k != "step"}, prefix="final.")
        self.write_info(status="RUNNING")  # tracking.json itself travels with the outputs
        for path in sorted(output_dir.iterdir()):
            if path.name.startswith(".") or path.name in SKIPPED_OUTPUTS:
                continue
            self.log_artifact(path, "outputs" if path.is_file() else f"outputs/{path.name}")

    def write_info(self, status: str) -> None:
        if self.output_dir is None or not self.output_dir.is_dir():
            return
        info = dict(self.info, run_id=self.run_id, tracking_uri=self.tracking_uri, status=status)
        tmp = self.output_dir / f".{TRACKING_FILE}.tmp"
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
        os.replace(tmp, self.output_dir / TRACKING_FILE)

    def _call(self, fn, *args, **kwargs) -> None:
        if self.broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any client failure: the server is gone or refused; keep training
            self.broken = True
            logger.warning("MLflow logging to %s failed (%s); tracking is off for the rest of run %s. Local "
                           "outputs are unaffected; register them later with `alignprop register`.",
                           self.tracking_uri, short_error(e), self.run_id)


def start_run(params: dict, run_type: str, tracking_uri: str | None = None, enabled: bool = True,
              experiment_name: str = "alignprop", output_dir: str | Path | None = None,
              run_name: str | None = None, tags: dict | None = None, **_) -> MlflowTracker | NullTracker:
    """Start (or, for a resumed run, reopen) an MLflow run and log `params`; raise TrackingError if the server
    cannot be reached. Call it on the main process only."""
    if not enabled:
        return NullTracker()
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    try:
        previous = _resumable_run(client, uri, params, output_dir)
        if previous:
            client.update_run(previous, status="RUNNING")
            logger.info("resuming MLflow run %s at %s", previous, uri)
            tracker = MlflowTracker(client, previous, uri, output_dir, _read_info(output_dir))
            tracker.write_info(status="RUNNING")
            return tracker
        experiment_id = get_or_create_experiment(client, experiment_name)
        all_tags = {**provenance_tags(run_type), **({TAG_OUTPUT_DIR: str(output_dir)} if output_dir else {}),
                    **(tags or {})}
        run_name = run_name or _default_run_name(run_type, output_dir)
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    except MlflowException as e:
        raise TrackingError(f"MLflow at {uri} refused to start a run: {short_error(e)}") from e
    info = {"experiment_id": experiment_id, "experiment_name": experiment_name, "run_type": run_type,
            "git_commit": all_tags.get(TAG_GIT_COMMIT), "pipeline_run_id": all_tags.get(TAG_PIPELINE_RUN)}
    tracker = MlflowTracker(client, run.info.run_id, uri, output_dir, info)
    tracker.log_params(params)
    tracker.write_info(status="RUNNING")
    logger.info("MLflow run %s (%s) in experiment %r at %s", run.info.run_id, run_type, experiment_name, uri)
    return tracker


def get_or_create_experiment(client, name: str) -> str:
    """The experiment's id; safe when several processes create it at once."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it between our two calls
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def read_info(output_dir: str | Path) -> dict:
    """The output directory's tracking.json ({} if there is none or it is unreadable)."""
    return _read_info(output_dir)


def _read_info(output_dir) -> dict:
    if output_dir is None:
        return {}
    try:
        return json.loads((Path(output_dir) / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _resumable_run(client, uri: str, params: dict, output_dir) -> str | None:
    """The run id to continue: only for a resumed training run, on the same server, whose run still exists."""
    if not params.get("resume"):
        return None
    info = _read_info(output_dir)
    if not info.get("run_id") or info.get("tracking_uri") != uri:
        return None
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(info["run_id"])
    except MlflowException:
        return None
    return info["run_id"]


def _default_run_name(run_type: str, output_dir) -> str:
    return f"{run_type}-{Path(output_dir).name}" if output_dir else run_type


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------
def flatten_params(values: dict, prefix: str = "", keep_types: bool = False) -> dict:
    """Nested dicts become dotted keys; lists and None become JSON text (MLflow params are strings)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}.", keep_types))
        elif keep_types:
            out[name] = value
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def _is_number(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, '_', '-', '.', ' ', '/' (and ':'); anything else becomes '_'."""
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in str(key))


def last_jsonl(path: Path) -> dict | None:
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def image_grid(images, max_columns: int = 8):
    """(B, 3, H, W) floats in [0, 1] -> one (rows*H, cols*W, 3) uint8 array, images left to right."""
    import numpy as np
    import torch

    images = torch.as_tensor(images).detach().float().cpu().clamp(0, 1)
    if images.ndim == 3:
        images = images[None]
    b, c, h, w = images.shape
    cols = min(b, max_columns)
    rows = -(-b // cols)
    grid = torch.zeros(c, rows * h, cols * w)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
