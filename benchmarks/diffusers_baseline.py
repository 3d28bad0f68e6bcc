"""mini-imagen's base U-Net against diffusers' UNet2DConditionModel, trained with the same recipe: one table.

    .venv/bin/python benchmarks/diffusers_baseline.py                       # train (resumable), evaluate, compare
    .venv/bin/python benchmarks/diffusers_baseline.py --steps 20 --samples 1 --fid-samples 64   # a quick dry run
    .venv/bin/python benchmarks/diffusers_baseline.py --ship                # also write the fp16 baseline into the package

The shipped comparison (README, ``mini_imagen/weights/diffusers_baseline/comparison.json``) was made in two steps:
``scripts/train_shipped_on_gpu.py`` trained both base U-Nets side by side on one GPU (and timed them there with
``--timing-only``), ``scripts/unpack_shipped.py`` wrote both at the newest step both reached, and then

    benchmarks/diffusers_baseline.py --config mini_imagen/weights/scenes.yaml --no-train \
        --ours runs/unpacked/scenes_base_at_equal_steps --output runs/unpacked/diffusers_baseline

1. Trains a ``UNet2DConditionModel`` of the Efficient U-Net's size (``mini_imagen.diffusers_baseline``) with the
   base-stage settings of a recipe (default ``cpu-small``), through the same ``recipes.train_stage`` that trains
   mini-imagen's base: same data, text encoder, v-prediction loss, CFG dropout, AdamW, warm-up, EMA, steps.
   Checkpoints go to ``--output``; a killed run resumes. ``--no-train`` uses the baseline found there.
2. Evaluates both base models the same way: scene-scorer faithfulness on ``eval64`` (seen / held-out), domain FID
   against rendered scenes, sampling time per image and training time per step (models taking turns), parameters.
   ``--timing-only`` stops after the timings (e.g. on a GPU).
3. Prints a Markdown table and writes it as JSON next to the baseline.

The mini-imagen side is ``--ours`` (default: the shipped scene model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from mini_imagen.data import SceneConfig, SceneDataset
from mini_imagen.diffusers_baseline import load_baseline, save_baseline, train_baseline
from mini_imagen.evaluation import domain_fid, evaluate
from mini_imagen.generate import SHIPPED_SCENE_MODEL
from mini_imagen.imagen import Imagen
from mini_imagen.recipes import load_recipe
from mini_imagen.runtime import pick_device
from mini_imagen.safety import SafetyCheckDisabledWarning
from mini_imagen.text import load_text_encoder

SAMPLING = dict(sampler="dpm++2m", steps=25, guidance_scale=2.0, thresholding="static", stop_at_stage=0)
PACKAGE_COPY = Path(__file__).resolve().parents[1] / "mini_imagen" / "weights" / "diffusers_baseline"


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: wait for it before reading the clock


def train_step_seconds(models: dict[str, Imagen], rounds: int, batch_size: int) -> dict[str, float]:
    """Median seconds of one AdamW training step of each base U-Net on the same batch, rounds interleaved."""
    scenes = SceneDataset(SceneConfig(resolution=32, seed=5), length=batch_size)
    batch = [scenes[i] for i in range(batch_size)]
    captions, batch_images = [item["caption"] for item in batch], torch.stack([item["image"] for item in batch])
    times: dict[str, list[float]] = {name: [] for name in models}
    optimizers, images = {}, {}
    for name, imagen in models.items():
        imagen.unets[0].train()
        optimizers[name] = torch.optim.AdamW(imagen.unets[0].parameters(), lr=1e-6)  # tiny: barely moves weights
        images[name] = batch_images.to(imagen.device)
    texts = {name: imagen.encode_text(captions).to(imagen.device) for name, imagen in models.items()}
    for round_ in range(rounds + 1):
        for name, imagen in models.items():
            _synchronize()
            start = time.perf_counter()
            # bf16 autocast on a GPU, as in training; on the CPU full precision, as in training there
            with torch.autocast(imagen.device.type, dtype=torch.bfloat16, enabled=imagen.device.type == "cuda"):
                loss = imagen.stage_loss(0, imagen.unets[0], images[name], texts[name])
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            _synchronize()
            if round_ > 0:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    for imagen in models.values():
        imagen.unets[0].eval()
    return {name: statistics.median(values) for name, values in times.items()}


def sampling_seconds_per_image(models: dict[str, Imagen], count: int = 16, rounds: int = 3) -> dict[str, float]:
    """Median seconds per image of 25-step sampling, the models taking turns (a busy machine slows both alike)."""
    prompts = ["a red circle above a blue square"] * count
    times: dict[str, list[float]] = {name: [] for name in models}
    for imagen in models.values():
        imagen.sample(prompts[:2], seed=0, safety=False, **SAMPLING)  # warm-up (kernels, caches)
    for _ in range(rounds):
        for name, imagen in models.items():
            _synchronize()
            start = time.perf_counter()
            imagen.sample(prompts, seed=0, safety=False, **SAMPLING)
            _synchronize()
            times[name].append((time.perf_counter() - start) / count)
    return {name: statistics.median(values) for name, values in times.items()}


def generated_for_fid(imagen: Imagen, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    batches = [imagen.sample(captions[i:i + batch_size], seed=i, safety=False, **SAMPLING).images.float().cpu()
               for i in range(0, len(captions), batch_size)]
    return torch.cat(batches)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu-small", help="recipe whose base stage both models use")
    parser.add_argument("--output", default="runs/diffusers-baseline", help="baseline checkpoints and weights")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's base-stage steps")
    parser.add_argument("--samples", type=int, default=2, help="images per eval64 prompt")
    parser.add_argument("--fid-samples", type=int, default=512, help="images per set for the domain FID")
    parser.add_argument("--rounds", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ship", action="store_true", help=f"write the fp16 baseline to {PACKAGE_COPY}")
    parser.add_argument("--ours", default=str(SHIPPED_SCENE_MODEL), help="the mini-imagen model folder to compare")
    parser.add_argument("--no-train", action="store_true", help="use the baseline in --output as it is")
    parser.add_argument("--timing-only", action="store_true", help="only time training steps and sampling")
    parser.add_argument("--batch-size", type=int, default=None, help="timed batch (default: the recipe's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=SafetyCheckDisabledWarning)  # measuring models, not serving them
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe, name = load_recipe(args.config)
    if args.steps is not None:
        recipe.stage_steps = [args.steps, *(recipe.stage_steps or [recipe.train.steps])[1:]]
    output = Path(args.output)
    if not args.no_train:
        start = time.time()
        train_baseline(recipe, output)
        train_wall = time.time() - start
        print(f"baseline trained (or resumed) in {train_wall / 60:.1f} min this run -> {output}")

    device = pick_device(args.device)
    encoder = load_text_encoder(device=device)
    models = {"mini-imagen EfficientUNet": Imagen.from_pretrained(args.ours, text_encoder=encoder).to(device),
              "diffusers UNet2DConditionModel": load_baseline(output, text_encoder=encoder, device=device)}
    batch_size = args.batch_size or recipe.train.batch_size
    step_seconds = train_step_seconds(models, args.rounds, batch_size)
    if args.timing_only:
        sample_seconds = sampling_seconds_per_image(models)
        timings = {name: {"train_step_s": step_seconds[name], "sample_s_per_image": sample_seconds[name],
                          "parameters_M": round(imagen.unets[0].num_parameters() / 1e6, 2)}
                   for name, imagen in models.items()}
        machine = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
        result = {"machine": machine, "torch": torch.__version__, "batch_size": batch_size, "timings": timings}
        print(json.dumps(result, indent=2))
        (output / "timings.json").write_text(json.dumps(result, indent=2))
        return
    real = SceneDataset(dataclasses.replace(recipe.data, resolution=32, seed=11), length=args.fid_samples)
    real_images = torch.stack([real[i]["image"] for i in range(len(real))])
    caption_source = SceneDataset(dataclasses.replace(recipe.data, resolution=32, seed=12), length=args.fid_samples)
    fid_captions = [caption_source[i]["caption"] for i in range(args.fid_samples)]
    sample_seconds = sampling_seconds_per_image(models)
    rows = {}
    for model_name, imagen in models.items():
        report = evaluate(imagen, "eval64", samples_per_prompt=args.samples, progress=False, **SAMPLING)
        rows[model_name] = {
            "parameters_M": round(imagen.unets[0].num_parameters() / 1e6, 2),
            "faithful_seen": report.by_split["seen"]["faithful"],
            "faithful_heldout": report.by_split["heldout"]["faithful"],
            "colour": report.overall["colour"],
            "domain_fid": domain_fid(real_images, generated_for_fid(imagen, fid_captions)),
            "train_step_s": step_seconds[model_name],
            "sample_s_per_image": sample_seconds[model_name],
        }
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    # an open-ended recipe (max_minutes) stops where the clock says: its step count is in the model cards
    steps = "as trained (see the model cards)" if recipe.train.max_minutes else recipe.steps_for(0)
    print(f"\nSame recipe ({name}, base stage, {steps} steps x batch {recipe.train.batch_size}); eval64 x "
          f"{args.samples}, domain FID at N={args.fid_samples}; {machine}\n")
    print("| base U-Net | params | faithful seen | faithful held-out | colour | domain FID | train step | "
          "sampling (25 steps) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for model_name, row in rows.items():
        print(f"| {model_name} | {row['parameters_M']:.2f}M | {row['faithful_seen']:.1%} | "
              f"{row['faithful_heldout']:.1%} | {row['colour']:.1%} | {row['domain_fid']:.1f} | "
              f"{row['train_step_s'] * 1000:.0f} ms | {row['sample_s_per_image'] * 1000:.0f} ms/image |")
    ours, theirs = rows.values()
    print(f"\ndiffusers / mini-imagen: train step {theirs['train_step_s'] / ours['train_step_s']:.2f}x, "
          f"sampling {theirs['sample_s_per_image'] / ours['sample_s_per_image']:.2f}x")
    result = {"recipe": name, "steps": steps, "machine": machine, "rows": rows}
    (output / "comparison.json").write_text(json.dumps(result, indent=2))
    if args.ship:
        save_baseline(models["diffusers UNet2DConditionModel"], PACKAGE_COPY, dtype=torch.float16)
        print(f"wrote {PACKAGE_COPY}")


if __name__ == "__main__":
    main()
