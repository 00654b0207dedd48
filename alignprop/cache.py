"""The model cache: every file stored once by content, one manifest per model, local directory or S3 bucket.

Layout under the cache root (`$ALIGNPROP_CACHE`, default `~/.cache/alignprop`, or `s3://bucket/prefix`):

    blobs/sha256/<sha256>                    every file, stored once by its content hash
    manifests/sha256/<model id>.json         one per model: each file's path, size, sha256 and blob URI,
                                             the source and the revision
    refs/hub/<org>/<name>/<commit>.json      a hub model at a commit -> its model id (no hub call next time)

A model id is the sha256 of the model's file list (paths, sizes, hashes), so the same files get the same id
wherever they came from, and `cache://<model id>` names a model in the default cache root.

    add("runwayml/stable-diffusion-v1-5", revision=...)  # hub snapshot or local directory/file -> AddResult
    fetch(manifest, "models/sd15")                        # download, verify every sha256, repair -> FetchReport
    materialize("cache://<id>")                           # -> a local directory, what model loaders call

`add` uploads the blobs first and the manifest last, so a manifest that exists describes a complete model; a
second `add` of the same model finds its manifest and transfers nothing. With HF_HUB_OFFLINE=1 nothing talks
to the hub: hub models must already be in the local hub cache (or pinned by commit in this cache).
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from alignprop import storage
from alignprop.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "alignprop-model/1"
PUBLISHED_MANIFEST = "alignprop-manifest.json"  # written last into a directory published by publish_dir
STAMPS = ".alignprop-verified.json"  # per fetched directory: size, mtime and sha256 of files already verified
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class CacheError(UserError):
    """A model could not be added, found or verified; the message names the model and the fix."""


@dataclass
class FileEntry:
    path: str  # relative POSIX path inside the model directory
    size: int  # bytes
    sha256: str  # hex digest of the content
    uri: str = ""  # where the bytes are stored (a blob URI or path)


@dataclass
class AddResult:
    role: str  # what the run uses it for (base, a reward's name, fid...)
    manifest_uri: str  # where the manifest was published
    manifest: dict
    hit: bool  # the manifest already existed: nothing was uploaded
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    reused_files: int = 0  # blobs already in the cache (shared with another model, or left by an interrupted add)

    @property
    def cache_uri(self) -> str:
        return f"cache://{self.manifest['id']}"


@dataclass
class FetchReport:
    directory: Path
    downloaded: list[str] = field(default_factory=list)  # missing files, fetched
    repaired: list[str] = field(default_factory=list)  # present but wrong size or sha256, fetched again
    verified: int = 0  # present and correct
    bytes: int = 0  # downloaded


# ---------------------------------------------------------------------------------------------
# Where things live
# ---------------------------------------------------------------------------------------------
def default_root() -> str:
    """The cache root: $ALIGNPROP_CACHE (a directory or s3://bucket/prefix), else ~/.cache/alignprop."""
    return os.environ.get("ALIGNPROP_CACHE") or str(Path("~/.cache/alignprop").expanduser())


def models_dir() -> Path:
    """Where materialize() puts fetched models: $ALIGNPROP_MODELS_DIR, else <local cache root>/models."""
    if os.environ.get("ALIGNPROP_MODELS_DIR"):
        return Path(os.environ["ALIGNPROP_MODELS_DIR"]).expanduser()
    root = default_root()
    return (Path("~/.cache/alignprop").expanduser() if storage.is_s3(root) else Path(root).expanduser()) / "models"


def manifest_key(model_id: str) -> str:
    return f"manifests/sha256/{model_id}.json"


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256}"


# ---------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------
def list_files(directory: str | Path) -> list[str]:
    """Relative POSIX paths of the files under directory, sorted; skips VCS/hub metadata and our own stamps."""
    directory = Path(directory)
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", ".cache"))
        for name in filenames:
            if name == STAMPS or name.startswith(".") and (".tmp-" in name or name.endswith(".part")):
                continue  # our own bookkeeping and half-written files
            found.append((Path(dirpath) / name).relative_to(directory).as_posix())
    return sorted(found)


def hash_files(directory: str | Path, paths: list[str]) -> list[FileEntry]:
    from tqdm.auto import tqdm

    directory = Path(directory)
    total = sum((directory / p).stat().st_size for p in paths)
    entries = []
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"hashing {directory.name}", disable=None) as bar:
        for path in paths:
            size = (directory / path).stat().st_size
            entries.append(FileEntry(path, size, storage.sha256_file(directory / path)))
            bar.update(size)
    return entries


def model_id(entries: list[FileEntry]) -> str:
    """sha256 over the sorted (path, size, sha256) lines: the same files give the same id."""
    lines = sorted(f"{e.path}\t{e.size}\t{e.sha256}\n" for e in entries)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Sources: a local directory or file, or a hub repo at a revision
# ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    directory: Path  # local directory holding the files
    files: list[str]  # relative paths to take from it
    label: str  # what the manifest records as the source
    revision: str | None  # commit for hub sources


def looks_like_hub_id(source: str) -> bool:
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and all(re.fullmatch(r"[\w.-]+", part) for part in source.split("/")))


def resolve_source(source: str, revision: str | None = None) -> Source:
    path = Path(source).expanduser()
    if path.is_dir():
        return Source(path, list_files(path), str(path.resolve()), revision)
    if path.is_file():
        return Source(path.parent, [path.name], str(path.resolve()), revision)
    if looks_like_hub_id(source):
        return hub_snapshot(source, revision)
    raise CacheError(f"model source {source!r} is neither an existing file or directory nor a hub id (org/name); "
                     "fix the path or name")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, revision: str | None) -> Source:
    """Download the files a loader needs (see select_hub_files) with huggingface_hub; with HF_HUB_OFFLINE=1 use
    only the local hub cache. The snapshot folder is named after the resolved commit."""
    import huggingface_hub
    from huggingface_hub.errors import HTTPError

    try:
        if hub_offline():
            path = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
            files = select_hub_files(list_files(path))
        else:
            files = select_hub_files(huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision))
            path = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=files))
    except (OSError, ValueError, HTTPError) as e:
        hint = ("HF_HUB_OFFLINE=1 is set, so the model must already be in the local hub cache "
                "(download it once online, or add it from a local directory)" if hub_offline()
                else "check the repo id, the revision and HF_TOKEN for gated models")
        raise CacheError(f"cannot get {repo_id}@{revision or 'main'} from the Hugging Face hub: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; {hint}") from None
    if not files:
        raise CacheError(f"{repo_id}@{revision or 'main'} has no model files to cache")
    return Source(path, files, repo_id, path.name)


# Other frameworks' weights, docs and images: a PyTorch loader never reads them.
HUB_SKIP = ("*.md", ".gitattributes", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.h5", "*.msgpack", "*.ot", "*.onnx",
            "*.onnx_data", "*.pb", "*.tflite", "*.mlmodel", "*.ckpt", "flax_model*", "tf_model*", "rust_model*",
            "coreml/*", "onnx/*", "openvino/*", "*.fp16.*", "*.non_ema.*", "*.bf16.*")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def select_hub_files(files: list[str]) -> list[str]:
    """The files of a hub repo that diffusers/transformers loaders need.

    Drops HUB_SKIP (other frameworks, fp16/non-EMA variants, docs); in a diffusers pipeline (model_index.json
    at the root) also the root-level single-file checkpoints and the safety checker, which training never loads;
    in a folder holding .safetensors weights, the duplicate .bin weights.
    """
    kept = [f for f in files if not any(fnmatch.fnmatch(f, p) or fnmatch.fnmatch(PurePosixPath(f).name, p)
                                        for p in HUB_SKIP)]
    if "model_index.json" in kept:
        kept = [f for f in kept if not (("/" not in f and f.endswith(WEIGHT_SUFFIXES))
                                        or f.startswith("safety_checker/"))]
    with_safetensors = {str(PurePosixPath(f).parent) for f in kept if f.endswith(".safetensors")}
    return sorted(f for f in kept if not (str(PurePosixPath(f).parent) in with_safetensors
                                          and (f.endswith(".bin") or f.endswith(".bin.index.json"))))


# ---------------------------------------------------------------------------------------------
# add
# ---------------------------------------------------------------------------------------------
def role_for(source: str) -> str:
    """A default role name: the directory's, file's (without suffix) or hub repo's name."""
    path = Path(source.rstrip("/"))
    name = (path.stem if path.is_file() else path.name) or "model"
    return re.sub(r"[^\w.-]+", "-", name)


def add(source: str, revision: str | None = None, root: str | None = None, role: str | None = None,
        force: bool = False, store=None) -> AddResult:
    """Put one model (a local directory or file, or a hub repo) into the cache; return its manifest.

    Blobs go first, each only if the cache lacks it (force: upload all again, which repairs corrupt blobs);
    the manifest goes last. If the manifest already exists the model is a hit and nothing is uploaded.
    """
    store = store or storage.open_store(root or default_root())
    role = role or role_for(source)
    pinned = _pinned_hub_manifest(store, source, revision) if not force else None
    if pinned is not None:
        return AddResult(role, store.uri(manifest_key(pinned["id"])), pinned, hit=True)
    resolved = resolve_source(source, revision)
    entries = hash_files(resolved.directory, resolved.files)
    mid = model_id(entries)
    key = manifest_key(mid)
    if not force and store.exists(key):
        manifest = _parse_manifest(store.read_bytes(key), store.uri(key))
        logger.info("%s is already in the cache as %s; nothing to upload", source, store.uri(key))
        _write_hub_ref(store, resolved, mid)
        return AddResult(role, store.uri(key), manifest, hit=True)
    result = AddResult(role, store.uri(key), {}, hit=False)
    _upload_blobs(store, resolved.directory, entries, force, result)
    manifest = {
        "format": MANIFEST_FORMAT,
        "id": mid,
        "source": resolved.label,
        "revision": resolved.revision,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_bytes": sum(e.size for e in entries),
        "files": [asdict(e) for e in entries],
    }
    store.write_bytes(key, json.dumps(manifest, indent=1).encode())  # last: its presence means complete
    _write_hub_ref(store, resolved, mid)
    result.manifest = manifest
    logger.info("cached %s as %s: %d files uploaded (%d bytes), %d already there", source, result.manifest_uri,
                result.uploaded_files, result.uploaded_bytes, result.reused_files)
    return result


def _upload_blobs(store, directory: Path, entries: list[FileEntry], force: bool, result: AddResult) -> None:
    from tqdm.auto import tqdm

    done: set[str] = set()  # blobs handled in this call (a model may hold the same file twice)
    for entry in tqdm(entries, desc="uploading", unit="file", disable=None):
        key = blob_key(entry.sha256)
        entry.uri = store.uri(key)
        if entry.sha256 in done:
            continue
        done.add(entry.sha256)
        if not force and store.size(key) == entry.size:
            result.reused_files += 1
            continue
        store.upload(directory / entry.path, key)
        result.uploaded_files += 1
        result.uploaded_bytes += entry.size


def _hub_ref_key(repo_id: str, commit: str) -> str:
    return f"refs/hub/{repo_id}/{commit}.json"


def _pinned_hub_manifest(store, source: str, revision: str | None) -> dict | None:
    """A hub model at a full commit hash that was cached before: its manifest, without asking the hub."""
    if not (revision and COMMIT_RE.match(revision) and looks_like_hub_id(source)) or Path(source).exists():
        return None
    try:
        ref = json.loads(store.read_bytes(_hub_ref_key(source, revision)))
        return _parse_manifest(store.read_bytes(manifest_key(ref["id"])), store.uri(manifest_key(ref["id"])))
    except storage.NotFoundError:
        return None


def _write_hub_ref(store, resolved: Source, mid: str) -> None:
    if resolved.revision and COMMIT_RE.match(resolved.revision) and looks_like_hub_id(resolved.label):
        key = _hub_ref_key(resolved.label, resolved.revision)
        if not store.exists(key):
            store.write_bytes(key, json.dumps({"id": mid}).encode())


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------
def manifest_uri_for(ref: str) -> str:
    """`cache://<id>`, a manifest (.json, local or s3://), or a published directory (s3:// prefix or local
    directory holding alignprop-manifest.json) -> the manifest's URI."""
    if ref.startswith("cache://"):
        return storage.open_store(default_root()).uri(manifest_key(ref[len("cache://"):].strip("/")))
    if ref.endswith(".json"):
        return ref
    if storage.is_s3(ref):
        return f"{ref.rstrip('/')}/{PUBLISHED_MANIFEST}"
    return str(Path(ref).expanduser() / PUBLISHED_MANIFEST)


def load_manifest(ref: str) -> dict:
    uri = manifest_uri_for(ref)
    try:
        data = storage.read_bytes(uri)
    except storage.NotFoundError:
        raise CacheError(f"no model-cache manifest at {uri}; put the model in the cache with `alignprop cache add "
                         f"SOURCE` (cache root: {default_root()}) and pass the manifest it prints") from None
    return _parse_manifest(data, uri)


def _parse_manifest(data: bytes, uri: str) -> dict:
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{uri} is not a JSON model-cache manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CacheError(f"{uri} is not a model-cache manifest (expected \"format\": \"{MANIFEST_FORMAT}\"); "
                         "pass a manifest written by `alignprop cache add`")
    if not re.fullmatch(r"[0-9a-f]{64}", str(manifest.get("id"))):
        raise CacheError(f"{uri} has no valid model id (64 hex digits); the manifest is damaged")
    return manifest


# ---------------------------------------------------------------------------------------------
# fetch / materialize
# ---------------------------------------------------------------------------------------------
def fetch(manifest: dict | str, directory: str | Path, trust_stamps: bool = False) -> FetchReport:
    """Download a model's files into directory and check every sha256; a missing file is fetched, a corrupt
    one (wrong size or sha256) fetched again, and both are reported.

    trust_stamps: skip re-hashing files whose size and mtime match what the last verification recorded
    (materialize uses it; `cache fetch` always re-hashes)."""
    from tqdm.auto import tqdm

    if isinstance(manifest, str):
        manifest = load_manifest(manifest)
    directory = Path(directory)
    report = FetchReport(directory)
    stamps = _read_stamps(directory) if trust_stamps else {}
    verified = {}
    stores: dict[str, object] = {}
    entries = [FileEntry(**f) for f in manifest["files"]]
    for entry in tqdm(entries, desc=f"fetching {manifest['id'][:12]}", unit="file", disable=None):
        dest = _inside(directory, entry.path)
        state = _check(dest, entry, stamps.get(entry.path))
        if state != "ok":
            if state == "corrupt":
                logger.warning("%s is corrupt (size or sha256 differs from the manifest); fetching it again", dest)
                report.repaired.append(entry.path)
            else:
                report.downloaded.append(entry.path)
            _download_verified(entry, dest, stores, manifest)
            report.bytes += entry.size
        else:
            report.verified += 1
        stat = dest.stat()
        verified[entry.path] = [stat.st_size, stat.st_mtime_ns, entry.sha256]
    _write_stamps(directory, verified)
    return report


def local_dir(source: str | Path) -> Path:
    """A local directory for source: an existing directory as it is; a manifest (.json), `cache://` URI or
    published s3:// prefix materialized. For loaders of reward and FID weights."""
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    return materialize(str(source))


def materialize(source: str) -> Path:
    """A local directory holding the model a manifest, cache URI or published directory describes, fetched into
    models_dir()/<model id>. Every file's sha256 is checked when it arrives and again whenever its size or mtime
    changed since (a modified or truncated file is fetched again). Model loaders call this."""
    manifest = load_manifest(source)
    target = models_dir() / manifest["id"]
    report = fetch(manifest, target, trust_stamps=True)
    if report.downloaded or report.repaired:
        logger.info("fetched %s into %s: %d files downloaded, %d repaired", source, target,
                    len(report.downloaded), len(report.repaired))
    return target


def _inside(directory: Path, relative: str) -> Path:
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
        raise CacheError(f"manifest file path {relative!r} leaves the model directory; the manifest is invalid")
    return directory.joinpath(*parts)


def _check(dest: Path, entry: FileEntry, stamp: list | None) -> str:
    if not dest.is_file():
        return "missing"
    stat = dest.stat()
    if stat.st_size != entry.size:
        return "corrupt"
    if stamp == [stat.st_size, stat.st_mtime_ns, entry.sha256]:
        return "ok"
    return "ok" if storage.sha256_file(dest) == entry.sha256 else "corrupt"


def _download_verified(entry: FileEntry, dest: Path, stores: dict, manifest: dict, attempts: int = 2) -> None:
    root, key = storage.locate(entry.uri)
    if root not in stores:
        stores[root] = storage.open_store(root)
    # a name of its own, so ranks fetching the same model into one directory never write into each other's file
    partial = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    for attempt in range(1, attempts + 1):
        try:
            stores[root].download(key, partial)
            digest = storage.sha256_file(partial)
        except BaseException:  # an interrupted transfer leaves no stray file behind
            partial.unlink(missing_ok=True)
            raise
        if digest == entry.sha256:
            os.replace(partial, dest)
            return
        partial.unlink()
        logger.warning("%s arrived with sha256 %s, expected %s (attempt %d of %d)", entry.uri, digest,
                       entry.sha256, attempt, attempts)
    raise CacheError(f"the cached copy of {entry.path} at {entry.uri} is corrupt (sha256 {digest}, the manifest "
                     f"says {entry.sha256}); upload it again with `alignprop cache add --force {manifest['source']}`")


def _read_stamps(directory: Path) -> dict:
    try:
        return json.loads((directory / STAMPS).read_text())
    except (OSError, ValueError):
        return {}


def _write_stamps(directory: Path, stamps: dict) -> None:
    storage.LocalStore(directory).write_bytes(STAMPS, json.dumps(stamps).encode())


# ---------------------------------------------------------------------------------------------
# publish a directory at a path (not content-addressed), e.g. a trained adapter
# ---------------------------------------------------------------------------------------------
def publish_dir(directory: str | Path, prefix: str) -> dict:
    """Copy a directory to `prefix` (s3://bucket/key or a local path): files first, then
    alignprop-manifest.json, so a reader (materialize(prefix)) never sees half of it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CacheError(f"{directory} is not a directory; pass the directory to publish")
    store = storage.open_store(prefix)
    entries = hash_files(directory, list_files(directory))
    for entry in entries:
        store.upload(directory / entry.path, entry.path)
        entry.uri = store.uri(entry.path)
    manifest = {"format": MANIFEST_FORMAT, "id": model_id(entries), "source": str(directory.resolve()),
                "revision": None, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "total_bytes": sum(e.size for e in entries), "files": [asdict(e) for e in entries]}
    store.write_bytes(PUBLISHED_MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest
