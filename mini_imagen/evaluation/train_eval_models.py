"""Train the two evaluation models on one CPU core and write ``mini_imagen/weights/eval/``.

    OMP_NUM_THREADS=1 python -m mini_imagen.evaluation.train_eval_models           # both, about 20 minutes
    python -m mini_imagen.evaluation.train_eval_models --only clip --clip-steps 50   # a quick try
    python -m mini_imagen.evaluation.train_eval_models --output /tmp/eval            # somewhere else
    python -m mini_imagen.evaluation.train_eval_models --card-only                   # rewrite README.md only

1. ``DomainFeatureNet`` (``features.py``): a scene classifier trained on fresh scenes every step
   (all colour-shape pairs); its penultimate features drive the domain FID / KID.
2. ``MiniCLIP`` (``clip.py``): contrastive training (symmetric InfoNCE) on a fixed set of
   training-split scenes, whose captions the frozen MiniLM encodes once, up front.

Both are then reloaded from the float16 files just written and measured on scenes neither has
seen; the numbers go into ``config.json`` and the model card ``README.md`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mini_imagen.data import Scene, SceneConfig, SceneDataset, render_scene
from mini_imagen.evaluation.clip import (
    MAX_LOGIT_SCALE,
    MiniCLIP,
    MiniCLIPConfig,
    contrastive_loss,
    load_mini_clip,
    retrieval_accuracy,
)
from mini_imagen.evaluation.features import (
    CONFIG_FILE,
    EVAL_WEIGHTS_DIR,
    DomainFeatureNet,
    SceneEncoderConfig,
    domain_fid,
    domain_kid,
    load_domain_feature_net,
    save_eval_weights,
    scene_labels,
)
from mini_imagen.recipes import HELD_OUT_PAIRS
from mini_imagen.runtime import seed_everything
from mini_imagen.text import load_text_encoder

# Scene seeds: training and measuring never draw the same scenes.
FEATURES_DATA_SEED, CLIP_DATA_SEED, EVAL_DATA_SEED = 101, 202, 909


@dataclass
class EvalTrainConfig:
    """Steps and optimiser settings for both models (the defaults are what the shipped weights used)."""

    feature_steps: int = 2400
    clip_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    clip_scenes: int = 16_384  # distinct (image, caption) pairs the mini-CLIP trains on
    eval_scenes: int = 1024  # scenes per evaluation split
    seed: int = 0


# ----------------------------------------------------------------------------- data
def fresh_batches(config: SceneConfig, batch_size: int, steps: int) -> Iterator[tuple[Tensor, list[Scene]]]:
    """``steps`` batches of never-repeated scenes: batch ``k`` holds scenes ``k*B .. k*B + B - 1``."""
    dataset = SceneDataset(config, length=batch_size * steps)
    for step in range(steps):
        scenes = [dataset.scene(i) for i in range(step * batch_size, (step + 1) * batch_size)]
        yield torch.stack([render_scene(s, config.resolution) for s in scenes]), scenes


def scene_set(config: SceneConfig, count: int) -> tuple[Tensor, list[str]]:
    """Scenes ``0 .. count-1`` of ``config``: images (count, 3, H, W) in [-1, 1] and their captions."""
    dataset = SceneDataset(config, length=count)
    scenes = [dataset.scene(i) for i in range(count)]
    return torch.stack([render_scene(s, config.resolution) for s in scenes]), [s.caption for s in scenes]


def encode_pooled(captions: Sequence[str], chunk: int = 256) -> Tensor:
    """The frozen encoder's pooled vectors (N, 384), a chunk at a time (its cache keeps only the last 1024)."""
    encoder = load_text_encoder()
    return torch.cat([encoder.encode(list(captions[i:i + chunk])).pooled for i in range(0, len(captions), chunk)])


# ----------------------------------------------------------------------------- optimisation
def make_optimizer(model: nn.Module, config: EvalTrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices and kernels decay, biases / norms / the temperature do not (as nanoGPT, CLIP)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def learning_rate(step: int, total: int, config: EvalTrainConfig) -> float:
    """Linear warm-up, then a cosine decay to zero."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def train_steps(model: nn.Module, batches: Iterator[Any], loss_of: Any, steps: int, config: EvalTrainConfig,
                name: str, log_every: int = 100) -> list[float]:
    """The loop both models share; returns the loss of every step."""
    optimizer, losses, start = make_optimizer(model, config), [], time.time()
    model.train()
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, config)
        loss = loss_of(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"[{name}] step {step + 1}/{steps}  loss {recent:.4f}  {time.time() - start:.0f}s", flush=True)
    return losses


def train_domain_feature_net(config: EvalTrainConfig) -> tuple[DomainFeatureNet, list[float]]:
    """The scene classifier, on fresh 32 px scenes with every colour-shape pair."""
    seed_everything(config.seed)
    net = DomainFeatureNet(SceneEncoderConfig())
    data = SceneConfig(resolution=32, seed=FEATURES_DATA_SEED)
    batches = fresh_batches(data, config.batch_size, config.feature_steps)
    losses = train_steps(net, batches, lambda m, b: m.loss(*b), config.feature_steps, config, "features")
    return net.eval(), losses


def train_mini_clip(config: EvalTrainConfig) -> tuple[MiniCLIP, list[float]]:
    """The mini-CLIP, on ``clip_scenes`` training-split pairs (no held-out pair, training wording)."""
    generator = seed_everything(config.seed)
    model = MiniCLIP(MiniCLIPConfig())
    data = SceneConfig(resolution=32, held_out_pairs=HELD_OUT_PAIRS, seed=CLIP_DATA_SEED)
    images, captions = scene_set(data, config.clip_scenes)
    start = time.time()
    pooled = encode_pooled(captions)  # every caption through the frozen encoder once
    print(f"[clip] encoded {len(captions)} captions ({len(set(captions))} distinct) in {time.time() - start:.0f}s")

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(config.clip_steps):
            rows = torch.randint(len(images), (config.batch_size,), generator=generator)
            yield images[rows], pooled[rows]

    losses = train_steps(model, batches(), lambda m, b: contrastive_loss(m(*b)), config.clip_steps, config, "clip")
    return model.eval(), losses


# ----------------------------------------------------------------------------- measuring
def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Blur with a separable Gaussian kernel of standard deviation ``sigma`` pixels."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(images)
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def distorted_sets(images: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Degraded copies of ``images`` from mild to severe: the domain FID should grow down this list."""
    generator = torch.Generator().manual_seed(seed)
    return {"blur sigma=0.5": gaussian_blur(images, 0.5), "blur sigma=1": gaussian_blur(images, 1.0),
            "colour shift (RGB -> GBR)": images[:, [1, 2, 0]],
            "gaussian noise": torch.randn(images.shape, generator=generator).clamp(-1, 1),
            "blank (all black)": torch.full_like(images, -1.0)}


@torch.no_grad()
def measure_domain_feature_net(net: DomainFeatureNet, count: int) -> dict[str, Any]:
    """Label accuracy on unseen scenes, and FID / KID of an unseen draw against distorted sets."""
    data = SceneConfig(resolution=32, seed=EVAL_DATA_SEED)
    dataset = SceneDataset(data, length=2 * count)
    scenes = [dataset.scene(i) for i in range(count)]
    images = torch.stack([render_scene(s, 32) for s in scenes])
    logits = net.classify(images)
    labels = scene_labels(scenes)
    results: dict[str, Any] = {
        "pairs_all_correct": ((logits["pairs"] > 0) == labels["pairs"].bool()).all(1).float().mean().item(),
        "count_accuracy": (logits["count"].argmax(1) == labels["count"]).float().mean().item(),
        "cells_all_correct": ((logits["cells"] > 0) == labels["cells"].bool()).all(1).float().mean().item()}
    other = [dataset.scene(i) for i in range(count, 2 * count)]  # an independent draw of the same distribution
    sets = {"independent draw (32 px)": torch.stack([render_scene(s, 32) for s in other]),
            "independent draw (64 px)": torch.stack([render_scene(s, 64) for s in other])}
    sets |= distorted_sets(sets["independent draw (32 px)"])
    results["fid"] = {name: domain_fid(images, fake, net) for name, fake in sets.items()}
    results["kid"] = {name: domain_kid(images, fake, net)[0] for name, fake in sets.items()}
    return results


@torch.no_grad()
def measure_mini_clip(model: MiniCLIP, count: int, candidates: int = 32) -> dict[str, Any]:
    """Top-1 retrieval among ``candidates`` pairs on unseen scenes of four kinds; chance is 1/candidates."""
    splits = {"unseen scenes": {}, "unseen scenes, 64 px": {"resolution": 64},
              "held-out pairs": {"pairs": "heldout"}, "held-out wording": {"wording": "heldout"},
              "held-out pairs and wording": {"pairs": "heldout", "wording": "heldout"}}
    results: dict[str, Any] = {"candidates": candidates, "chance": 1 / candidates}
    for name, overrides in splits.items():
        data = SceneConfig(**{"resolution": 32, "held_out_pairs": HELD_OUT_PAIRS, "seed": EVAL_DATA_SEED, **overrides})
        images, captions = scene_set(data, count)
        image_embeddings = model.encode_image(images)
        text_embeddings = model.encode_text_pooled(encode_pooled(captions))
        image_to_text, text_to_image = retrieval_accuracy(image_embeddings, text_embeddings, candidates)
        cosine = image_embeddings @ text_embeddings.T
        results[name] = {"image_to_text": image_to_text, "text_to_image": text_to_image,
                         "clip_score_matched": float(100 * cosine.diag().clamp(min=0).mean()),
                         "clip_score_shuffled": float(100 * cosine.roll(1, dims=1).diag().clamp(min=0).mean())}
    return results


# ----------------------------------------------------------------------------- the model card
def _timing(record: dict[str, Any]) -> str:
    shared = record["wall_time_s"] > 1.2 * record["cpu_time_s"] * record["threads"]
    return (f"wall time {record['wall_time_s'] / 60:.1f} min ({record['cpu_time_s'] / 60:.1f} min of CPU time on "
            f"{record['threads']} thread{'s' if record['threads'] > 1 else ''}"
            f"{'; the machine was shared with other jobs' if shared else ''})")


def model_card(entries: dict[str, dict[str, Any]], config: EvalTrainConfig, output: Path) -> str:
    """The README.md beside the weights: what was trained on what, for how long, and how well it does."""
    sizes = {p.name: p.stat().st_size for p in sorted(output.glob("*.safetensors"))}
    lines = ["# Evaluation models: domain feature network and mini-CLIP", "",
             "Trained by `OMP_NUM_THREADS=1 python -m mini_imagen.evaluation.train_eval_models` on one CPU core, "
             "from scratch, on the course's procedurally drawn scenes only (no photographs, no downloaded weights). "
             "Numbers made with them are comparable **only within this domain**, like fastai's Fashion-MNIST FID: "
             "a domain FID is not an Inception FID, and a mini-CLIP score is not an OpenAI CLIP score.", "",
             "| file | size |", "|---|---|", *[f"| `{n}` | {s / 1e6:.2f} MB (float16) |" for n, s in sizes.items()],
             "| `config.json` | model configs and the training record below |", "",
             f"Training settings: `{asdict(config)}`", ""]
    if "domain_features" in entries:
        record = entries["domain_features"]["training"]
        m = record["measured"]
        lines += ["## domain_features: `DomainFeatureNet` (FID / KID features, 128-d)", "",
                  f"- Data: fresh 32 px scenes every step (SceneConfig seed {FEATURES_DATA_SEED}, 1-4 objects, "
                  f"**all** colour-shape pairs: it is the measuring instrument), {record['scenes_seen']} scenes seen.",
                  "- Objective: multi-label presence of colour-shape pairs (54), colours (9), shapes (6) and "
                  "occupied 3x3 cells (9), plus the object count (4 classes); features whitened on real scenes.",
                  f"- Steps {record['steps']}, batch {config.batch_size}, seed {config.seed}, "
                  f"{_timing(record)}, loss {record['first_loss']:.3f} -> {record['final_loss']:.4f}.",
                  f"- On {config.eval_scenes} unseen scenes (seed {EVAL_DATA_SEED}): all 54 pair labels right "
                  f"{m['pairs_all_correct']:.1%}, count right {m['count_accuracy']:.1%}, "
                  f"all 9 cell labels right {m['cells_all_correct']:.1%}.", "",
                  f"Domain FID / KID of {config.eval_scenes} unseen scenes against other sets of {config.eval_scenes} "
                  "(the independent draw is the noise floor: FID is biased upwards at finite N, KID is not):", "",
                  "| other set | domain FID | KID |", "|---|---|---|",
                  *[f"| {k} | {m['fid'][k]:.3f} | {m['kid'][k]:.4f} |" for k in m["fid"]], ""]
    if "mini_clip" in entries:
        record = entries["mini_clip"]["training"]
        m = record["measured"]
        lines += ["## mini_clip: `MiniCLIP` (128-d image-text space)", "",
                  f"- Data: {record['scenes']} fixed training-split scenes at 32 px "
                  f"(SceneConfig seed {CLIP_DATA_SEED}, "
                  f"held-out pairs {list(map(list, HELD_OUT_PAIRS))} excluded, training wording); each caption "
                  "encoded once by the frozen all-MiniLM-L6-v2 (mean-pooled).",
                  "- Objective: symmetric InfoNCE with a learned temperature (CLIP). Image tower: the SceneEncoder "
                  "CNN from scratch; text tower: frozen MiniLM + a learned 2-layer MLP.",
                  f"- Steps {record['steps']}, batch {config.batch_size}, seed {config.seed}, "
                  f"{_timing(record)}, caption encoding included, "
                  f"loss {record['first_loss']:.3f} -> {record['final_loss']:.4f}, "
                  f"learned temperature {record['temperature']:.4f}.", "",
                  f"Zero-shot top-1 retrieval among {m['candidates']} candidates (chance {m['chance']:.3f}), "
                  f"{config.eval_scenes} unseen scenes per row (seed {EVAL_DATA_SEED}); CLIP score of matching pairs "
                  "vs. captions shifted by one:", "",
                  "| scenes | image -> caption | caption -> image | CLIP score matched | shuffled |",
                  "|---|---|---|---|---|",
                  *[f"| {k} | {v['image_to_text']:.3f} | {v['text_to_image']:.3f} | {v['clip_score_matched']:.1f} "
                    f"| {v['clip_score_shuffled']:.1f} |" for k, v in m.items() if isinstance(v, dict)], ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point
def train_and_ship(name: str, config: EvalTrainConfig, output: Path) -> dict[str, Any]:
    """Train model ``name``, write it (float16), reload what was written, measure it, record the numbers."""
    wall, cpu = time.time(), time.process_time()
    if name == "domain_features":
        model, losses = train_domain_feature_net(config)
        model_config = asdict(model.config)
        record = {"steps": config.feature_steps, "scenes_seen": config.feature_steps * config.batch_size}
    else:
        model, losses = train_mini_clip(config)
        model_config = model.config.to_dict()
        record = {"steps": config.clip_steps, "scenes": config.clip_scenes,
                  "temperature": float(1 / model.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())}
    record |= {"seed": config.seed, "wall_time_s": round(time.time() - wall, 1),
               "cpu_time_s": round(time.process_time() - cpu, 1), "threads": torch.get_num_threads(),
               "first_loss": losses[0], "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    save_eval_weights(model, name, model_config, record, output)
    if name == "domain_features":  # measure what ships: the float16 weights, read back from disk
        record["measured"] = measure_domain_feature_net(load_domain_feature_net(output), config.eval_scenes)
    else:
        record["measured"] = measure_mini_clip(load_mini_clip(output), config.eval_scenes)
    save_eval_weights(model, name, model_config, record, output)
    print(f"[{name}] {json.dumps(record['measured'], indent=1)}", flush=True)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the domain FID feature network and the mini-CLIP.")
    parser.add_argument("--only", choices=("features", "clip"), help="train one of the two models")
    parser.add_argument("--output", type=Path, default=EVAL_WEIGHTS_DIR, help="folder for weights and model card")
    parser.add_argument("--feature-steps", type=int, default=EvalTrainConfig.feature_steps)
    parser.add_argument("--clip-steps", type=int, default=EvalTrainConfig.clip_steps)
    parser.add_argument("--clip-scenes", type=int, default=EvalTrainConfig.clip_scenes)
    parser.add_argument("--eval-scenes", type=int, default=EvalTrainConfig.eval_scenes)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shipped weights used 1)")
    parser.add_argument("--card-only", action="store_true", help="only rewrite README.md from config.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = EvalTrainConfig(feature_steps=args.feature_steps, clip_steps=args.clip_steps,
                             clip_scenes=args.clip_scenes, eval_scenes=args.eval_scenes)
    if args.only in (None, "features") and not args.card_only:
        train_and_ship("domain_features", config, args.output)
    if args.only in (None, "clip") and not args.card_only:
        train_and_ship("mini_clip", config, args.output)
    entries = json.loads((args.output / CONFIG_FILE).read_text())
    (args.output / "README.md").write_text(model_card(entries, config, args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
