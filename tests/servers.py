"""Real servers for tests, on 127.0.0.1 and free ports, started and stopped by the tests themselves.

    with seaweedfs(tmp_path / "s3") as s3:           # SeaweedFS `weed mini`: an S3 API with access keys
        monkeypatch.setenv(...) for k, v in s3.env().items()
        s3.kill(); s3.start()                         # stop and restart on the same ports and data

`weed mini` runs master, volume, filer, S3 and admin servers in one process; each listens on its own port, and
every one is set here so that several servers (and other engineers' test runs) can coexist. It is ready in about
1-2 s on 2 cores; a graceful stop takes about 2 s, a kill is immediate.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"
HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def _admin_port() -> int:
    """weed's admin server also listens on port+10000 (its gRPC port, which its workers assume): find a port
    free at both."""
    for port in free_ports(20):
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port P with P+10000 also free for the SeaweedFS admin server")


@dataclass
class SeaweedFS:
    data_dir: Path
    bucket: str = "test"
    access_key: str = "alignprop-test"
    secret_key: str = "alignprop-test-secret"
    ports: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server (and nothing else)."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,  # ignore any ~/.aws of the machine running the tests
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def command(self) -> list[str]:
        p = self.ports
        return [
            str(WEED), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-bucket={self.bucket}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-admin.port={p['admin']}",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.localSocket={self.data_dir / 's3.sock'}", f"-filer.localSocket={self.data_dir / 'filer.sock'}",
        ]

    def start(self, timeout: float = 60.0) -> "SeaweedFS":
        """Start (or restart, on the same ports and data) and wait until the bucket answers."""
        if not self.ports:
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
            self.ports = dict(zip(names, free_ports(len(names))), admin=_admin_port())
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with status {self.process.returncode}; see "
                                   f"{self.data_dir.parent / (self.data_dir.name + '.log')}")
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not serve bucket {self.bucket} within {timeout} s")
                time.sleep(0.1)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crashed or preempted server would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), killing it if it has not exited within 10 s."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def seaweedfs(data_dir: str | Path, bucket: str = "test"):
    """A running SeaweedFS with an S3 bucket, stopped on exit."""
    server = SeaweedFS(Path(data_dir), bucket=bucket).start()
    try:
        yield server
    finally:
        server.stop()
