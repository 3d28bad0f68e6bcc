"""Train every shipped model side by side on one GPU, then pack their weights (how mini_imagen/weights was made).

    python scripts/train_shipped_on_gpu.py --runs runs/shipped --pack runs/shipped/pack --minutes 6

1. Draws the 200,000 training scenes once (``prerender`` + ``render_cache`` of the gpu-quick preset), so
   the four scene runs share one drawing instead of each drawing its own.
2. Starts six training processes at once, each stopping after ``--minutes`` of training: the scene base
   and SR stages (``weights/scenes.yaml``), the SR ablation without noise augmentation (lesson 07,
   ``weights/scenes_sr_no_aug.yaml``), the emoji base and SR stages (``weights/emoji.yaml``), and the
   diffusers ``UNet2DConditionModel`` baseline trained with the scene base's recipe
   (``mini_imagen.diffusers_baseline.train_baseline``). Small U-Nets leave a big GPU mostly idle, so
   six runs at once cost little more than one.
3. Packs each run's EMA weights from its newest checkpoint as fp16 safetensors (one file per model),
   plus the scene base and the diffusers baseline at the newest step *both* reached, for a comparison
   at equal steps.
4. Times a training step and 25-step sampling of both base U-Nets, alone on the GPU
   (``benchmarks/diffusers_baseline.py --timing-only``).

``scripts/unpack_shipped.py`` turns the pack into the package's model folders, on any machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mini_imagen.checkpoint import list_checkpoints, load_checkpoint
from mini_imagen.recipes import load_recipe

WEIGHTS = Path(__file__).resolve().parents[1] / "mini_imagen" / "weights"
BASELINE = ("from mini_imagen.diffusers_baseline import train_baseline; from mini_imagen.recipes import load_recipe; "
            "import sys; recipe = load_recipe(sys.argv[1])[0]; recipe.train.max_minutes = float(sys.argv[3]); "
            "train_baseline(recipe, sys.argv[2])")
# name -> (recipe, stage, output folder name); the packed file holds the stage's EMA weights
RUNS = {
    "scenes_base": ("scenes.yaml", 0), "scenes_sr": ("scenes.yaml", 1),
    "scenes_sr_no_aug": ("scenes_sr_no_aug.yaml", 1),
    "emoji_base": ("emoji.yaml", 0), "emoji_sr": ("emoji.yaml", 1),
    "diffusers_baseline": ("scenes.yaml", 0),
}
GROUPS = {"scenes": ("scenes_base", "scenes_sr", "scenes_sr_no_aug"), "emoji": ("emoji_base", "emoji_sr"),
          "baseline": ("diffusers_baseline", "diffusers_baseline_at_equal_steps"),
          "equal_steps": ("scenes_base_at_equal_steps",)}


def command(name: str, runs: Path, minutes: float) -> list[str]:
    recipe, stage = RUNS[name]
    if name == "diffusers_baseline":
        return [sys.executable, "-c", BASELINE, str(WEIGHTS / recipe), str(runs / name), str(minutes)]
    return [sys.executable, "-m", "mini_imagen.cli", "train", "--config", str(WEIGHTS / recipe), "--stage", str(stage),
            "--output", str(runs / name), "--max-minutes", str(minutes)]


def checkpoints(runs: Path, name: str) -> dict[int, Path]:
    stage = RUNS[name][1]
    return {int(path.stem.split("_")[1]): path for path in list_checkpoints(runs / name / f"stage{stage}" / "checkpoints")}


def pack(path: Path, checkpoint: Path, name: str, step: int) -> None:
    ema = load_checkpoint(checkpoint)["ema_model"]
    tensors = {key: value.to(torch.float16) if value.is_floating_point() else value for key, value in ema.items()}
    recipe, stage = RUNS[name]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"run": name, "recipe": recipe, "stage": str(stage), "step": str(step)})
    print(f"packed {name} at step {step} -> {path.name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/shipped", help="training folders (checkpoints, logs)")
    parser.add_argument("--pack", default="runs/shipped/pack", help="where the packed fp16 weights go")
    parser.add_argument("--minutes", type=float, default=6.0, help="training minutes of every run")
    parser.add_argument("--only", nargs="*", default=list(RUNS), help="train only these runs")
    parser.add_argument("--timing-rounds", type=int, default=20, help="timed training steps per base U-Net")
    args = parser.parse_args()
    runs, pack_dir = Path(args.runs), Path(args.pack)
    staged = runs / "packed"
    for folder in (runs, pack_dir, staged):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}",
          flush=True)

    recipe = load_recipe(WEIGHTS / "scenes.yaml")[0]
    recipe.make_dataset()  # 1. draw the scenes once, into the render cache the scene runs read
    print(f"scenes drawn in {time.time() - started:.0f} s", flush=True)

    processes = {}  # 2. every run at once
    for name in args.only:
        log = open(runs / f"{name}.log", "w")
        processes[name] = (subprocess.Popen(command(name, runs, args.minutes), stdout=log, stderr=subprocess.STDOUT), log)
    for name, (process, log) in processes.items():
        process.wait()
        log.close()
        tail = (runs / f"{name}.log").read_text().strip().splitlines()[-2:]
        print(f"{name}: exit {process.returncode}; {' | '.join(tail)}", flush=True)
    print(f"training done at {time.time() - started:.0f} s", flush=True)

    manifest = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "minutes": args.minutes, "runs": {}}
    for name in args.only:  # 3. pack the newest EMA weights of every run
        found = checkpoints(runs, name)
        if not found:
            print(f"{name}: no checkpoint to pack", flush=True)
            continue
        step = max(found)
        pack(staged / f"{name}.safetensors", found[step], name, step)
        manifest["runs"][name] = {"step": step}
    if {"scenes_base", "diffusers_baseline"} <= set(manifest["runs"]):
        common = set(checkpoints(runs, "scenes_base")) & set(checkpoints(runs, "diffusers_baseline"))
        if common:
            step = max(common)
            manifest["equal_steps"] = step
            for name in ("scenes_base", "diffusers_baseline"):
                pack(staged / f"{name}_at_equal_steps.safetensors", checkpoints(runs, name)[step], name, step)
    (pack_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for group, members in GROUPS.items():  # few files of < 16 MB each: what a GPU lease can send back
        with tarfile.open(pack_dir / f"{group}.tar", "w") as tar:
            for path in sorted(staged.glob("*.safetensors")):
                if path.stem in members:
                    tar.add(path, arcname=path.name)

    if {"scenes_base", "diffusers_baseline"} <= set(manifest["runs"]):  # 4. timings, alone on the GPU
        subprocess.run([sys.executable, "benchmarks/diffusers_baseline.py", "--config", str(WEIGHTS / "scenes.yaml"),
                        "--ours", str(runs / "scenes_base"), "--output", str(runs / "diffusers_baseline"),
                        "--no-train", "--timing-only", "--rounds", str(args.timing_rounds)], check=False)
    with tarfile.open(pack_dir / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(runs.glob("*.log")) + sorted(runs.glob("diffusers_baseline/timings.json")):
            tar.add(path, arcname=path.name)
    print(f"all done in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
