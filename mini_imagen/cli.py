"""The ``mini-imagen`` command line: train, generate, evaluate, list presets.

    mini-imagen generate "a red circle above a blue square" --out grid.png
    mini-imagen train --config cpu-small --stage 0
    mini-imagen evaluate --model runs/cpu-small --prompts eval64 --out outputs/eval64.json
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
    gen.add_argument("--model", default=None,
                     help="a shipped model (scenes, emoji) or a model folder (default: the shipped scene model)")
    gen.add_argument("--out", default="outputs/grid.png", help="where to write the PNG grid")
    gen.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    gen.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale w (default 2)")
    gen.add_argument("--steps", type=int, default=25, help="sampling steps per stage")
    gen.add_argument("--sampler", default="dpm++2m", choices=["ddpm", "ddim", "dpm++2m"],
                     help="default dpm++2m: the cleanest of the three at 25 steps for the shipped model")
    gen.add_argument("--thresholding", default="static", choices=["none", "static", "dynamic"])
    gen.add_argument("--noise-aug", type=float, default=0.1, help="noise-conditioning augmentation level for SR stages")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    gen.add_argument("--base-only", action="store_true", help="stop after the base (32 px) stage")
    gen.add_argument("--no-safety", action="store_true",
                     help="skip the prompt and image safety checks (prints a warning)")

    train = sub.add_parser("train", help="train one stage (or all) of a cascade from a config")
    train.add_argument("--config", required=True, help="a preset name (see `mini-imagen presets`) or a YAML/JSON file")
    train.add_argument("--stage", default="all", help="stage index to train, or 'all' (default)")
    train.add_argument("--output", default=None, help="model folder (default: runs/<preset or file name>)")
    train.add_argument("--steps", type=int, default=None, help="override the config's training steps")
    train.add_argument("--max-minutes", type=float, default=None,
                       help="stop each stage after this many minutes, with a checkpoint (a rerun resumes)")
    train.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps (overrides the config)")
    train.add_argument("--no-resume", action="store_true", help="start over instead of resuming a checkpoint")
    train.add_argument("--init-from", default=None, metavar="MODEL",
                       help="fine-tune: start from a trained model's weights (a shipped name such as scenes, or a folder)")

    sub.add_parser("presets", help="list the built-in training presets")

    ev = sub.add_parser("evaluate", help="sample a prompt set and score every image (colour, count, position...)")
    ev.add_argument("--model", default=None,
                    help="a shipped model (scenes, emoji) or a model folder (default: scenes)")
    ev.add_argument("--prompts", default="eval64", help="a prompt set name (e.g. eval64, heldout) or a JSON file")
    ev.add_argument("--samples", type=int, default=4, help="images per prompt (default 4)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--steps", type=int, default=25, help="sampling steps per stage")
    ev.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale w (default 2)")
    ev.add_argument("--sampler", default="dpm++2m", choices=["ddpm", "ddim", "dpm++2m"])
    ev.add_argument("--thresholding", default="static", choices=["none", "static", "dynamic"])
    ev.add_argument("--batch-size", type=int, default=32, help="images sampled at once")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    ev.add_argument("--base-only", action="store_true", help="score the base (32 px) stage's images")
    ev.add_argument("--out", default=None, help="JSON report (default: outputs/eval_<prompt set>.json)")
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
        if args.command == "evaluate":
            return _evaluate(args)
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
        device=args.device, base_only=args.base_only, safety=not args.no_safety,
    )
    print(f"wrote {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mini_imagen.recipes import load_recipe, train_recipe

    recipe, name = load_recipe(args.config)
    if args.steps is not None:
        recipe.train.steps, recipe.stage_steps = args.steps, None  # the same number for every trained stage
    if args.max_minutes is not None:
        recipe.train.max_minutes = args.max_minutes
    if args.device is not None:
        recipe.train.device = args.device
    if args.init_from is not None:
        recipe.init_from = args.init_from
    output = Path(args.output) if args.output else Path("runs") / name
    stages = None if args.stage == "all" else [_stage_index(args.stage, len(recipe.model.stages))]
    path = train_recipe(recipe, output, stages=stages, resume=not args.no_resume)
    print(f"model saved to {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mini_imagen.evaluation import evaluate, format_report
    from mini_imagen.generate import load_model
    from mini_imagen.prompts import load_prompts

    prompts, name = load_prompts(args.prompts)  # a bad file fails here, before the model loads
    if not 1 <= args.samples <= 64:
        raise ValueError(f"--samples must be between 1 and 64, got {args.samples}")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    imagen = load_model(args.model, args.device)
    report = evaluate(imagen, prompts, samples_per_prompt=args.samples, seed=args.seed, batch_size=args.batch_size,
                      prompt_set=name, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                      thresholding=args.thresholding, stop_at_stage=0 if args.base_only else None)
    print(format_report(report))
    path = report.save(args.out or Path("outputs") / f"eval_{name}.json")
    print(f"wrote {path}")
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
