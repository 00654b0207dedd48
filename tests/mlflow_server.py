"""A real `mlflow server` for tests: 127.0.0.1, a free port, sqlite backend, artifacts proxied by the server
(`--artifacts-destination`) to the session's SeaweedFS S3 bucket (the `s3_server` fixture of conftest.py), as in
the cluster; clients need no S3 credentials. `start()` also takes a local directory as destination.

One server per test session: `session_server` is memoised, so test modules that each import the
`mlflow_server` fixture share it; it is stopped when the session ends.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

FAST_FAIL_ENV = {  # a server that goes away fails a client in seconds, not after MLflow's minutes of retries
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


@dataclass
class MlflowServer:
    uri: str
    root: Path
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own process group: the server and its workers
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path, artifacts_destination: str | None = None, extra_env: dict | None = None,
          timeout: float = 90.0) -> MlflowServer:
    """Start `mlflow server` and wait for /health."""
    import requests

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    destination = artifacts_destination or str(root / "artifacts")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", destination,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = root / "server.log"
    env = {**os.environ, **FAST_FAIL_ENV, **(extra_env or {})}
    process = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=root,
                               start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", root, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(server.uri + "/health", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"mlflow server did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


_SESSION: dict[str, MlflowServer] = {}


ARTIFACT_PREFIX = "mlflow-artifacts"  # key prefix of the server's artifacts in the S3 bucket


def session_server(tmp_path_factory, s3=None) -> MlflowServer:
    """The session's server (started on first use, stopped at exit); artifacts go to `s3` if given."""
    if "default" not in _SESSION:
        destination, env = None, {}
        if s3 is not None:
            destination = f"s3://{s3.bucket}/{ARTIFACT_PREFIX}"
            env = {**s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
        server = start(tmp_path_factory.mktemp("mlflow-server"), destination, env)
        _SESSION["default"] = server
        atexit.register(server.stop)
    return _SESSION["default"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """A running tracking server whose artifacts live in SeaweedFS; MLflow clients in this process give up on
    an unreachable server after 2 quick retries."""
    server = session_server(tmp_path_factory, s3_server)
    saved = {k: os.environ.get(k) for k in FAST_FAIL_ENV}
    os.environ.update(FAST_FAIL_ENV)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
