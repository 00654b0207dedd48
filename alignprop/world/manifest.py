"""MANIFEST.json for the world's shipped weights: how they were made and the sha256 of every file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "MANIFEST.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict) -> dict:
    """Write `extra` plus {"files": {relative path: {"sha256", "size"}}} for every file under `directory`."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {**extra, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(directory: Path) -> dict:
    """The manifest of `directory`, after checking every listed file's sha256; ValueError names a mismatch."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        if sha256_file(directory / name) != entry["sha256"]:
            raise ValueError(f"{directory / name} does not match its sha256 in {directory / MANIFEST}")
    return manifest
