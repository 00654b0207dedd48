"""The model registry: adapters become MLflow model versions that move up a ladder of aliases.

    register_adapter("outputs/run", "alignprop-world", eval_metrics="eval/metrics.json", gate=True)
    promote("alignprop-world", 3, "production")          # by hand; rollback = promote the previous version
    auto_promote("alignprop-world", 3)                   # the gate: candidate -> staging only if it is better
    list_versions("alignprop-world")

MLflow 3 deprecates the model-version `stage` field, so a stage is an alias. The ladder is ordered (default
`staging` then `production`; per model, fixed at the first registration, or `--stages`); every new version gets
the `candidate` alias. A version reaches a stage only after it held the one below it (`--force` overrides).

The gate promotes a version to the first stage only when (1) its primary reward beats the holder of the lowest
occupied stage by more than `margin`, and (2) its FID drift is at most `max_fid_drift`. Missing numbers refuse.
Every promotion and refusal is written on the version as tags: `event.<time>` (JSON: action, stage, by, via,
reason), `gate.*` for the last gate outcome, `stage.<stage>.promoted_at|by|reason` and, on the version that
lost a stage, `stage.<stage>.replaced_at|by_version`.

Alias moves happen under a lock, a registered model `<name>.lock` created and deleted around the move (creation is
atomic on the server), so two processes that register or promote at once cannot interleave read-decide-write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from alignprop import storage, tracking
from alignprop.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_STAGES = ("staging", "production")
CANDIDATE = "candidate"  # alias of the newest registered version
STAGES_ENV = "ALIGNPROP_STAGES"  # comma-separated ladder, lowest first
STAGES_TAG = "alignprop.stages"  # the ladder, stored on the registered model
EMBED_BASE_LIMIT_MB = 200.0  # "auto": log base model files into the model version when at most this large
LOCK_SUFFIX = ".lock"
LOCK_WAIT_S = 120.0  # how long to wait for another process's alias move
LOCK_STALE_S = 600.0  # a lock older than this was left by a crashed process and is broken
ADAPTER_FILE = "pytorch_lora_weights.safetensors"


class RegistryError(UserError):
    """A registry request that cannot be done as asked; the message says what to change."""


# ---------------------------------------------------------------------------------------------------------------
# Evaluation metrics (written by `alignprop evaluate`) and the gate
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EvalSummary:
    """One model's entry of an evaluation metrics.json."""

    rewards: dict[str, dict] = field(default_factory=dict)  # reward name -> {"mean", "std", "ci95"}
    fid: float | None = None  # FID of this model's images against the evaluation's reference set
    fid_drift: float | None = None  # FID increase over the base model (or fid itself when the base has none)
    fid_extractor: str | None = None  # feature extractor FID was computed with (values differ per extractor)
    source: str = ""


def read_eval_metrics(path: str | Path, model_key: str = "alignprop", base_key: str = "base") -> EvalSummary:
    """Read `{"models": {model_key: {"rewards": {name: {"mean": ..}}, "fid": .., "fid_extractor": ..}}}`.

    FID drift is the entry's own `fid_drift` if present, else `fid - fid(base)` when the base entry has an FID,
    else `fid` (the reference set is then the base model's own samples). Unknown keys are ignored."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise RegistryError(f"cannot read evaluation metrics {path}: {e.strerror}; pass the metrics.json "
                            "written by `alignprop evaluate`") from e
    except ValueError as e:
        raise RegistryError(f"evaluation metrics {path} is not valid JSON ({e})") from e
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise RegistryError(f"evaluation metrics {path} has no 'models' object; pass the metrics.json written "
                            "by `alignprop evaluate`")
    entry = models.get(model_key)
    if not isinstance(entry, dict):
        raise RegistryError(f"evaluation metrics {path} has no model {model_key!r}; it has "
                            f"{sorted(models) or 'none'}: pass one of them with --model-key")
    rewards = {}
    for name, value in (entry.get("rewards") or {}).items():
        stats = value if isinstance(value, dict) else {"mean": value}
        if _number(stats.get("mean")) is not None:
            rewards[name] = {k: stats[k] for k in ("mean", "std", "ci95") if k in stats}
    fid = _number(entry.get("fid"))
    drift = _number(entry.get("fid_drift"))
    base = models.get(base_key) if model_key != base_key else None
    base_fid = _number(base.get("fid")) if isinstance(base, dict) else None
    if drift is None and fid is not None:
        drift = fid - base_fid if base_fid is not None else fid
    return EvalSummary(rewards, fid, drift, entry.get("fid_extractor"), str(path))


@dataclass
class GatePolicy:
    primary_reward: str | None = None  # reward that decides; None = the version's `primary_reward` tag
    margin: float = 0.0  # the candidate's primary reward must exceed the incumbent's by MORE than this (reward units)
    max_fid_drift: float = 10.0  # largest FID drift allowed (FID units of the evaluation's extractor); inf = no check


@dataclass
class Decision:
    promoted: bool
    version: str
    stage: str
    reason: str
    incumbent: str | None = None  # version the candidate was compared with


def gate_decision(candidate: dict, incumbent: dict | None, policy: GatePolicy, primary: str | None,
                  incumbent_label: str = "") -> tuple[bool, str]:
    """Pure rule: (promote?, why) from the candidate's and incumbent's version tags."""
    if not primary:
        return False, "no primary reward: pass --primary-reward or register with --eval-metrics"
    reward = _number(candidate.get(f"reward.{primary}.mean"))
    if reward is None:
        return False, f"the candidate has no evaluated {primary!r} reward; register it with --eval-metrics"
    drift = _number(candidate.get("fid_drift"))
    fid_note = "FID not checked"
    if math.isfinite(policy.max_fid_drift):
        if drift is None:
            return False, ("the candidate has no FID drift; evaluate it with FID, or pass --max-fid-drift inf "
                           "to skip the check")
        if drift > policy.max_fid_drift:
            return False, f"FID drift {drift:.4g} exceeds the limit {policy.max_fid_drift:g}"
        fid_note = f"FID drift {drift:.4g} <= {policy.max_fid_drift:g}"
    if incumbent is None:
        return True, f"no version holds a stage yet; {primary} {reward:.4g}; {fid_note}"
    best = _number(incumbent.get(f"reward.{primary}.mean"))
    if best is None:
        return False, (f"the incumbent {incumbent_label} has no recorded {primary!r}; compare them yourself and "
                       "use `alignprop promote`")
    if not reward > best + policy.margin:
        return False, (f"{primary} {reward:.4g} does not beat the incumbent {incumbent_label} ({best:.4g}) by more "
                       f"than the margin {policy.margin:g}")
    return True, (f"{primary} {reward:.4g} beats the incumbent {incumbent_label} ({best:.4g}) by "
                  f"{reward - best:.4g} > margin {policy.margin:g}; {fid_note}")


# ---------------------------------------------------------------------------------------------------------------
# Register
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Registration:
    name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    run_id: str
    decision: Decision | None = None


def register_adapter(adapter_dir: str | Path, name: str, tracking_uri: str | None = None,
                     eval_metrics: str | Path | None = None, model_key: str = "alignprop",
                     primary_reward: str | None = None, base_model: str | None = None, embed_base: str = "auto",
                     experiment_name: str | None = None, gate: bool = False, policy: GatePolicy | None = None,
                     stages: list[str] | None = None, mirror_legacy_stages: bool = False) -> Registration:
    """Log the adapter as a pyfunc model, register it as a new version of `name` with traceability tags, give it
    the `candidate` alias and, with `gate`, run the gate. Local files are only read: a failed call can be
    re-run on the same directory."""
    adapter_dir = Path(adapter_dir)
    adapter = adapter_dir / ADAPTER_FILE
    if not adapter.is_file():
        raise RegistryError(f"{adapter_dir} holds no {ADAPTER_FILE}; pass the --output directory of a finished "
                            "`alignprop train` run")
    config = _read_json(adapter_dir / "config.json")
    base_ref = base_model or config.get("pretrained_model")
    if not base_ref:
        raise RegistryError(f"{adapter_dir}/config.json names no base model; pass --base-model")
    evaluation = read_eval_metrics(eval_metrics, model_key) if eval_metrics else None
    primary = primary_reward or _default_primary(config, evaluation)
    base_artifacts, base_tags, manifest = _base_model(base_ref, embed_base)  # checks before the server
    client = tracking.connect(tracking_uri)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    train_info = tracking.read_info(adapter_dir)
    ladder = _init_model(client, name, stages)
    run_id = _registration_run(client, uri, train_info, config, adapter_dir, evaluation,
                               experiment_name or config.get("experiment_name") or "alignprop")
    artifact_path = f"model-{uuid.uuid4().hex[:8]}"
    _log_pyfunc(client, run_id, artifact_path, adapter, adapter_dir / "config.json", base_tags["base_model"],
                base_artifacts, manifest, config)
    tags = _version_tags(adapter, adapter_dir, config, train_info, run_id, evaluation, primary, model_key,
                         base_tags)
    version = _create_version(client, name, f"runs:/{run_id}/{artifact_path}", run_id, tags,
                              description=f"LoRA adapter on {base_ref} trained for {config.get('reward', '?')}")
    with _alias_lock(client, name):
        _set_candidate(client, name)
    logger.info("registered %s version %s (run %s)", name, version, run_id)
    result = Registration(name, version, f"models:/{name}/{version}", run_id)
    if gate:
        result.decision = auto_promote(name, version, tracking_uri=uri, policy=policy, stages=ladder,
                                       by="gate", via="alignprop register --gate", client=client,
                                       mirror_legacy_stages=mirror_legacy_stages)
    return result


def _default_primary(config: dict, evaluation: EvalSummary | None) -> str | None:
    """The training reward when the evaluation measured it, else the evaluation's only reward."""
    reward = config.get("reward")
    if evaluation is None:
        return reward if reward and ":" not in reward and "," not in reward else None
    if reward in evaluation.rewards:
        return reward
    return next(iter(evaluation.rewards)) if len(evaluation.rewards) == 1 else None


def _base_model(reference: str, embed: str) -> tuple[dict, dict, dict | None]:
    """(pyfunc artifacts, tags, cache manifest or None). A base of at most EMBED_BASE_LIMIT_MB (auto) is logged
    into the version, which is then self-contained; a larger one is a reference: its cache manifest travels with
    the version (fetched and sha256-checked when loaded), or else its hub id / absolute path is recorded."""
    if embed not in ("auto", "always", "never"):
        raise RegistryError(f"--embed-base {embed!r}: use auto, always or never")
    tags = {"base_model": reference}
    manifest = None
    if reference.endswith(".json") or reference.startswith(("s3://", "cache://")):
        from alignprop import cache

        manifest = cache.load_manifest(reference)
        size_mb = manifest.get("total_bytes", 0) / 2**20
        tags.update({"base_model.manifest": cache.manifest_uri_for(reference), "base_model.id": manifest["id"],
                     "base_model.source": manifest.get("source"), "base_model.revision": manifest.get("revision")})
        embedded = embed == "always" or (embed == "auto" and size_mb <= EMBED_BASE_LIMIT_MB)
        local = cache.materialize(reference) if embedded else None
    else:
        from alignprop.models import resolve_model_dir

        local = Path(resolve_model_dir(reference))
        if not local.is_dir():  # a hub id
            if embed == "always":
                raise RegistryError(f"--embed-base always: {reference} is not a local directory or cache manifest")
            return {}, {**tags, "base_model.embedded": "false"}, None
        size_mb = sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) / 2**20
        embedded = embed == "always" or (embed == "auto" and size_mb <= EMBED_BASE_LIMIT_MB)
        if not embedded and reference != "world":
            tags["base_model"] = str(local.resolve())  # a relative path would not resolve elsewhere
    tags.update({"base_model.embedded": str(embedded).lower(), "base_model.size_mb": f"{size_mb:.1f}"})
    return ({"base_model": str(local)} if embedded else {}), tags, manifest


def _registration_run(client, uri, train_info, config, adapter_dir, evaluation, experiment_name) -> str:
    """The training run when it lives on this server (the version then links to its params, metrics and
    sample grids); otherwise a new `register` run carrying the config, training metrics and outputs."""
    from mlflow.exceptions import MlflowException

    run_id = train_info.get("run_id") if train_info.get("tracking_uri") == uri else None
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            run_id = None
    tracker = tracking.MlflowTracker(client, run_id, uri)
    if run_id is None:
        experiment_id = tracking.get_or_create_experiment(client, experiment_name)
        tags = {**tracking.provenance_tags("register"), tracking.TAG_OUTPUT_DIR: str(adapter_dir.resolve())}
        if train_info.get("run_id"):
            tags["alignprop.train_run_id"] = train_info["run_id"]
        run = client.create_run(experiment_id, tags=tags, run_name=f"register-{adapter_dir.resolve().name}")
        tracker.run_id = run.info.run_id
        tracker.log_params(config)
        tracker.log_outputs(adapter_dir)
    if evaluation is not None:
        tracker.log_summary({"rewards": evaluation.rewards, "fid": evaluation.fid, "fid_drift": evaluation.fid_drift},
                            prefix="eval.")
        tracker.log_artifact(evaluation.source, "evaluation")
    if tracker.broken:
        raise RegistryError(f"MLflow at {uri} failed while logging run {tracker.run_id}; see the warning above, "
                            "then re-run `alignprop register` (the local outputs are untouched)")
    if run_id is None:
        client.set_terminated(tracker.run_id, "FINISHED")
    return tracker.run_id


def _log_pyfunc(client, run_id, artifact_path, adapter, config_file, base_ref, base_artifacts, manifest,
                config) -> None:
    import mlflow.pyfunc

    from alignprop import pyfunc

    model_config = {"base_model": base_ref, **{k: config[k] for k in ("num_inference_steps", "guidance_scale", "eta",
                                                                      "adapter_min_timestep")
                                               if config.get(k) is not None}}
    artifacts = {"adapter": str(adapter), **base_artifacts}
    if config_file.is_file():
        artifacts["train_config"] = str(config_file)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")  # input is a free dict
        if manifest is not None and "base_model" not in artifacts:  # the version carries its base's manifest
            artifacts["base_manifest"] = os.path.join(tmp, "base_manifest.json")
            Path(artifacts["base_manifest"]).write_text(json.dumps(manifest, indent=1))
        local = os.path.join(tmp, "model")
        mlflow.pyfunc.save_model(local, python_model=pyfunc.__file__, artifacts=artifacts,
                                 model_config=model_config, pip_requirements=_pip_requirements())
        client.log_artifacts(run_id, local, artifact_path)


def _pip_requirements() -> list[str]:
    """The serving environment: exact versions of what loads the pipeline (alignprop itself is needed only
    for bases that are not embedded and for adapters trained with adapter_min_timestep)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("mlflow", "torch", "diffusers", "transformers", "peft", "safetensors", "accelerate"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out


def _version_tags(adapter, adapter_dir, config, train_info, run_id, evaluation, primary, model_key, base_tags):
    sha, dirty = tracking.git_commit()
    tags = {
        **base_tags,
        "adapter.sha256": storage.sha256_file(adapter),
        "adapter.source": str(adapter_dir.resolve()),
        "train_reward": config.get("reward"),
        "train_prompts": config.get("prompts"),
        "method": config.get("method"),
        "seed": config.get("seed"),
        "primary_reward": primary,
        "git_commit": train_info.get("git_commit") or sha,
        "git_dirty": None if train_info.get("git_commit") else (str(dirty).lower() if sha else None),
        "pipeline_run_id": tracking.pipeline_run_id() or train_info.get("pipeline_run_id"),
        "train_run_id": train_info.get("run_id"),
        "run_id": run_id,
        "registered_by": _actor(),
        "registered_at": _now(),
    }
    last = tracking.last_jsonl(adapter_dir / "metrics.jsonl") or {}
    tags.update({f"train.{k}": last[k] for k in ("reward_mean", "reward_std", "step", "images_seen") if k in last})
    if evaluation is not None:
        tags.update({"eval.source": evaluation.source, "eval.model_key": model_key, "fid": evaluation.fid,
                     "fid_drift": evaluation.fid_drift, "fid_extractor": evaluation.fid_extractor})
        for reward, stats in evaluation.rewards.items():
            tags.update({f"reward.{reward}.{k}": (json.dumps(v) if isinstance(v, list) else v)
                         for k, v in stats.items()})
    return {k: str(v) for k, v in tags.items() if v is not None}


def _create_version(client, name, source, run_id, tags, description) -> str:
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
    if mv.status != "READY":
        raise RegistryError(f"{name} version {mv.version} is {mv.status}, not READY: {mv.status_message}")
    return mv.version


def _init_model(client, name: str, stages: list[str] | None) -> list[str]:
    """Create the registered model if needed (race-safe); store or read its stage ladder."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="AlignProp LoRA adapters (alignprop register)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise RegistryError(f"cannot create registered model {name!r}: {tracking.short_error(e)}") from e
    explicit = stages or os.environ.get(STAGES_ENV)
    ladder = _ladder(explicit) if explicit else None  # checked before taking the lock
    # Under the lock: two first registrations that both find no ladder would both insert the tag, and the
    # server's read-then-insert lets the second fail on the tag table's unique key (seen with sqlite).
    with _alias_lock(client, name):
        stored = client.get_registered_model(name).tags.get(STAGES_TAG)
        if stored and ladder is None:
            return _ladder(stored)
        ladder = ladder or _ladder(None)
        if stored != ",".join(ladder):
            client.set_registered_model_tag(name, STAGES_TAG, ",".join(ladder))
    return ladder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise RegistryError(f"{path} is not valid JSON ({e})") from e


# ---------------------------------------------------------------------------------------------------------------
# Stages: the ladder, promotion, the gate
# ---------------------------------------------------------------------------------------------------------------
def _ladder(stages) -> list[str]:
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    ladder = list(stages or DEFAULT_STAGES)
    if len(set(ladder)) != len(ladder) or CANDIDATE in ladder:
        raise RegistryError(f"stages {ladder}: names must be distinct and not {CANDIDATE!r}")
    bad = [s for s in ladder if not s.replace("-", "").replace("_", "").isalnum() or s.isdigit()]
    if bad:
        raise RegistryError(f"stage names {bad} are not valid aliases (letters, digits, '-', '_'; not a number)")
    return ladder


def resolve_stages(client, name: str, stages=None) -> list[str]:
    """--stages, else $ALIGNPROP_STAGES, else the ladder stored on the model, else staging,production."""
    if stages or os.environ.get(STAGES_ENV):
        return _ladder(stages or os.environ.get(STAGES_ENV))
    return _ladder(_registered_model(client, name).tags.get(STAGES_TAG))


def promote(name: str, version: int | str, to: str, tracking_uri: str | None = None, reason: str = "",
            by: str | None = None, force: bool = False, stages=None, mirror_legacy_stages: bool = False,
            via: str = "alignprop promote") -> Decision:
    """Move alias `to` onto `version` (by hand): the version must exist and, unless `force`, must have held
    the stage below. Rollback is promoting the version that held the stage before."""
    client = tracking.connect(tracking_uri)
    ladder = resolve_stages(client, name, stages)
    if to not in ladder:
        raise RegistryError(f"unknown stage {to!r} for {name}; the ladder is {' -> '.join(ladder)}")
    mv = get_version(client, name, version)
    below = ladder[ladder.index(to) - 1] if ladder.index(to) > 0 else None
    if below and not force and f"stage.{below}.promoted_at" not in mv.tags and below not in mv.aliases:
        raise RegistryError(f"{name} version {mv.version} has never been in {below!r}; promote it there first "
                            f"(`alignprop promote --to {below}`), or pass --force")
    why = reason or ("forced" if force else "manual promotion")
    with _alias_lock(client, name):
        previous = holder(client, name, to)
        _move(client, name, mv.version, to, previous, by or _actor(), via, why,
              legacy_stage(ladder, to) if mirror_legacy_stages else None)
    return Decision(True, mv.version, to, why, previous.version if previous else None)


def auto_promote(name: str, version: int | str | None = None, tracking_uri: str | None = None,
                 policy: GatePolicy | None = None, stages=None, by: str = "gate", via: str = "alignprop promote --auto",
                 client=None, mirror_legacy_stages: bool = False) -> Decision:
    """The gate: promote `version` (default: the candidate) to the first stage if `gate_decision` allows it
    against the holder of the lowest occupied stage; record the decision on the version either way."""
    policy = policy or GatePolicy()
    client = client or tracking.connect(tracking_uri)
    ladder = resolve_stages(client, name, stages)
    target = ladder[0]
    if version is None:
        candidate = holder(client, name, CANDIDATE)
        if candidate is None:
            raise RegistryError(f"{name} has no {CANDIDATE!r} version; register one or pass --version")
        version = candidate.version
    mv = get_version(client, name, version)
    primary = policy.primary_reward or mv.tags.get("primary_reward")
    with _alias_lock(client, name):
        incumbent, stage = next(((h, s) for s in ladder if (h := holder(client, name, s)) is not None), (None, None))
        if incumbent is not None and incumbent.version == mv.version:
            decision = Decision(False, mv.version, target, f"already holds {stage!r}", mv.version)
            _record(client, name, mv.version, "refused", target, by, via, decision.reason, gate=True)
            return decision
        label = f"version {incumbent.version} ({stage})" if incumbent else ""
        ok, why = gate_decision(mv.tags, incumbent.tags if incumbent else None, policy, primary, label)
        if ok:
            _move(client, name, mv.version, target, holder(client, name, target), by, via, why,
                  legacy_stage(ladder, target) if mirror_legacy_stages else None, gate=True)
        else:
            _record(client, name, mv.version, "refused", target, by, via, why, gate=True)
    logger.info("gate: %s version %s %s %s: %s", name, mv.version, "promoted to" if ok else "not promoted to",
                target, why)
    return Decision(ok, mv.version, target, why, incumbent.version if incumbent else None)


def _move(client, name, version, stage, previous, by, via, reason, legacy: str | None, gate=False) -> None:
    client.set_registered_model_alias(name, stage, version)
    _record(client, name, version, "promoted", stage, by, via, reason, gate=gate)
    at = _now()
    client.set_model_version_tag(name, version, f"stage.{stage}.promoted_at", at)
    client.set_model_version_tag(name, version, f"stage.{stage}.promoted_by", by)
    client.set_model_version_tag(name, version, f"stage.{stage}.reason", _clip(reason))
    if previous is not None and previous.version != version:
        client.set_model_version_tag(name, previous.version, f"stage.{stage}.replaced_at", at)
        client.set_model_version_tag(name, previous.version, f"stage.{stage}.replaced_by_version", version)
        _record(client, name, previous.version, "replaced", stage, by, via, f"version {version} took {stage!r}")
    if legacy:
        _mirror_legacy_stage(client, name, version, legacy)
    logger.info("%s version %s -> %s (%s)", name, version, stage, reason)


def legacy_stage(ladder: list[str], stage: str) -> str | None:
    """The deprecated stage field mirroring an alias: the top of the ladder is Production, the one below Staging."""
    rank = len(ladder) - 1 - ladder.index(stage)
    return {0: "Production", 1: "Staging"}.get(rank)


def _mirror_legacy_stage(client, name, version, stage) -> None:
    """Also set the deprecated stage field, for teams on older UIs; a server without it only gets a warning."""
    from mlflow.exceptions import MlflowException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client.transition_model_version_stage(name, version, stage, archive_existing_versions=True)
    except MlflowException as e:
        logger.warning("could not mirror %s version %s to legacy stage %s: %s", name, version, stage,
                       tracking.short_error(e))


def _record(client, name, version, action, stage, by, via, reason, gate=False) -> None:
    """Append one event tag (unique key per event: no read-modify-write) and, for the gate, the latest outcome."""
    at = _now()
    event = {"action": action, "stage": stage, "by": by, "via": via, "reason": reason, "user": _actor()}
    if tracking.pipeline_run_id():
        event["pipeline_run_id"] = tracking.pipeline_run_id()
    key = f"event.{at.replace(':', '').replace('-', '')}.{uuid.uuid4().hex[:4]}"
    client.set_model_version_tag(name, version, key, _clip(json.dumps(event)))
    if gate:
        for k, v in {"decision": action, "reason": reason, "at": at, "by": by}.items():
            client.set_model_version_tag(name, version, f"gate.{k}", _clip(v))


def _set_candidate(client, name) -> None:
    """`candidate` = the newest READY version (called under the alias lock)."""
    versions = [int(v.version) for v in client.search_model_versions(f"name='{name}'") if v.status == "READY"]
    if versions:
        client.set_registered_model_alias(name, CANDIDATE, str(max(versions)))


# ---------------------------------------------------------------------------------------------------------------
# Reading the registry
# ---------------------------------------------------------------------------------------------------------------
def get_version(client, name: str, version) -> object:
    """The model version, or a RegistryError naming the versions that do exist."""
    from mlflow.exceptions import MlflowException

    _registered_model(client, name)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        existing = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise RegistryError(f"{name} has no version {version}; existing versions: "
                            f"{', '.join(map(str, existing)) or 'none'}") from e
    if mv.status != "READY":
        raise RegistryError(f"{name} version {mv.version} is {mv.status}, not READY; it cannot be promoted")
    return mv


def holder(client, name: str, alias: str):
    """The version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(f"no registered model {name!r} at {client.tracking_uri}; register one with "
                            "`alignprop register` or check --name / --tracking-uri") from e


def list_versions(name: str, tracking_uri: str | None = None, stages=None) -> dict:
    """{"name", "stages": [...], "holders": {stage: version|None}, "previous": {stage: version|None},
    "versions": [{"version", "aliases", "primary_reward", "reward", "fid_drift", "created", ...}, newest first]}."""
    client = tracking.connect(tracking_uri)
    ladder = resolve_stages(client, name, stages)
    aliases = _registered_model(client, name).aliases  # search results carry no aliases
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: -int(v.version))
    rows = []
    for v in versions:
        primary = v.tags.get("primary_reward")
        held = sorted((a for a, held_by in aliases.items() if held_by == v.version), key=lambda a: (a not in ladder, a))
        rows.append({
            "version": v.version, "aliases": held, "status": v.status,
            "primary_reward": primary, "reward": _number(v.tags.get(f"reward.{primary}.mean")) if primary else None,
            "fid_drift": _number(v.tags.get("fid_drift")), "gate": v.tags.get("gate.decision"),
            "created": datetime.fromtimestamp(v.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "git_commit": (v.tags.get("git_commit") or "")[:10], "run_id": v.run_id,
        })
    holders = {s: next((r["version"] for r in rows if s in r["aliases"]), None) for s in [*ladder, CANDIDATE]}
    previous = {s: _previous_holder(versions, s, aliases.get(s)) for s in ladder}
    return {"name": name, "stages": ladder, "holders": holders, "previous": previous, "versions": rows}


def _previous_holder(versions, stage, current: str | None) -> str | None:
    """The version that most recently lost `stage`: the rollback target."""
    replaced = [(v.tags[f"stage.{stage}.replaced_at"], v.version) for v in versions
                if f"stage.{stage}.replaced_at" in v.tags and v.version != current]
    return max(replaced)[1] if replaced else None


def format_versions(listing: dict) -> str:
    lines = [f"model {listing['name']}  (stages: {' -> '.join(listing['stages'])})"]
    for stage in [*listing["stages"], CANDIDATE]:
        held = listing["holders"].get(stage)
        row = next((r for r in listing["versions"] if r["version"] == held), None)
        metric = (f"  {row['primary_reward']}={row['reward']:.4g}" if row and row["reward"] is not None else "")
        rollback = listing["previous"].get(stage)
        lines.append(f"  {stage:<11} {('v' + held) if held else '-':<5}{metric}"
                     + (f"  (previous: v{rollback})" if rollback else ""))
    header = f"{'version':>7}  {'aliases':<28} {'reward':<24} {'fid_drift':>9}  {'gate':<9} {'created':<16}  commit"
    lines += ["", header]
    for r in listing["versions"]:
        reward = f"{r['primary_reward']}={r['reward']:.4g}" if r["reward"] is not None else "-"
        drift = f"{r['fid_drift']:.4g}" if r["fid_drift"] is not None else "-"
        lines.append(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<28} {reward:<24} {drift:>9}  "
                     f"{r['gate'] or '-':<9} {r['created']:<16}  {r['git_commit'] or '-'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The alias lock
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _alias_lock(client, name: str, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S):
    """Mutual exclusion for alias moves and for writing the stage ladder: creating a registered model is atomic
    (its name is the primary key), so `<name>.lock` exists while one process holds it. A lock older than
    `stale_s` is broken."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"alignprop.lock_owner": f"{_actor()} pid {os.getpid()}"},
                                           description=f"held while alignprop moves aliases of {name}")
            break
        except MlflowException as e:
            # Taken. A server that finds the name taken looks the model up to word its error; when the holder
            # released the lock in between, that lookup fails and the create answers RESOURCE_DOES_NOT_EXIST
            # (mlflow's SqlAlchemyStore.create_registered_model): that is contention too, so try again.
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        if _lock_age_s(client, lock) > stale_s:
            logger.warning("breaking stale registry lock %s", lock)
            _delete_quietly(client, lock)
        elif time.monotonic() > deadline:
            raise RegistryError(f"registry lock {lock!r} has been held for over {wait_s:.0f} s; if no alignprop "
                                f"command is running, delete that registered model and retry")
        time.sleep(0.2)
    try:
        yield
    finally:
        _delete_quietly(client, lock)


def _lock_age_s(client, lock: str) -> float:
    from mlflow.exceptions import MlflowException

    try:
        return time.time() - client.get_registered_model(lock).creation_timestamp / 1000
    except MlflowException:
        return 0.0  # released meanwhile


def _delete_quietly(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException:
        pass


# ---------------------------------------------------------------------------------------------------------------
def _actor() -> str:
    run = tracking.pipeline_run_id()
    return f"{tracking.current_user()}@{socket.gethostname()}" + (f" (pipeline run {run})" if run else "")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


__all__ = ["DEFAULT_STAGES", "CANDIDATE", "GatePolicy", "Decision", "EvalSummary", "Registration", "RegistryError",
           "read_eval_metrics", "gate_decision", "register_adapter", "promote", "auto_promote", "list_versions",
           "format_versions", "holder", "get_version", "resolve_stages"]
