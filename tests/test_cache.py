"""alignprop.cache: add / fetch / materialize on a local root and on a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest
import torch

import helpers
from alignprop import cache, storage
from alignprop.errors import UserError
from servers import SeaweedFS

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A tiny pipeline whose UNet (12.5 MB) spans three 5 MiB multipart parts."""
    from alignprop.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("big-model"), block_out_channels=(64, 128))


@pytest.fixture
def local_cache(tmp_path, monkeypatch) -> Path:
    """The default cache root and models directory, in this test's temporary directory."""
    monkeypatch.setenv("ALIGNPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGNPROP_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory):
    """A server of this module's own, which the outage tests stop and restart."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-outage") / "data").start()
    yield server
    server.stop()


def s3_store(root: str, **options):
    return storage.open_store(root, multipart_threshold=1 * MiB, multipart_chunksize=5 * MiB, **options)


def tree(directory: Path) -> dict[str, bytes]:
    return {p: (directory / p).read_bytes() for p in cache.list_files(directory)}


def unet_output(parts) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    ids = parts.tokenizer(["a red circle"], padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return parts.unet(latents, 10, parts.text_encoder(ids)[0]).sample


def test_s3_round_trip_multipart_then_cache_hit_and_load_parts(big_model, s3_prefix, tmp_path, monkeypatch):
    from alignprop.models import load_parts

    monkeypatch.setenv("ALIGNPROP_MODELS_DIR", str(tmp_path / "models"))
    store = s3_store(s3_prefix)
    first = cache.add(str(big_model), store=store)

    local = {e.path: e for e in cache.hash_files(big_model, cache.list_files(big_model))}
    files = {f["path"]: f for f in first.manifest["files"]}
    assert not first.hit and first.uploaded_files == len(local) >= 10
    assert {p: (f["size"], f["sha256"]) for p, f in files.items()} == {p: (e.size, e.sha256) for p, e in local.items()}
    assert all(f["uri"] == f"{s3_prefix}/blobs/sha256/{f['sha256']}" for f in files.values())
    assert first.manifest["source"] == str(big_model.resolve())
    assert store.stats.calls["CreateMultipartUpload"] == 1 and store.stats.calls["UploadPart"] == 3  # the UNet

    again = s3_store(s3_prefix)
    second = cache.add(str(big_model), store=again)
    assert second.hit and second.manifest == first.manifest
    assert again.stats.bytes_up == 0
    assert not {"PutObject", "UploadPart", "CreateMultipartUpload"} & set(again.stats.calls)

    parts = load_parts(first.manifest_uri)  # the materialize hook: fetched, verified, loaded
    assert tree(tmp_path / "models" / first.manifest["id"]) == tree(big_model)
    assert torch.equal(unet_output(parts), unet_output(load_parts(str(big_model))))


def test_server_restart_mid_upload_is_retried_and_manifest_comes_last(big_model, own_s3, monkeypatch, tmp_path):
    for name, value in own_s3.env().items():
        monkeypatch.setenv(name, value)
    root = f"s3://{own_s3.bucket}/restart-{uuid.uuid4().hex[:8]}"
    mid = cache.model_id(cache.hash_files(big_model, cache.list_files(big_model)))
    observer = storage.open_store(root)
    store = s3_store(root)
    parts, seen, restarted = itertools.count(1), {}, []

    def outage(**_):  # on the UNet's 2nd part: check no manifest yet, stop the server, restart it 1 s later
        if next(parts) == 2:
            seen["manifest_before_last_part"] = observer.exists(cache.manifest_key(mid))
            own_s3.kill()
            timer = threading.Timer(1.0, own_s3.start)
            restarted.append(timer)
            timer.start()

    store.client.meta.events.register("before-send.s3.UploadPart", outage)
    result = cache.add(str(big_model), store=store)
    restarted[0].join()

    assert seen["manifest_before_last_part"] is False
    assert store.stats.http_requests > sum(store.stats.calls.values())  # some requests were retried
    assert not result.hit and result.manifest["id"] == mid and observer.exists(cache.manifest_key(mid))
    report = cache.fetch(result.manifest_uri, tmp_path / "fetched")
    assert len(report.downloaded) == len(result.manifest["files"]) and tree(tmp_path / "fetched") == tree(big_model)


def test_failed_upload_publishes_no_manifest_and_a_rerun_resumes(big_model, own_s3, monkeypatch, tmp_path):
    for name, value in own_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ALIGNPROP_MODELS_DIR", str(tmp_path / "models"))
    root = f"s3://{own_s3.bucket}/failed-{uuid.uuid4().hex[:8]}"
    mid = cache.model_id(cache.hash_files(big_model, cache.list_files(big_model)))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = s3_store(root, transfer_attempts=1)
    store.client.meta.events.register("before-send.s3.UploadPart", lambda **_: own_s3.kill())
    try:
        with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
            cache.add(str(big_model), store=store)
    finally:
        own_s3.start()
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")

    reader = storage.open_store(root)
    assert not reader.exists(cache.manifest_key(mid))
    with pytest.raises(cache.CacheError, match="no model-cache manifest"):
        cache.materialize(reader.uri(cache.manifest_key(mid)))
    rerun = cache.add(str(big_model), store=s3_store(root))
    assert rerun.reused_files > 0 and rerun.uploaded_files > 0  # what made it before the outage is kept
    assert rerun.reused_files + rerun.uploaded_files == len(rerun.manifest["files"])
    assert tree(cache.materialize(rerun.manifest_uri)) == tree(big_model)


def test_corrupt_blob_in_the_store_is_detected_and_add_force_repairs_it(tmp_path_factory, s3_prefix, tmp_path):
    model = helpers.tiny_model_dir(tmp_path_factory)
    result = cache.add(str(model), store=s3_store(s3_prefix))
    entry = next(f for f in result.manifest["files"] if f["path"] == "vae/diffusion_pytorch_model.safetensors")
    storage.write_bytes(entry["uri"], b"\0" * entry["size"])  # same size, wrong bytes

    with pytest.raises(cache.CacheError, match=f"{entry['uri']} is corrupt.*--force"):
        cache.fetch(result.manifest_uri, tmp_path / "a")
    repaired = cache.add(str(model), store=s3_store(s3_prefix), force=True)
    assert repaired.uploaded_files == len(result.manifest["files"])
    cache.fetch(result.manifest_uri, tmp_path / "b")
    assert tree(tmp_path / "b") == tree(model)


def test_fetch_repairs_corrupt_and_missing_files(tmp_path_factory, local_cache, tmp_path):
    model = helpers.tiny_model_dir(tmp_path_factory)
    result = cache.add(str(model))
    target = tmp_path / "fetched"
    assert len(cache.fetch(result.manifest_uri, target).downloaded) == len(result.manifest["files"])

    unet = target / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[1000] ^= 0xFF  # one flipped byte: same size, different sha256
    unet.write_bytes(bytes(data))
    (target / "model_index.json").unlink()
    report = cache.fetch(result.manifest_uri, target)

    assert report.repaired == ["unet/diffusion_pytorch_model.safetensors"]
    assert report.downloaded == ["model_index.json"]
    assert report.verified == len(result.manifest["files"]) - 2
    assert tree(target) == tree(model)


def test_interrupted_fetch_leaves_no_stray_file_and_a_rerun_completes(tmp_path_factory, local_cache, tmp_path,
                                                                     monkeypatch):
    result = cache.add(str(helpers.tiny_model_dir(tmp_path_factory)))
    target = tmp_path / "fetched"
    real_download = storage.LocalStore.download

    def dies_half_way(self, key, dest):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(b"half a file")
        raise ConnectionError("connection reset")

    monkeypatch.setattr(storage.LocalStore, "download", dies_half_way)
    with pytest.raises(ConnectionError):
        cache.fetch(result.manifest_uri, target)
    assert not [p for p in target.rglob("*") if p.is_file()]  # no partial file, nothing that looks downloaded

    monkeypatch.setattr(storage.LocalStore, "download", real_download)
    assert len(cache.fetch(result.manifest_uri, target).downloaded) == len(result.manifest["files"])
    assert not list(target.rglob("*.part"))


def test_materialize_by_cache_uri_and_rehash_after_a_change(tmp_path_factory, local_cache, tmp_path):
    model = helpers.tiny_model_dir(tmp_path_factory)
    result = cache.add(str(model))
    directory = cache.materialize(result.cache_uri)
    assert directory == tmp_path / "models" / result.manifest["id"] and tree(directory) == tree(model)

    config = directory / "unet" / "config.json"
    config.write_text(config.read_text().replace("64", "65"))  # a change of the same size
    assert cache.materialize(result.cache_uri) == directory
    assert tree(directory) == tree(model)


def test_reward_weights_directory_and_single_file(local_cache, tmp_path):
    weights = tmp_path / "aesthetic"
    (weights / "sub").mkdir(parents=True)
    (weights / "sub" / "head.pth").write_bytes(os.urandom(5000))
    (weights / "config.yaml").write_text("dim: 768\n")
    single = tmp_path / "inception.pt"
    single.write_bytes(os.urandom(3000))

    from_dir = cache.local_dir(cache.add(str(weights)).manifest_uri)
    from_file = cache.local_dir(cache.add(str(single)).cache_uri)
    assert cache.local_dir(weights) == weights and tree(from_dir) == tree(weights)
    assert tree(from_file) == {"inception.pt": single.read_bytes()}


def test_publish_dir_writes_the_manifest_last_and_materializes(s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNPROP_MODELS_DIR", str(tmp_path / "models"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(os.urandom(4000))
    (adapter / "config.json").write_text("{}")
    with pytest.raises(cache.CacheError, match="no model-cache manifest"):
        cache.materialize(f"{s3_prefix}/adapter")  # nothing published yet

    cache.publish_dir(adapter, f"{s3_prefix}/adapter")
    assert tree(cache.materialize(f"{s3_prefix}/adapter")) == tree(adapter)


def test_not_a_manifest_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"lr": 1}))
    with pytest.raises(UserError, match="not a model-cache manifest"):
        cache.materialize(str(tmp_path / "config.json"))


# ---------------------------------------------------------------------------------------------
# The hub (never contacted: a local hub cache, or fakes of huggingface_hub's functions)
# ---------------------------------------------------------------------------------------------
SD15_FILES = [  # the layout of runwayml/stable-diffusion-v1-5 (abridged)
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin", "unet/flax_model.msgpack",
]


def test_select_hub_files_keeps_what_diffusers_loads():
    assert cache.select_hub_files(SD15_FILES) == [
        "feature_extractor/preprocessor_config.json", "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors"]
    reward = ["config.json", "pytorch_model.bin", "tf_model.h5", "README.md", "head.pth"]  # no safetensors: keep .bin
    assert cache.select_hub_files(reward) == ["config.json", "head.pth", "pytorch_model.bin"]


def fake_hub_cache(hub: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for path, data in files.items():
        target = repo / "snapshots" / commit / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address} with HF_HUB_OFFLINE=1")
        return real_connect(self, address, *args)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_offline_hub_model_comes_from_the_local_hub_cache_without_network(local_cache, tmp_path, monkeypatch,
                                                                          no_network):
    import huggingface_hub
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(tmp_path / "hub", "org/reward-model", commit,
                   {"config.json": b"{}", "model.safetensors": b"w" * 100, "pytorch_model.bin": b"b" * 100,
                    "README.md": b"# card"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    result = cache.add("org/reward-model")
    assert result.manifest["source"] == "org/reward-model" and result.manifest["revision"] == commit
    assert [f["path"] for f in result.manifest["files"]] == ["config.json", "model.safetensors"]
    assert tree(cache.materialize(result.cache_uri)) == {"config.json": b"{}", "model.safetensors": b"w" * 100}

    def hub_called(*args, **kwargs):
        raise AssertionError("the hub was asked for a model pinned in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_called)
    pinned = cache.add("org/reward-model", revision=commit)  # pinned by commit: answered by the cache alone
    assert pinned.hit and pinned.manifest["id"] == result.manifest["id"]


def test_offline_hub_model_missing_locally_is_a_clear_error(local_cache, tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(cache.CacheError, match="org/absent.*HF_HUB_OFFLINE=1"):
        cache.add("org/absent")


def test_online_hub_add_downloads_only_the_selected_files(local_cache, tmp_path, monkeypatch):
    import huggingface_hub

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    hub_files = {name: name.encode() for name in SD15_FILES}
    fake_hub_cache(tmp_path / "hub", "org/sd", commit, hub_files)
    calls = {}

    class FakeApi:
        def list_repo_files(self, repo_id, revision=None):
            calls["listed"] = (repo_id, revision)
            return list(hub_files)

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **_):
        calls["allow_patterns"] = allow_patterns
        return str(tmp_path / "hub" / "models--org--sd" / "snapshots" / commit)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    result = cache.add("org/sd", revision="main")

    assert calls["listed"] == ("org/sd", "main")
    assert calls["allow_patterns"] == cache.select_hub_files(SD15_FILES)
    assert [f["path"] for f in result.manifest["files"]] == calls["allow_patterns"]
    assert result.manifest["revision"] == commit and result.role == "sd"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_cache_add_hit_and_fetch_repair(tmp_path_factory, tmp_path):
    model = helpers.tiny_model_dir(tmp_path_factory)
    env = {"ALIGNPROP_CACHE": str(tmp_path / "cache")}
    first = helpers.run_cli("cache", "add", f"base={model}", "--out", str(tmp_path / "manifests"), env=env)
    second = helpers.run_cli("cache", "add", f"base={model}", env=env)
    assert first.returncode == 0, first.stderr
    assert "base: " in first.stdout and "uploaded 10 files" in first.stdout
    assert "already cached, nothing uploaded" in second.stdout

    manifest = tmp_path / "manifests" / "base.json"
    fetched = helpers.run_cli("cache", "fetch", str(manifest), str(tmp_path / "model"), env=env)
    assert fetched.returncode == 0 and "10 downloaded" in fetched.stdout
    (tmp_path / "model" / "vae" / "config.json").write_text("{}")
    repaired = helpers.run_cli("cache", "fetch", str(manifest), str(tmp_path / "model"), env=env)
    assert "repaired: vae/config.json" in repaired.stdout and tree(tmp_path / "model") == tree(model)

    missing = helpers.run_cli("cache", "add", str(tmp_path / "nowhere"), env=env)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
