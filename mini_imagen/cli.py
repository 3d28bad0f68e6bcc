"""The ``mini-imagen`` command line: train, generate, list presets.

    mini-imagen generate "a red circle above a blue square" --out grid.png
    mini-imagen train --config cpu-small --stage 0
    mini-imagen presets

Heavy imports happen inside each command so ``mini-imagen --help`` answers at once. Every
expected failure (bad option, missing model, corrupt checkpoint, no GPU, offline hub) ends
as one line ``mini-imagen: error: ...`` that says what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mini-imagen",
        description="Imagen-style text-to-image diffusion, small enough to read and train.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser("generate", help="generate images from prompts with a trained cascade")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more text prompts")
    gen.add_argument("--model", default=None, help="model folder (default: the shipped scene model)")
    gen.add_argument("--out", default="outputs/grid.png", help="where to write the PNG grid")
    gen.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    gen.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale w")
    gen.add_argument("--steps", type=int, default=25, help="sampling steps per stage")
    gen.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim", "dpm++2m"])
    gen.add_argument("--thresholding", default="dynamic", choices=["none", "static", "dynamic"])
    gen.add_argument("--noise-aug", type=float, default=0.1, help="noise-conditioning augmentation level for SR stages")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    gen.add_argument("--base-only", action="store_true", help="stop after the base (32 px) stage")

    train = sub.add_parser("train", help="train one stage (or all) of a cascade from a config")
    train.add_argument("--config", required=True, help="a preset name (see `mini-imagen presets`) or a YAML/JSON file")
    train.add_argument("--stage", default="all", help="stage index to train, or 'all' (default)")
    train.add_argument("--output", default=None, help="model folder (default: runs/<preset or file name>)")
    train.add_argument("--steps", type=int, default=None, help="override the config's training steps")
    train.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps (overrides the config)")
    train.add_argument("--no-resume", action="store_true", help="start over instead of resuming a checkpoint")

    sub.add_parser("presets", help="list the built-in training presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "train":
            return _train(args)
        if args.command == "presets":
            return _presets()
    except KeyboardInterrupt:
        print("mini-imagen: interrupted; checkpoints written so far are intact", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as error:
        # Expected failures are one line that says what to do. Set MINI_IMAGEN_DEBUG=1 for the traceback.
        import os

        if os.environ.get("MINI_IMAGEN_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"mini-imagen: error: {message}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


def _generate(args: argparse.Namespace) -> int:
    from mini_imagen.generate import generate_grid

    path = generate_grid(
        prompts=args.prompts, model=args.model, out=Path(args.out), num_images=args.num_images,
        guidance_scale=args.guidance, steps=args.steps, sampler=args.sampler,
        thresholding=args.thresholding, noise_aug_level=args.noise_aug, seed=args.seed,
        device=args.device, base_only=args.base_only,
    )
    print(f"wrote {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mini_imagen.recipes import load_recipe, train_recipe

    recipe, name = load_recipe(args.config)
    if args.steps is not None:
        recipe.train.steps = args.steps
    if args.device is not None:
        recipe.train.device = args.device
    output = Path(args.output) if args.output else Path("runs") / name
    stages = None if args.stage == "all" else [_stage_index(args.stage, len(recipe.model.stages))]
    path = train_recipe(recipe, output, stages=stages, resume=not args.no_resume)
    print(f"model saved to {path}")
    return 0


def _stage_index(text: str, num_stages: int) -> int:
    if not text.isdigit() or int(text) >= num_stages:
        raise ValueError(f"--stage must be 'all' or a stage index 0..{num_stages - 1}, got '{text}'")
    return int(text)


def _presets() -> int:
    from mini_imagen.recipes import PRESETS

    for name, factory in PRESETS.items():
        print(f"{name:12s} {(factory.__doc__ or '').strip().splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
