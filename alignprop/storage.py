"""Local paths and `s3://` URIs behind one small interface.

    store = open_store("s3://bucket/prefix")          # or a local directory
    store.upload(Path("unet.safetensors"), "blobs/sha256/ab12...")
    data = read_bytes("s3://bucket/prompts.txt")       # or a local path

S3 settings come only from the standard AWS chain: endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), region,
credentials (environment, ~/.aws, web identity...), retries (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE; standard mode with
exponential backoff by default). Files above ALIGNPROP_S3_MULTIPART_THRESHOLD bytes (default 64 MiB) move in
parts. Whole-file transfers that fail for a transient reason (the server went away, a 5xx, a lost multipart
upload) are retried from the start with backoff; wrong credentials or a missing bucket fail at once, with a
message naming the bucket, the key and the cause.

Writes are atomic for readers: a local file is written under a temporary name and renamed; an S3 object exists
only once its PUT (or multipart completion) succeeded. Publishing a set of files (alignprop.cache) writes the
files first and the manifest last.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignprop.errors import UserError

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 8  # botocore attempts per request (first try included) unless AWS_MAX_ATTEMPTS says otherwise
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB  # bytes; larger files are sent in parts of DEFAULT_MULTIPART_CHUNKSIZE
DEFAULT_MULTIPART_CHUNKSIZE = 64 * MiB  # bytes; boto3 raises anything below 5 MiB (the S3 minimum) to 5 MiB
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
                    "AuthorizationHeaderMalformed", "403", "401"}
TRANSIENT_CODES = {"NoSuchUpload", "RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable",
                   "RequestTimeTooSkewed"}


class StorageError(UserError):
    """A read or write failed; the message names the location and the cause."""


class NotFoundError(StorageError):
    """The object or file does not exist."""


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write s3://BUCKET/KEY")
    return bucket, key


def sha256_file(path: str | Path, chunk: int = 4 * MiB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise StorageError(f"{name}={value!r} is not an integer number of bytes/attempts") from None


@dataclass
class TransferStats:
    """What a store actually sent and received; `calls` counts S3 operations by name (retries excluded),
    `http_requests` every HTTP attempt (retries included)."""

    bytes_up: int = 0
    bytes_down: int = 0
    files_up: int = 0
    files_down: int = 0
    calls: Counter = field(default_factory=Counter)
    http_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)


# ---------------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------------
class LocalStore:
    """A directory; keys are relative paths under it."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.stats = TransferStats()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def uri(self, key: str) -> str:
        return str(self.root / key)

    def size(self, key: str) -> int | None:
        path = self.root / key
        return path.stat().st_size if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def read_bytes(self, key: str) -> bytes:
        try:
            data = (self.root / key).read_bytes()
        except OSError as e:
            raise explain(e, self.uri(key), "read") from None
        self.stats.add(bytes_down=len(data), files_down=1)
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            with _atomic_path(self.root / key) as tmp:
                tmp.write_bytes(data)
        except OSError as e:
            raise explain(e, self.uri(key), "write") from None
        self.stats.add(bytes_up=len(data), files_up=1)

    def upload(self, path: str | Path, key: str) -> None:
        try:
            with _atomic_path(self.root / key) as tmp:
                shutil.copyfile(path, tmp)
        except OSError as e:
            raise explain(e, self.uri(key), "upload") from None
        self.stats.add(bytes_up=Path(path).stat().st_size, files_up=1)

    def download(self, key: str, path: str | Path) -> None:
        source = self.root / key
        try:
            with _atomic_path(Path(path)) as tmp:
                shutil.copyfile(source, tmp)
        except OSError as e:
            raise explain(e, self.uri(key), "download") from None
        self.stats.add(bytes_down=source.stat().st_size, files_down=1)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


class S3Store:
    """A bucket, optionally under a key prefix: `s3://bucket/prefix`. One boto3 client per store."""

    def __init__(self, root: str, multipart_threshold: int | None = None, multipart_chunksize: int | None = None,
                 transfer_attempts: int = 3, backoff_s: float = 1.0, max_concurrency: int = 4):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, prefix = split_s3(root)
        self.prefix = prefix.strip("/")
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.transfer_attempts = transfer_attempts  # whole-file attempts, on top of botocore's per-request retries
        self.backoff_s = backoff_s  # first wait between whole-file attempts; doubles each time
        self.stats = TransferStats()
        self._bucket_seen = False
        retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                   "total_max_attempts": _env_int("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)}
        config = Config(retries=retries, connect_timeout=10, read_timeout=120,
                        max_pool_connections=max(10, max_concurrency * 2))
        self.client = boto3.session.Session().client("s3", config=config)
        threshold = multipart_threshold or _env_int("ALIGNPROP_S3_MULTIPART_THRESHOLD", DEFAULT_MULTIPART_THRESHOLD)
        chunksize = multipart_chunksize or _env_int("ALIGNPROP_S3_MULTIPART_CHUNKSIZE", DEFAULT_MULTIPART_CHUNKSIZE)
        self.transfer_config = TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunksize,
                                              max_concurrency=max_concurrency)
        self.client.meta.events.register("before-call.s3", self._count_call)
        self.client.meta.events.register("before-send.s3", self._count_request)

    def __repr__(self) -> str:
        return f"S3Store({self.root!r})"

    def _count_call(self, model, **_):
        with self.stats._lock:
            self.stats.calls[model.name] += 1

    def _count_request(self, **_):
        self.stats.add(http_requests=1)

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.key(key)}"

    def size(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(key))["ContentLength"]
        except Exception as e:
            error = explain(e, self.uri(key), "read")
            if not isinstance(error, NotFoundError):
                raise error from e
        self._check_bucket()
        return None

    def _check_bucket(self) -> None:
        """A HEAD on a key answers a bare 404 for a missing key and for a missing bucket alike: tell them apart
        (once per store)."""
        if self._bucket_seen:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            if _code(_root_cause(e)) in ("404", "NoSuchBucket"):
                raise StorageError(f"bucket {self.bucket!r} does not exist (reading {self.root}); "
                                   "create it or fix the s3:// URI") from None
            raise explain(e, f"s3://{self.bucket}", "read") from e
        self._bucket_seen = True

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def read_bytes(self, key: str) -> bytes:
        def get():
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(key))["Body"].read()
            self.stats.add(bytes_down=len(body), files_down=1)
            return body

        return self._retrying("read", key, get)

    def write_bytes(self, key: str, data: bytes) -> None:
        def put():
            self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data)
            self.stats.add(bytes_up=len(data), files_up=1)

        self._retrying("write", key, put)

    def upload(self, path: str | Path, key: str) -> None:
        def send():
            self.client.upload_file(str(path), self.bucket, self.key(key), Config=self.transfer_config,
                                    Callback=lambda n: self.stats.add(bytes_up=n))
            self.stats.add(files_up=1)

        self._retrying("upload", key, send)

    def download(self, key: str, path: str | Path) -> None:
        def receive():
            with _atomic_path(Path(path)) as tmp:
                self.client.download_file(self.bucket, self.key(key), str(tmp), Config=self.transfer_config,
                                          Callback=lambda n: self.stats.add(bytes_down=n))
            self.stats.add(files_down=1)

        self._retrying("download", key, receive)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(key))
        except Exception as e:
            raise explain(e, self.uri(key), "delete") from e

    def _retrying(self, action: str, key: str, fn):
        """Run a whole-file transfer; retry it from scratch with exponential backoff on transient failures."""
        for attempt in range(1, self.transfer_attempts + 1):
            try:
                return fn()
            except Exception as e:
                error = explain(e, self.uri(key), action)
                if not is_transient(e) or attempt == self.transfer_attempts:
                    raise error from e
                delay = self.backoff_s * 2 ** (attempt - 1)
                logger.warning("%s; retrying the whole transfer in %.1f s (attempt %d of %d)", error, delay,
                               attempt + 1, self.transfer_attempts)
                time.sleep(delay)


def open_store(root: str | Path, **s3_options) -> LocalStore | S3Store:
    """A store for a local directory or an `s3://bucket/prefix` root."""
    return S3Store(str(root), **s3_options) if is_s3(root) else LocalStore(root)


# ---------------------------------------------------------------------------------------------
# One-shot helpers on a full URI or path
# ---------------------------------------------------------------------------------------------
def locate(uri: str | Path) -> tuple[str, str]:
    """Split a URI or path into (store root, key): the bucket for S3, the parent directory for a path."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        return f"s3://{bucket}", key
    path = Path(uri).expanduser()
    return str(path.parent), path.name


def _store_and_key(uri: str | Path):
    root, key = locate(uri)
    return open_store(root), key


def read_bytes(uri: str | Path) -> bytes:
    store, key = _store_and_key(uri)
    return store.read_bytes(key)


def write_bytes(uri: str | Path, data: bytes) -> None:
    store, key = _store_and_key(uri)
    store.write_bytes(key, data)


def upload_file(path: str | Path, uri: str | Path) -> None:
    store, key = _store_and_key(uri)
    store.upload(path, key)


def download_file(uri: str | Path, path: str | Path) -> None:
    store, key = _store_and_key(uri)
    store.download(key, path)


def exists(uri: str | Path) -> bool:
    store, key = _store_and_key(uri)
    return store.exists(key)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def _root_cause(e: BaseException) -> BaseException:
    """boto3 wraps transfer errors (S3UploadFailedError, RetriesExceededError); find the botocore error."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen = e
    while seen is not None and not isinstance(seen, (ClientError, BotoCoreError)):
        seen = getattr(seen, "last_exception", None) or seen.__cause__ or seen.__context__
    return seen if seen is not None else e


def _code(e: BaseException) -> str | None:
    return getattr(e, "response", {}).get("Error", {}).get("Code")


def is_transient(e: BaseException) -> bool:
    """Worth retrying the whole transfer: the connection failed, the server erred (5xx) or lost an upload."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, ReadTimeoutError

    cause = _root_cause(e)
    if isinstance(cause, (ConnectionError, HTTPClientError, ReadTimeoutError)):
        return True
    if isinstance(cause, ClientError):
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or _code(cause) in TRANSIENT_CODES
    return False


def explain(e: BaseException, where: str, action: str) -> StorageError:
    """A StorageError whose message names the location, the cause and the fix."""
    from botocore.exceptions import ClientError, ConnectionError, NoCredentialsError

    if isinstance(e, StorageError):
        return e
    cause = _root_cause(e)
    if isinstance(cause, NoCredentialsError):
        return StorageError(f"no AWS credentials found to {action} {where}; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(cause, ClientError):
        code, message = _code(cause), cause.response.get("Error", {}).get("Message", "").rstrip(".")
        if code == "NoSuchBucket":
            bucket = where[len("s3://"):].split("/", 1)[0]
            return StorageError(f"bucket {bucket!r} does not exist ({action} {where}); create it or fix the URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFoundError(f"{where} does not exist")
        if code in CREDENTIAL_CODES:
            return StorageError(f"S3 refused to {action} {where}: {code} {message}".rstrip() +
                                "; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the AWS profile) and the "
                                "bucket's permissions")
        return StorageError(f"S3 failed to {action} {where}: {code} {message}".rstrip())
    if isinstance(cause, ConnectionError):
        return StorageError(f"cannot reach the S3 endpoint to {action} {where}: {cause}; check AWS_ENDPOINT_URL_S3 "
                            "/ AWS_ENDPOINT_URL and that the server is up")
    if isinstance(cause, FileNotFoundError):
        return NotFoundError(f"{cause.filename or where} does not exist")
    if isinstance(cause, OSError):
        return StorageError(f"cannot {action} {where}: {cause.strerror or cause}")
    return StorageError(f"failed to {action} {where}: {type(cause).__name__}: {cause}")


# ---------------------------------------------------------------------------------------------
# Atomic local writes
# ---------------------------------------------------------------------------------------------
class _atomic_path:
    """`with _atomic_path(dest) as tmp:` write tmp; on success it is renamed onto dest, on failure removed."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.dest)
        else:
            self.tmp.unlink(missing_ok=True)
        return False
