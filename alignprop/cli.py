"""`alignprop` command line: one subcommand per stage, each a thin call into the library.

Errors the user can fix (bad config, missing model, bad prompts...) are printed as one clear line and exit
with status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("alignprop")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="config preset: tiny (CPU world model) or sd15")
    parser.add_argument("--config", help="JSON file of config values, applied over the preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set learning_rate=1e-3")
    parser.add_argument("--output", help="output directory (same as --set output_dir=...)")
    parser.add_argument("--tracking-uri", help="MLflow server (same as --set tracking_uri=...); default "
                        "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory")


def _resolve_train_config(args):
    from alignprop.config import load_config

    overrides = list(args.set)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    if args.tracking_uri:
        overrides.append(f"tracking_uri={args.tracking_uri}")
    return load_config(args.preset, args.config, overrides)


# --- core commands -------------------------------------------------------------------------------
def cmd_train(args):
    config = _resolve_train_config(args)
    if args.method:
        from alignprop.config import update

        config = update(config, {"method": args.method}).validate()
    if config.method == "ddpo":
        from alignprop.ddpo import train_ddpo as run
    else:
        from alignprop.train import train as run
    result = run(config)
    print(f"adapter: {result}")


def cmd_make_tiny_model(args):
    from alignprop.models import make_tiny_model

    path = make_tiny_model(args.directory, seed=args.seed, sample_size=args.latent_size)
    print(f"tiny model written to {path}")


def cmd_bench(args):
    from alignprop.bench import run_benchmarks

    run_benchmarks(model=args.model, steps=args.steps, batch_size=args.batch_size, device=args.device,
                   repeats=args.repeats, unet_config=args.unet_config, dtype=args.dtype, resolution=args.resolution)


# --- world commands (issue 3) ------------------------------------------------------------------
def cmd_world_render(args):
    import json
    from pathlib import Path

    from PIL import Image

    from alignprop.world.render import render_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions, _ = render_dataset(args.n, args.seed, heldout=args.heldout)
    with open(out / "captions.jsonl", "w") as f:
        for i, (image, text) in enumerate(zip(images, captions)):
            Image.fromarray((image * 255).round().astype("uint8")).save(out / f"{i:05d}.png")
            f.write(json.dumps({"file": f"{i:05d}.png", "prompt": text}) + "\n")
    print(f"{args.n} renders written to {out}")


def cmd_world_train_model(args):
    import json

    from alignprop.world.train_model import WorldModelConfig, train_world_model

    config = WorldModelConfig(seed=args.seed)
    if args.unet_steps:
        config.unet_steps = args.unet_steps
    manifest = train_world_model(args.out, config)
    print(json.dumps({"quality": manifest["quality"], "quality_heldout": manifest["quality_heldout"]}, indent=2))


def cmd_world_train_count_reward(args):
    import json

    from alignprop.world.rewards import train_count_regressor

    print(json.dumps(train_count_regressor(args.out, steps=args.steps, seed=args.seed)["held_out"], indent=2))


def cmd_world_evaluate(args):
    import json

    from alignprop.models import resolve_model_dir
    from alignprop.world.train_model import evaluate_model

    metrics = evaluate_model(resolve_model_dir(args.model), args.n, heldout=args.heldout, adapter=args.adapter)
    print(json.dumps(metrics, indent=2))


# --- data plane commands: prompts, cache (issue 4) -----------------------------------------------
def cmd_prompts_prepare(args):
    from alignprop.prompts import prepare

    tokenizer = None
    if args.model:
        from transformers import CLIPTokenizer

        from alignprop.models import resolve_model_dir

        tokenizer = CLIPTokenizer.from_pretrained(resolve_model_dir(args.model), subfolder="tokenizer")
    report = prepare(args.source, args.train_out, args.eval_out, args.eval_fraction, args.seed, tokenizer)
    print(f"prompts from {args.source}: {report.summary()}")
    print(f"train: {report.train} prompts -> {args.train_out}")
    if args.eval_out:
        print(f"eval: {report.eval} prompts -> {args.eval_out}")


def cmd_prompts_list(args):
    from alignprop.prompts import BUILTIN_SETS, load_prompts

    for name in BUILTIN_SETS:
        try:
            prompts = load_prompts(name)
        except ImportError as e:  # the world sets need alignprop.world
            print(f"{name:16s} unavailable ({e})")
            continue
        print(f"{name:16s} {len(prompts):4d} prompts, e.g. {prompts[0]!r}")


def _parse_model_arg(text: str) -> tuple[str, str, str | None]:
    """`[ROLE=]SOURCE[@REVISION]` -> (role, source, revision)."""
    from pathlib import Path

    from alignprop.cache import role_for

    role, sep, rest = text.partition("=")
    if not sep or "/" in role or not role:
        role, rest = "", text
    source, revision = rest, None
    if "@" in rest and not Path(rest).exists():
        source, _, revision = rest.rpartition("@")
    return role or role_for(source), source, revision


def cmd_cache_add(args):
    import json

    from alignprop import cache, storage

    store = storage.open_store(args.cache or cache.default_root())
    for text in args.models:
        role, source, revision = _parse_model_arg(text)
        result = cache.add(source, revision=revision, role=role, force=args.force, store=store)
        m = result.manifest
        if result.hit:
            done = "already cached, nothing uploaded"
        else:
            done = (f"uploaded {result.uploaded_files} files ({result.uploaded_bytes / 1e6:.1f} MB), "
                    f"{result.reused_files} already in the cache")
        print(f"{role}: {result.manifest_uri} ({len(m['files'])} files, {m['total_bytes'] / 1e6:.1f} MB; {done})")
        if args.out:
            path = f"{args.out.rstrip('/')}/{role}.json"
            storage.write_bytes(path, json.dumps(m, indent=1).encode())
            print(f"{role}: manifest written to {path}")


def cmd_cache_fetch(args):
    from alignprop.cache import fetch

    report = fetch(args.manifest, args.directory)
    print(f"{args.directory}: {report.verified} files verified, {len(report.downloaded)} downloaded, "
          f"{len(report.repaired)} corrupt and fetched again ({report.bytes / 1e6:.1f} MB)")
    for path in report.repaired:
        print(f"repaired: {path}")


def _add_data_plane_parsers(sub) -> None:
    p = sub.add_parser("prompts", help="prompt sets: validate, split into train/eval, list the built-in sets")
    prompts_sub = p.add_subparsers(dest="prompts_command", required=True)
    p = prompts_sub.add_parser("prepare", help="validate a prompt source and write train/eval JSONL with stable ids")
    p.add_argument("--source", required=True, help="built-in set name, or a .txt/.jsonl/.csv file (local or s3://)")
    p.add_argument("--train-out", required=True, help="train prompts JSONL (local or s3://)")
    p.add_argument("--eval-out", help="eval prompts JSONL (local or s3://)")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="share of prompts held out for evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/eval split")
    p.add_argument("--model", help="model whose tokenizer sets the length limit (directory, manifest or 'world'); "
                                   "without it: at most 60 words and 300 characters")
    p.set_defaults(func=cmd_prompts_prepare)
    p = prompts_sub.add_parser("list", help="the built-in prompt sets")
    p.set_defaults(func=cmd_prompts_list)

    p = sub.add_parser("cache", help="model cache: content-addressed files + manifests, local or s3://")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    p = cache_sub.add_parser("add", help="put models (local directory/file or hub id) into the cache")
    p.add_argument("models", nargs="+", metavar="[ROLE=]SOURCE[@REVISION]",
                   help="e.g. base=runwayml/stable-diffusion-v1-5@<commit> aesthetic=./weights/aesthetic")
    p.add_argument("--cache", help="cache root, a directory or s3://bucket/prefix (default: $ALIGNPROP_CACHE, "
                                   "else ~/.cache/alignprop)")
    p.add_argument("--out", help="also write each model's manifest to OUT/<role>.json (local or s3://)")
    p.add_argument("--force", action="store_true", help="upload every file again (repairs corrupt cached files)")
    p.set_defaults(func=cmd_cache_add)
    p = cache_sub.add_parser("fetch", help="download a cached model into a directory, verifying every sha256")
    p.add_argument("manifest", help="manifest (.json, local or s3://) or cache://<model id>")
    p.add_argument("directory")
    p.set_defaults(func=cmd_cache_fetch)


# --- registry commands: register, promote, models (issue 7) -------------------------------------
def _gate_policy(args):
    from alignprop.registry import GatePolicy

    return GatePolicy(primary_reward=args.primary_reward, margin=args.margin, max_fid_drift=args.max_fid_drift)


def _print_decision(decision) -> None:
    verb = "promoted to" if decision.promoted else "NOT promoted to"
    print(f"gate: version {decision.version} {verb} {decision.stage}: {decision.reason}")


def cmd_register(args):
    from alignprop.registry import register_adapter

    result = register_adapter(args.adapter_dir, args.name, tracking_uri=args.tracking_uri,
                              eval_metrics=args.eval_metrics, model_key=args.model_key,
                              primary_reward=args.primary_reward, base_model=args.base_model,
                              embed_base=args.embed_base, experiment_name=args.experiment, gate=args.gate,
                              policy=_gate_policy(args), stages=args.stages,
                              mirror_legacy_stages=args.legacy_stages)
    print(f"registered {result.name} version {result.version} ({result.model_uri}, run {result.run_id}); "
          f"alias candidate")
    if result.decision is not None:
        _print_decision(result.decision)


def cmd_promote(args):
    from alignprop.errors import UserError
    from alignprop.registry import auto_promote, promote

    if args.auto:
        decision = auto_promote(args.name, args.version, tracking_uri=args.tracking_uri, policy=_gate_policy(args),
                                stages=args.stages, mirror_legacy_stages=args.legacy_stages)
        _print_decision(decision)
        if not decision.promoted:
            sys.exit(1)
        return
    if args.version is None or args.to is None:
        raise UserError("promote needs --version N --to STAGE (or --auto to run the gate)")
    decision = promote(args.name, args.version, args.to, tracking_uri=args.tracking_uri, reason=args.reason or "",
                       by=args.by, force=args.force, stages=args.stages, mirror_legacy_stages=args.legacy_stages)
    was = f" (was version {decision.incumbent})" if decision.incumbent else ""
    print(f"{args.name} version {decision.version} now holds {decision.stage}{was}")


def cmd_models_list(args):
    import json

    from alignprop.registry import format_versions, list_versions

    listing = list_versions(args.name, tracking_uri=args.tracking_uri, stages=args.stages)
    print(json.dumps(listing, indent=2) if args.json else format_versions(listing))


def _add_registry_parsers(sub) -> None:
    def common(p):
        p.add_argument("--name", required=True, help="registered model name")
        p.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
        p.add_argument("--stages", help="stage ladder, lowest first (default: the model's, else staging,production)")

    def gate(p):
        p.add_argument("--primary-reward", help="reward the gate compares (default: the training reward)")
        p.add_argument("--margin", type=float, default=0.0,
                       help="required improvement over the incumbent (reward units)")
        p.add_argument("--max-fid-drift", type=float, default=10.0, help="largest allowed FID drift; 'inf' disables")
        p.add_argument("--legacy-stages", action="store_true", help="also set MLflow's deprecated stage field")

    p = sub.add_parser("register", help="register a trained adapter as an MLflow model version (alias candidate)")
    p.add_argument("adapter_dir", help="--output directory of `alignprop train` (pytorch_lora_weights.safetensors)")
    common(p)
    p.add_argument("--eval-metrics", help="metrics.json of `alignprop evaluate` (rewards and FID become tags)")
    p.add_argument("--model-key", default="alignprop", help="this adapter's entry under 'models' in --eval-metrics")
    p.add_argument("--base-model", help="base model reference (default: pretrained_model of config.json)")
    p.add_argument("--embed-base", default="auto", choices=["auto", "always", "never"],
                   help="log the base model files into the version (auto: when a local directory <= 200 MB)")
    p.add_argument("--experiment", help="MLflow experiment (default: the training config's)")
    p.add_argument("--gate", action="store_true", help="then promote to the first stage if the gate passes")
    gate(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="move a stage alias to a version (rollback = promote the previous one)")
    common(p)
    p.add_argument("--version", help="model version (with --auto: default the candidate)")
    p.add_argument("--to", help="stage to move, e.g. staging or production")
    p.add_argument("--auto", action="store_true", help="run the gate: promote to the first stage only if better")
    p.add_argument("--reason", help="why (recorded on the version)")
    p.add_argument("--by", help="who (default: user@host)")
    p.add_argument("--force", action="store_true", help="skip the rule that a version must have held the stage below")
    gate(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("models", help="inspect registered models")
    models_sub = p.add_subparsers(dest="models_command", required=True)
    p = models_sub.add_parser("list", help="versions of a model, who holds each stage, key metrics")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models_list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignprop", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="finetune LoRA adapters on a reward (AlignProp, or the DDPO baseline)")
    _add_config_args(p)
    p.add_argument("--method", choices=["alignprop", "ddpo"], help="same as --set method=...")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("make-tiny-model", help="write a seeded random-init SD-shaped pipeline (diffusers format)")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-size", type=int, default=16, help="latent side; images are twice as large")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("bench", help="print memory and speed figures of the differentiable sampler")
    p.add_argument("--model", default="tiny", help="'tiny' (random-init tiny UNet) or a diffusers directory")
    p.add_argument("--unet-config", help="UNet config JSON for a random-init model of real size (e.g. SD 1.5)")
    p.add_argument("--steps", default="10,20,40", help="numbers of denoising steps that keep their graph")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--resolution", type=int, help="image side for --unet-config models (SD 1.5: 512)")
    p.set_defaults(func=cmd_bench)

    # --- world commands (issue 3) ---
    world = sub.add_parser("world", help="the synthetic world: renderer, tiny model, count reward, metrics")
    wsub = world.add_subparsers(dest="world_command", required=True)
    p = wsub.add_parser("render", help="write rendered PNGs and captions.jsonl")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", action="store_true", help="render the held-out (colour, shape) pairs")
    p.set_defaults(func=cmd_world_render)
    p = wsub.add_parser("train-model", help="train the tiny text-to-image world model (about 15 min on 2 cores)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-steps", type=int, help="override the UNet step count")
    p.set_defaults(func=cmd_world_train_model)
    p = wsub.add_parser("train-count-reward", help="train the world_count regressor on renders")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_world_train_count_reward)
    p = wsub.add_parser("evaluate", help="ground-truth count and colour accuracy of a model's samples")
    p.add_argument("model", nargs="?", default="world", help="diffusers directory (default: the shipped model)")
    p.add_argument("--adapter", help="directory with pytorch_lora_weights.safetensors to apply")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--heldout", action="store_true")
    p.set_defaults(func=cmd_world_evaluate)
    # --- data plane commands: prompts, cache (issue 4) ---
    _add_data_plane_parsers(sub)
    # --- reward commands (issue 5) ---
    # --- evaluation commands: evaluate, compare (issue 6) ---
    # --- registry commands: register, promote, models (issue 7) ---
    _add_registry_parsers(sub)
    # --- pipeline commands (issue 8) ---
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from alignprop.errors import UserError

    try:
        args.func(args)
    except UserError as e:
        print(f"alignprop {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
