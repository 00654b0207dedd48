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
        from alignprop.ddpo import load_ddpo_config, train_ddpo as run

        # DDPO's paper defaults (lr 3e-4, eta 1.0, guidance 5.0) sit between the preset and the user's values
        config = load_ddpo_config(args.preset, args.config,
                                  [*args.set, *([f"output_dir={args.output}"] if args.output else [])])
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
    command = f"alignprop world train-model {args.out} --seed {args.seed}"
    for field in ("vae_steps", "unet_steps"):
        if getattr(args, field):
            setattr(config, field, getattr(args, field))
            command += f" --{field.replace('_', '-')} {getattr(args, field)}"
    manifest = train_world_model(args.out, config, command=command)
    print(json.dumps({"quality": manifest["quality"], "quality_heldout": manifest["quality_heldout"]}, indent=2))


def cmd_world_train_count_reward(args):
    import json

    from alignprop.world.rewards import train_count_regressor

    command = (f"alignprop world train-count-reward {args.out} --steps {args.steps} --seed {args.seed} "
               f"--num-images {args.num_images} --agreement-images {args.agreement_images}")
    manifest = train_count_regressor(args.out, steps=args.steps, seed=args.seed, num_images=args.num_images,
                                     command=command, agreement_images=args.agreement_images)
    print(json.dumps(manifest["held_out"], indent=2))


def cmd_world_evaluate(args):
    import json

    from alignprop.models import resolve_model_dir
    from alignprop.world.train_model import evaluate_model

    metrics = evaluate_model(resolve_model_dir(args.model), args.n, steps=args.steps, guidance=args.guidance,
                             seed=args.seed, heldout=args.heldout, adapter=args.adapter)
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


# --- reward commands: rewards list, score, fit-compressibility (issue 5) -------------------------
def cmd_rewards_list(args):
    from alignprop.rewards import REWARDS

    rows = [(name, "yes" if spec.differentiable else "no", spec.weights or "-", spec.description)
            for name, spec in REWARDS.items()]
    header = ("name", "differentiable", "weights (under --weights-dir)", "what it scores")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])


def _read_prompt_file(path: str, files: list) -> list[str]:
    """One prompt per image: a .txt (one line per image, in sorted file order) or .jsonl with "prompt" and
    optionally "file" (as `alignprop world render` writes)."""
    import json
    from pathlib import Path

    from alignprop.errors import UserError

    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not path.endswith(".jsonl"):
        prompts = [line.strip() for line in lines]
    else:
        records = [json.loads(line) for line in lines]
        by_file = {r["file"]: r["prompt"] for r in records if "file" in r}
        if by_file:
            missing = [f.name for f in files if f.name not in by_file]
            if missing:
                raise UserError(f"{path} has no prompt for image {missing[0]}")
            return [by_file[f.name] for f in files]
        prompts = [r["prompt"] for r in records]
    if len(prompts) != len(files):
        raise UserError(f"{path} has {len(prompts)} prompts for {len(files)} images; give one prompt per image "
                        "(a .txt line per image in sorted file order, or .jsonl with \"file\" and \"prompt\")")
    return prompts


def _reward_options(texts: list[str]) -> dict:
    """`NAME.KEY=VALUE` (VALUE parsed as JSON when it can be) -> {NAME: {KEY: VALUE}}."""
    import json

    from alignprop.errors import UserError

    options: dict = {}
    for text in texts:
        target, sep, value = text.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot:
            raise UserError(f"--option {text!r}: write NAME.KEY=VALUE, e.g. hpsv2.scale=100")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options.setdefault(name, {})[key] = parsed
    return options


def cmd_rewards_score(args):
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    from alignprop.errors import UserError
    from alignprop.rewards import load_reward
    from alignprop.rewards.compressibility import IMAGE_SUFFIXES

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if Path(args.images).is_dir() else []
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {args.images}")
    prompts = _read_prompt_file(args.prompts, files)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reward = load_reward(args.reward, device, args.weights_dir, options=_reward_options(args.option))
    terms = reward.terms or [(reward, 1.0)]  # a mix shows each term and the weighted total
    columns = [term.name for term, _ in terms] + (["total"] if reward.terms else [])
    table = []
    for file, prompt in zip(files, prompts):  # one image at a time: images may differ in size
        image = torch.from_numpy(np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255)
        image = image.permute(2, 0, 1)[None].to(device)
        with torch.no_grad():
            scores = [term(image, [prompt]).item() for term, _ in terms]
        table.append(scores + ([sum(w * s for (_, w), s in zip(terms, scores))] if reward.terms else []))
    width = max(len(f.name) for f in files)
    print(f"{'image':{width}s}  " + "  ".join(f"{c:>12s}" for c in columns))
    for file, row in zip(files, table):
        print(f"{file.name:{width}s}  " + "  ".join(f"{v:12.4f}" for v in row))
    print(f"{'mean':{width}s}  " + "  ".join(f"{v:12.4f}" for v in np.mean(table, axis=0)))


def cmd_rewards_fit_compressibility(args):
    import json

    from alignprop.errors import UserError
    from alignprop.rewards import compressibility as comp

    if args.images:
        images, source = comp.read_images(args.images, args.resolution), args.images
    elif args.model:
        images = comp.generate_images(args.model, args.num_images, args.prompts, args.num_inference_steps,
                                      seed=args.seed, device=args.device)
        source = args.model
    else:
        raise UserError("fit-compressibility needs --model MODEL (to generate training images) or --images DIR")
    config = comp.fit_compressibility(images, args.out, steps=args.steps, seed=args.seed, source=source)
    print(json.dumps({"out": args.out, "held_out": config["held_out"],
                      "held_out_originals": config["held_out_originals"]}, indent=2))


def _add_reward_parsers(sub) -> None:
    p = sub.add_parser("rewards", help="the reward library: list, score images, fit the compressibility surrogate")
    rsub = p.add_subparsers(dest="rewards_command", required=True)
    p = rsub.add_parser("list", help="every reward: differentiable or not, the weights it needs")
    p.set_defaults(func=cmd_rewards_list)
    p = rsub.add_parser("score", help="score a directory of images; per-image scores and their mean")
    p.add_argument("--reward", required=True, help="name or weighted mix, e.g. aesthetic:1.0,hpsv2:0.5")
    p.add_argument("--images", required=True, help="directory of .png/.jpg images (sorted by name)")
    p.add_argument("--prompts", required=True,
                   help=".txt (one prompt per image, in sorted order) or .jsonl with \"file\" and \"prompt\"")
    p.add_argument("--weights-dir", help="reward weights directory, or its model-cache manifest / cache:// URI")
    p.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="reward option (repeatable), e.g. hpsv2.scale=100 or object_count.score_threshold=0.2")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.set_defaults(func=cmd_rewards_score)
    p = rsub.add_parser("fit-compressibility",
                        help="train the differentiable JPEG-size surrogate on a model's images (or --images)")
    p.add_argument("--model", help="diffusers model (directory, hub id, cache manifest or 'world') to sample from")
    p.add_argument("--images", help="train on the images of this directory instead")
    p.add_argument("--out", required=True, help="output directory, e.g. WEIGHTS_DIR/compressibility")
    p.add_argument("--num-images", type=int, default=256, help="images to generate with --model")
    p.add_argument("--prompts", default="general", help="prompt set or file for generation")
    p.add_argument("--num-inference-steps", type=int, default=20)
    p.add_argument("--resolution", type=int, help="with --images: resize to this square side")
    p.add_argument("--steps", type=int, default=600, help="optimisation steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="for generation; default: cuda if available, else cpu")
    p.set_defaults(func=cmd_rewards_fit_compressibility)


# --- evaluation commands: evaluate, compare (issue 6) ---------------------------------------------
def _pairs(items: list[str], flag: str, form: str = "KEY=VALUE", example: str = "") -> dict[str, str]:
    """`KEY=VALUE` strings of a repeatable flag -> {key: value}; each key at most once."""
    from alignprop.errors import UserError

    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UserError(f"{flag} {item!r} is not {form}" + (f"; e.g. {flag} {example}" if example else ""))
        if key in pairs:
            raise UserError(f"{flag} {key!r} is given twice; give each one once")
        pairs[key] = value
    return pairs


def _named_dirs(items: list[str], flag: str) -> dict[str, str]:
    return _pairs(items, flag, "NAME=DIR", "alignprop=outputs/run1")


def _seeds(text: str) -> list[int]:
    from alignprop.errors import UserError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a comma-separated list of integers, e.g. 0,1,2,3") from None


def _eval_values(args) -> dict:
    """The EvalConfig values given as flags (shared by evaluate and compare)."""
    values = {}
    if args.seeds:
        values["seeds"] = _seeds(args.seeds)
    if args.reward:
        values["rewards"] = list(args.reward)
    for flag in ("fid_reference", "fid_extractor"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    return values


def _stage_config(cls, path: str | None):
    """A stage config from its JSON file (or the defaults)."""
    import json
    from pathlib import Path

    from alignprop.config import ConfigError

    if not path:
        return cls()
    try:
        return cls.from_json(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}; pass an existing JSON file to --config") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None


def cmd_evaluate(args):
    import json
    from pathlib import Path

    from alignprop.config import update
    from alignprop.evaluate import EvalConfig, evaluate

    config = _stage_config(EvalConfig, args.config)
    values = _eval_values(args)
    for flag, key in (("model", "pretrained_model"), ("prompts", "prompts"), ("steps", "num_inference_steps"),
                      ("guidance", "guidance_scale"), ("eta", "eta"), ("batch_size", "batch_size"),
                      ("output", "output_dir"), ("world_metrics", "world_metrics")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    if args.adapter:
        values["adapters"] = _named_dirs(args.adapter, "--adapter")
    if args.training_run:
        values["training_runs"] = _named_dirs(args.training_run, "--training-run")
    metrics = evaluate(update(config, values))
    for name, entry in metrics["models"].items():
        rewards = ", ".join(f"{k} {v['mean']:.4g} [{v['ci95'][0]:.4g}, {v['ci95'][1]:.4g}]"
                            for k, v in entry["rewards"].items())
        fid = f"; FID {entry['fid']:.4g}" if "fid" in entry else ""
        world = f"; count accuracy {entry['world']['count_accuracy']:.3f}" if "world" in entry else ""
        print(f"{name}: {rewards}{fid}{world}")
    out = Path(metrics["config"]["output_dir"])
    print(f"metrics: {out / 'metrics.json'}\nreport: {out / 'report.html'}")
    if args.json:
        print(json.dumps(metrics["models"], indent=2))


def cmd_compare(args):
    from pathlib import Path

    from alignprop.compare import CompareConfig, compare
    from alignprop.config import ConfigError, TrainConfig, parse_overrides, update

    config = _stage_config(CompareConfig, args.config)
    values = {}
    for flag, key in (("preset", "preset"), ("budget_images", "budget_images"), ("smoothing", "smoothing"),
                      ("output", "output_dir")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    for flag, key in (("set", "train"), ("alignprop_set", "alignprop"), ("ddpo_set", "ddpo")):
        if getattr(args, flag):
            values[key] = {**getattr(config, key), **parse_overrides(TrainConfig(), getattr(args, flag))}
    if args.curve_images:
        curve = dict(config.curve_images)
        for item in args.curve_images:
            method, _, raw = item.partition("=")
            try:
                curve[method.strip()] = [int(n) for n in raw.split(",") if n.strip()]
            except ValueError:
                raise ConfigError(f"--curve-images {item!r}: expected METHOD=N,N,... with whole numbers of images, "
                                  "e.g. --curve-images ddpo=64,128") from None
        values["curve_images"] = curve
    evaluation = _eval_values(args)
    if args.eval_prompts:
        evaluation["prompts"] = args.eval_prompts
    if evaluation:
        values["evaluation"] = {**config.evaluation, **evaluation}
    config = update(config, values)
    compare(config)
    print((Path(config.output_dir) / "compare.md").read_text(), end="")


def _add_evaluation_parsers(sub) -> None:
    def eval_flags(p):
        p.add_argument("--seeds", help="comma-separated seeds; one image per (prompt, seed) (default 0,1,2,3)")
        p.add_argument("--reward", action="append", help="reward name or mix to score with (repeatable; "
                                                         "default: world_count / the training reward)")
        p.add_argument("--fid-reference", help="directory of real images, or 'base' (the base model's samples with "
                                               "other seeds: a drift measure); default: no FID")
        p.add_argument("--fid-extractor", help="auto (default), world, inception[:WEIGHTS], or a CLIP/DINOv2 model "
                                               "directory")

    p = sub.add_parser("evaluate", help="held-out rewards, FID and a side-by-side HTML report of base and adapters")
    p.add_argument("--config", help="EvalConfig JSON file; flags override it")
    p.add_argument("--model", help="base model (default: world)")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="adapter to evaluate (repeatable)")
    p.add_argument("--prompts", help="held-out prompts: built-in set or .txt/.jsonl/.csv (default: world_heldout)")
    eval_flags(p)
    p.add_argument("--training-run", action="append", metavar="NAME=DIR",
                   help="training output directory whose reward curve goes into the report (repeatable)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 20)")
    p.add_argument("--guidance", type=float, help="guidance scale (default 5.0)")
    p.add_argument("--eta", type=float, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--batch-size", type=int, help="images per sampler call (default 16)")
    p.add_argument("--world-metrics", action=argparse.BooleanOptionalAction, default=None,
                   help="ground-truth count/colour metrics (default: on for the world model)")
    p.add_argument("--output", help="output directory (default outputs/eval)")
    p.add_argument("--json", action="store_true", help="also print the per-model metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="train AlignProp and DDPO at the same image budget, then evaluate both")
    p.add_argument("--config", help="CompareConfig JSON file; flags override it")
    p.add_argument("--preset", help="TrainConfig preset both runs start from (default tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig value for both runs")
    p.add_argument("--alignprop-set", action="append", default=[], metavar="KEY=VALUE", help="AlignProp-only value")
    p.add_argument("--ddpo-set", action="append", default=[], metavar="KEY=VALUE", help="DDPO-only value")
    p.add_argument("--budget-images", type=int, help="images each method samples in training (default 256)")
    p.add_argument("--smoothing", type=int, help="moving-average window over training rewards, in steps (default 5)")
    p.add_argument("--eval-prompts", help="held-out prompts (default: the held-out set of the training prompts)")
    p.add_argument("--curve-images", action="append", default=[], metavar="METHOD=N,N",
                   help="shorter runs of METHOD (alignprop or ddpo) for fixed-noise curves, in images (repeatable)")
    eval_flags(p)
    p.add_argument("--output", help="output directory (default outputs/compare)")
    p.set_defaults(func=cmd_compare)


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


# --- pipeline commands: launch, trainjob, pipeline (issue 8) -------------------------------------
def cmd_launch(args):
    import os
    import shlex

    from alignprop.config import parse_overrides, update
    from alignprop.launch import CONFIG_ENV, Topology, config_from_env, launch, topology_from_env

    if not args.config and os.environ.get(CONFIG_ENV):  # a TrainJob node: the config comes in the environment
        config = config_from_env()
        overrides = args.set + ([f"output_dir={args.output}"] if args.output else [])
        config = update(config, parse_overrides(config, overrides)).validate()
    else:
        config = _resolve_train_config(args)
    topology = topology_from_env()
    if topology is None:
        topology = Topology(procs_per_machine=args.num_processes, main_process_port=args.main_process_port)
    argv = launch(config, topology, strategy=args.strategy, publish=args.publish, dry_run=args.dry_run)
    if args.dry_run:
        print(shlex.join(argv))


def _trainjob_spec(args):
    from alignprop.trainjob import TrainJobSpec, current_namespace, parse_toleration

    config = _resolve_train_config(args)
    return TrainJobSpec(config_json=config.to_json(), output_uri=args.output_uri, image=args.image, nodes=args.nodes,
                        procs_per_node=args.procs_per_node or max(args.gpus_per_node, 1),
                        accelerators_per_node=args.gpus_per_node, accelerator_resource=args.gpu_resource,
                        cpu=args.cpu or "", memory=args.memory or "", name=args.name or "",
                        namespace=args.namespace or current_namespace(), runtime=args.runtime,
                        runtime_kind=args.runtime_kind, strategy=args.strategy,
                        node_selector=_pairs(args.node_selector, "--node-selector"),
                        tolerations=[parse_toleration(t) for t in args.toleration],
                        volumes=_pairs(args.pvc, "--pvc", "CLAIM=MOUNT_PATH"), deadline_s=args.deadline)


def cmd_trainjob(args):
    from alignprop.trainjob import build_trainjob, run_trainjob, to_yaml

    spec = _trainjob_spec(args)
    if args.dry_run:
        print(to_yaml(build_trainjob(spec)), end="")
        return
    destination = run_trainjob(spec, args.collect or f"outputs/{spec.name}", timeout_s=args.timeout)
    print(f"TrainJob {spec.namespace}/{spec.name} complete; run collected in {destination}")


def _pipelines_run():
    """pipelines.run from the source checkout (pipelines/ and components/ sit next to alignprop/, not inside it)."""
    from pathlib import Path

    from alignprop.errors import UserError

    root = Path(__file__).resolve().parents[1]
    if not (root / "pipelines" / "run.py").is_file():
        raise UserError(f"pipelines/ is not next to {Path(__file__).parent}; run `alignprop pipeline` from a source "
                        "checkout installed with `pip install -e .`")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import pipelines.run

    return pipelines.run


def _cluster_settings(args):
    from alignprop.trainjob import parse_toleration

    settings = _pipelines_run().ClusterSettings()
    settings.image = args.image or settings.image
    settings.accelerator_type = args.accelerator_type or settings.accelerator_type
    if args.accelerator_limit is not None:
        settings.accelerator_limit = args.accelerator_limit
    if args.node_selector:
        settings.node_selector = _pairs(args.node_selector, "--node-selector")
    if args.toleration:
        settings.tolerations = [parse_toleration(t) for t in args.toleration]
    return settings


def cmd_pipeline_compile(args):
    run = _pipelines_run()
    path = run.compile_pipeline(args.pipeline, args.output, _cluster_settings(args))
    print(f"pipeline {args.pipeline} compiled to {path}")


def cmd_pipeline_submit(args):
    run = _pipelines_run()
    params = run.parse_params(run.get_pipeline(args.pipeline), args.param)
    run_id = run.submit(args.host, args.pipeline, params, _cluster_settings(args), experiment=args.experiment,
                        run_name=args.run_name, namespace=args.namespace, service_account=args.service_account)
    print(f"run {run_id} started on {args.host} (experiment {args.experiment})")


def cmd_pipeline_schedule(args):
    run = _pipelines_run()
    params = run.parse_params(run.get_pipeline(args.pipeline), args.param)
    job = run.schedule(args.host, args.cron, args.pipeline, params, _cluster_settings(args),
                       experiment=args.experiment, job_name=args.name, namespace=args.namespace,
                       service_account=args.service_account)
    print(f"recurring run {job} ({args.name}): cron '{args.cron}', one at a time, no catch-up")


def cmd_pipeline_run(args):
    from alignprop.errors import UserError

    if not args.local:
        raise UserError("`pipeline run` runs here through kfp.local: pass --local (use `pipeline submit` for a "
                        "Kubeflow cluster)")
    run = _pipelines_run()
    params = run.parse_params(run.get_pipeline("alignprop"), args.param)
    result = run.run_local(args.output, preset=args.preset, params=params)
    gate = "promoted to the first stage by the gate" if result.promoted else "not promoted (the gate's reason is in " \
        "the register step's log)"
    print(f"registered model: {result.model_uri} (version {result.model_version}, {gate}) in MLflow store "
          f"{result.tracking_uri}")
    print(f"evaluation report: {result.report}")
    print(f"all step outputs: {result.pipeline_root}")


def _add_pipeline_parsers(sub) -> None:
    def cluster(p):
        p.add_argument("--pipeline", default="alignprop", choices=["alignprop", "sweep"])
        p.add_argument("--image", help="the project image the cluster pulls (default alignprop:0.1.0)")
        p.add_argument("--accelerator-type", help="accelerator resource (default nvidia.com/gpu)")
        p.add_argument("--accelerator-limit", type=int, help="accelerators per training/evaluation pod (default 1)")
        p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                       help="replaces the default nvidia.com/gpu.present=true")
        p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT",
                       help="replaces the default nvidia.com/gpu:NoSchedule")

    def server(p):
        p.add_argument("--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080")
        p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a pipeline argument")
        p.add_argument("--experiment", default="alignprop")
        p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
        p.add_argument("--service-account", default="alignprop-pipeline", help="k8s/serviceaccount.yaml")

    pipeline = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, submit, schedule, run locally")
    psub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    p = psub.add_parser("compile", help="compile a pipeline to YAML (upload it in the Kubeflow UI)")
    p.add_argument("--output", required=True, help="YAML file to write")
    cluster(p)
    p.set_defaults(func=cmd_pipeline_compile)
    p = psub.add_parser("submit", help="start one run on a Kubeflow Pipelines server")
    server(p)
    p.add_argument("--run-name", help="default: generated by KFP")
    cluster(p)
    p.set_defaults(func=cmd_pipeline_submit)
    p = psub.add_parser("schedule", help="create a recurring run (max concurrency 1, no catch-up)")
    server(p)
    p.add_argument("--cron", required=True, help="6 fields, seconds first: nightly 02:00 is '0 0 2 * * *'")
    p.add_argument("--name", default="alignprop-nightly", help="name of the recurring run")
    cluster(p)
    p.set_defaults(func=cmd_pipeline_schedule)
    p = psub.add_parser("run", help="run the main pipeline here, on the CPU, through kfp.local")
    p.add_argument("--local", action="store_true", help="required: kfp.local's SubprocessRunner, this environment")
    p.add_argument("--preset", default="tiny", choices=["tiny"], help="tiny: the shipped world model")
    p.add_argument("--output", default="outputs/pipeline-local", help="working directory: MLflow store, model "
                                                                        "cache, every step's outputs")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a pipeline argument")
    p.set_defaults(func=cmd_pipeline_run)


def _add_kubeflow_parsers(sub) -> None:
    from alignprop.launch import DEFAULT_PORT, STRATEGIES

    strategies = f"{', '.join(STRATEGIES)}, or an accelerate config file"
    p = sub.add_parser("launch", help="run `alignprop train` under accelerate launch (here, or on a TrainJob node "
                                      "from the PET_* variables)")
    _add_config_args(p)  # without --config, a non-empty $ALIGNPROP_TRAIN_CONFIG (set in a TrainJob) is the config
    p.add_argument("--num-processes", type=int, default=1,
                   help="processes on this machine when not on a TrainJob node (CPU processes without a GPU)")
    p.add_argument("--main-process-port", type=int, default=DEFAULT_PORT, help="rendezvous port on this machine")
    p.add_argument("--strategy", default="ddp", help=f"distribution strategy: {strategies}")
    p.add_argument("--publish", help="after success, node 0 publishes the run (without checkpoints) here: s3://... "
                                     "or a path")
    p.add_argument("--dry-run", action="store_true", help="print the accelerate command and exit")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("trainjob", help="train on several nodes as a Kubeflow Trainer TrainJob: submit, wait, "
                                        "stream node 0's log, collect the adapter")
    _add_config_args(p)
    p.add_argument("--image", required=True, help="the project image every node runs")
    p.add_argument("--output-uri", required=True,
                   help="s3:// prefix (the run goes to <prefix>/<job name>) or a path on a --pvc every node mounts")
    p.add_argument("--nodes", type=int, default=2, help="number of nodes")
    p.add_argument("--procs-per-node", type=int, help="training processes per node (default: GPUs per node, min 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="accelerators requested per node (0: CPU only)")
    p.add_argument("--gpu-resource", default="nvidia.com/gpu", help="accelerator resource name")
    p.add_argument("--cpu", help="CPU request and limit per node, e.g. 8")
    p.add_argument("--memory", help="memory request and limit per node, e.g. 64Gi")
    p.add_argument("--name", help="TrainJob name (default: alignprop-<random>)")
    p.add_argument("--namespace", help="default: this pod's namespace, else alignprop")
    p.add_argument("--runtime", default="alignprop", help="TrainingRuntime name (k8s/training-runtime.yaml)")
    p.add_argument("--runtime-kind", default="TrainingRuntime", choices=["TrainingRuntime", "ClusterTrainingRuntime"])
    p.add_argument("--strategy", default="ddp", help=f"distribution strategy: {strategies}")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    p.add_argument("--pvc", action="append", default=[], metavar="CLAIM=MOUNT_PATH",
                   help="mount a PersistentVolumeClaim on every node")
    p.add_argument("--deadline", type=int, default=0, help="activeDeadlineSeconds of the TrainJob (0: none)")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait before deleting the job")
    p.add_argument("--collect", help="directory for the collected run (default: outputs/<job name>)")
    p.add_argument("--dry-run", action="store_true", help="print the TrainJob YAML and exit")
    p.set_defaults(func=cmd_trainjob)


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
    p.add_argument("--vae-steps", type=int, help="override the autoencoder step count")
    p.add_argument("--unet-steps", type=int, help="override the UNet step count")
    p.set_defaults(func=cmd_world_train_model)
    p = wsub.add_parser("train-count-reward", help="train the world_count regressor on varied renders (~8 min)")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps of 64 images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=20000, help="varied training scenes to render")
    p.add_argument("--agreement-images", type=int, default=96,
                   help="world-model samples per caption split on which to record agreement with the exact counter "
                        "(0 skips it)")
    p.set_defaults(func=cmd_world_train_count_reward)
    p = wsub.add_parser("evaluate", help="ground-truth count and colour accuracy of a model's samples")
    p.add_argument("model", nargs="?", default="world", help="diffusers directory (default: the shipped model)")
    p.add_argument("--adapter", help="directory with pytorch_lora_weights.safetensors to apply")
    p.add_argument("--n", type=int, default=64, help="samples, cycling over the captions")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--heldout", action="store_true", help="use the held-out (colour, shape) captions")
    p.set_defaults(func=cmd_world_evaluate)
    # --- data plane commands: prompts, cache (issue 4) ---
    _add_data_plane_parsers(sub)
    # --- reward commands (issue 5) ---
    _add_reward_parsers(sub)
    # --- evaluation commands: evaluate, compare (issue 6) ---
    _add_evaluation_parsers(sub)
    # --- registry commands: register, promote, models (issue 7) ---
    _add_registry_parsers(sub)
    # --- pipeline commands (issue 8) ---
    _add_kubeflow_parsers(sub)
    _add_pipeline_parsers(sub)
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
