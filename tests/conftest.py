"""Server fixtures shared by the test modules (the servers themselves live in servers.py)."""

from __future__ import annotations

import re
import uuid

import pytest

from servers import SeaweedFS


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server on 127.0.0.1 for the whole session (bucket `test`); stopped at the end."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs") / "data").start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The session's S3 server, with the standard AWS variables pointing at it for this test."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


@pytest.fixture
def s3_prefix(s3_env, request):
    """A fresh s3://test/<test name>-<random> prefix for this test."""
    name = re.sub(r"[^\w.-]+", "-", request.node.name)[:40]
    return f"s3://{s3_env.bucket}/{name}-{uuid.uuid4().hex[:8]}"
