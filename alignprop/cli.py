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


def _resolve_train_config(args):
    from alignprop.config import load_config

    overrides = list(args.set)
    if args.output:
        overrides.append(f"output_dir={args.output}")
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
    # --- data plane commands: prompts, cache (issue 4) ---
    # --- reward commands (issue 5) ---
    # --- evaluation commands: evaluate, compare (issue 6) ---
    # --- registry commands: register, promote, models (issue 7) ---
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
