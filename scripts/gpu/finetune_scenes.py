"""On the GPU machine: fine-tune the shipped scene model's base stage, score old and new there, pack the new one.

    python3 scripts/gpu/finetune_scenes.py --minutes 6 --out $OUT

1. ``mini-imagen train --config scripts/gpu/scenes_finetune.yaml --stage 0`` for ``--minutes`` (the
   U-Net starts from the shipped base; ``--max-minutes`` stops it cleanly with a checkpoint).
2. The new cascade = the fine-tuned base (EMA weights) + the shipped super-resolution stage, saved in
   fp16 as the package ships it: ``OUT/scenes/`` (``config.json``, ``model.safetensors``, ``recipe.json``).
3. ``mini-imagen evaluate``'s protocol for both cascades on the same GPU: eval64, 2 images per prompt at
   64 px, DPM-Solver++ 25 steps, guidance 2, static clipping; reports in ``OUT/eval64_*.json``.

Back here, ``scripts/gpu/README.md`` says how the result replaces ``mini_imagen/weights/scenes``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "scripts" / "gpu" / "scenes_finetune.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="training minutes")
    parser.add_argument("--out", required=True, help="where the new cascade, reports and log go")
    parser.add_argument("--run", default="runs/scenes-ft", help="training folder (checkpoints; a rerun resumes)")
    parser.add_argument("--samples", type=int, default=2, help="images per eval64 prompt")
    args = parser.parse_args()
    out, run = Path(args.out), Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}",
          flush=True)

    with open(out / "finetune.log", "w") as log:  # 1. train (its log comes back too)
        command = [sys.executable, "-m", "mini_imagen.cli", "train", "--config", str(RECIPE), "--stage", "0",
                   "--output", str(run), "--max-minutes", str(args.minutes)]
        trained = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    print(f"training exit {trained.returncode} at {time.time() - started:.0f} s; "
          f"{' | '.join((out / 'finetune.log').read_text().strip().splitlines()[-3:])}", flush=True)
    if trained.returncode != 0:
        sys.exit(1)

    from mini_imagen.evaluation import evaluate
    from mini_imagen.generate import load_model
    from mini_imagen.imagen import Imagen

    shipped = load_model("scenes", device="cpu")  # 2. the new cascade, fp16 like the package
    tuned = Imagen.from_pretrained(run, device="cpu")
    shipped.unets[0].load_state_dict(tuned.unets[0].state_dict())
    shipped.save_pretrained(out / "scenes", dtype=torch.float16)
    shutil.copy(run / "recipe.json", out / "scenes" / "recipe.json")
    steps = sorted((run / "stage0" / "checkpoints").glob("step_*.pt"))[-1].stem.split("_")[1]
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "fine_tune_steps": int(steps), "minutes": args.minutes}

    for name, folder in (("shipped", None), ("finetuned", out / "scenes")):  # 3. score both alike
        model = load_model(folder or "scenes", device="auto")
        report = evaluate(model, "eval64", samples_per_prompt=args.samples, seed=0, batch_size=32, progress=False,
                          steps=25, guidance_scale=2.0, sampler="dpm++2m", thresholding="static")
        report.save(out / f"eval64_{name}.json")
        summary[name] = {"faithful": report.overall["faithful"],
                         **{split: value["faithful"] for split, value in report.by_split.items()},
                         **{category: value["faithful"] for category, value in report.by_category.items()}}
        print(name, json.dumps(summary[name]), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
