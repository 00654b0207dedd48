"""Cache models: put the base model (and reward weights) into the content-addressed model cache, once."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cache_models(base_model: str, base_revision: str, reward_weights: str, cache_root: str,
                 manifests: Output[Artifact]) -> NamedTuple("CachedModels", [("base_model_ref", str),
                                                                          ("reward_weights_ref", str)]):
    """Add the models to the cache (a hit uploads nothing) and return their manifest URIs, which training and
    evaluation load from, offline.

    Args:
        base_model: hub id, directory or "world" (the tiny model shipped in the package).
        base_revision: hub commit to pin; empty for the default branch.
        reward_weights: directory of learned reward weights; empty when the rewards need none.
        cache_root: cache root, s3://bucket/prefix or a directory.
    """
    import json
    import logging
    import os
    from collections import namedtuple

    from alignprop import cache
    from alignprop.models import resolve_model_dir

    logging.basicConfig(level=logging.INFO)
    refs, written = {}, {}
    for role, source, revision in (("base", base_model, base_revision), ("reward_weights", reward_weights, "")):
        if not source:
            refs[role] = ""
            continue
        if source.endswith(".json") or source.startswith(("cache://", "s3://")):
            refs[role] = source  # already in a cache: a manifest, cache:// URI or published s3:// prefix
            continue
        local = resolve_model_dir(source) if source == "world" else source
        result = cache.add(local, revision=revision or None, root=cache_root, role=role)
        refs[role] = result.manifest_uri
        written[role] = result.manifest
        print(f"{role}: {source} -> {result.manifest_uri} ({'hit' if result.hit else 'uploaded'})")
    os.makedirs(manifests.path, exist_ok=True)
    for role, manifest in written.items():
        with open(os.path.join(manifests.path, f"{role}.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    manifests.metadata.update(refs)
    return namedtuple("CachedModels", ["base_model_ref", "reward_weights_ref"])(refs["base"], refs["reward_weights"])
