"""alignprop.storage against a local directory and a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest

from alignprop import storage
from alignprop.errors import UserError

MiB = 1024 * 1024


def test_local_store_round_trip_leaves_no_temporary_files(tmp_path):
    store = storage.open_store(tmp_path / "root")
    store.write_bytes("a/b.txt", b"hello")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(100_000))
    store.upload(source, "blobs/big")
    store.download("blobs/big", tmp_path / "out" / "big.bin")

    assert store.read_bytes("a/b.txt") == b"hello"
    assert (tmp_path / "out" / "big.bin").read_bytes() == source.read_bytes()
    assert store.size("blobs/big") == 100_000 and store.exists("blobs/big") and not store.exists("nope")
    leftovers = [p for p in (tmp_path / "root").rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    with pytest.raises(storage.NotFoundError, match="nope"):
        store.read_bytes("nope")


def test_s3_round_trip_with_multipart(s3_prefix, tmp_path):
    store = storage.open_store(s3_prefix, multipart_threshold=1 * MiB, multipart_chunksize=5 * MiB)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MiB))  # three parts of 5, 5 and 1 MiB (5 MiB is the S3 minimum part size)
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 1000)

    store.upload(big, "big.bin")
    store.upload(small, "small.txt")
    store.download("big.bin", tmp_path / "back.bin")

    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    assert store.size("big.bin") == 11 * MiB and store.read_bytes("small.txt") == b"x" * 1000
    assert store.stats.calls["CreateMultipartUpload"] == 1 and store.stats.calls["UploadPart"] == 3
    assert store.stats.calls["PutObject"] == 1  # the small file went in one PUT
    assert store.stats.bytes_up == 11 * MiB + 1000
    assert storage.read_bytes(f"{s3_prefix}/small.txt") == b"x" * 1000  # the one-shot helpers agree


def test_s3_wrong_credentials_fail_at_once_naming_bucket_and_cause(s3_prefix, monkeypatch, tmp_path):
    storage.write_bytes(f"{s3_prefix}/key.txt", b"data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    store = storage.open_store(s3_prefix)
    with pytest.raises(UserError, match=r"SignatureDoesNotMatch.*AWS_SECRET_ACCESS_KEY") as read_error:
        store.read_bytes("key.txt")
    (tmp_path / "f").write_bytes(b"x")
    refused = r"refused to upload s3://test/.*/f: SignatureDoesNotMatch"
    with pytest.raises(storage.StorageError, match=refused) as upload_error:
        store.upload(tmp_path / "f", "f")
    assert f"{s3_prefix}/key.txt" in str(read_error.value)
    assert not isinstance(read_error.value, storage.NotFoundError)
    assert "retry" not in str(upload_error.value)
    assert store.stats.calls["GetObject"] == 1  # an auth failure is not retried


def test_s3_missing_bucket_and_key_are_named(s3_env, s3_prefix):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.read_bytes("s3://no-such-bucket/prompts.txt")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.exists("s3://no-such-bucket/prompts.txt")
    with pytest.raises(storage.NotFoundError, match=f"{s3_prefix}/missing.txt does not exist"):
        storage.read_bytes(f"{s3_prefix}/missing.txt")
    assert storage.exists(f"{s3_prefix}/missing.txt") is False


def test_s3_unreachable_endpoint_is_a_clear_error(s3_env, monkeypatch):
    from servers import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = storage.open_store("s3://test/x", transfer_attempts=2, backoff_s=0.01)
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint.*AWS_ENDPOINT_URL") as error:
        store.read_bytes("k")
    assert "s3://test/x/k" in str(error.value)
    assert store.stats.http_requests == 4  # 2 whole-file attempts x 2 botocore attempts each


def test_transient_errors_are_recognised():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "PutObject")

    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(client_error("InternalError", 500))
    assert storage.is_transient(client_error("NoSuchUpload", 404))
    assert not storage.is_transient(client_error("InvalidAccessKeyId", 403))
    assert not storage.is_transient(client_error("NoSuchBucket", 404))
