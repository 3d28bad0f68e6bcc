"""Training recipes: a model, a data set and a training schedule in one plain dataclass.

A recipe is what ``mini-imagen train --config ...`` runs. It is either a built-in preset

    cpu-tiny    about a minute on a laptop CPU (smoke tests, the demo's fallback model)
    cpu-small   the CPU course model: about an hour a stage on one core
    emoji-cpu   the same cascade trained on the emoji data set
    colab-t4    a stronger cascade for one Colab T4 GPU (about 15 minutes a stage)
    gpu-quick   one H100/H200 for about 6 minutes a stage (the shipped weights)

or a YAML / JSON file that starts from a preset and overrides fields::

    preset: cpu-small
    train: {steps: 3000, learning_rate: 3.0e-4}
    data: {held_out_pairs: [[purple, triangle]]}
    stage_steps: [3000, 1500]

``init_from: scenes`` (or ``mini-imagen train --init-from scenes``) fine-tunes: the trained stages start
from a trained cascade's weights (a shipped name or a model folder with the same U-Nets).

Training goes one stage at a time (Imagen trains its cascade stages independently, sec. 2.4);
after each stage the EMA weights are written with ``Imagen.save_pretrained``, so a finished
stage is never trained again and a killed run resumes from the stage's last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

DATASETS = ("scenes", "emoji")

from mini_imagen.data import EmojiDataset, SceneConfig, SceneDataset, collate_emoji, collate_scenes
from mini_imagen.data.rendered import collate_rendered, render_all
from mini_imagen.imagen import Imagen, ImagenConfig, StageConfig
from mini_imagen.train import TrainConfig, Trainer
from mini_imagen.unet import UNetConfig


@dataclass
class TrainRecipe:
    """Everything needed to train a cascade reproducibly (saved beside the model as recipe.json)."""

    model: ImagenConfig = field(default_factory=ImagenConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: SceneConfig = field(default_factory=SceneConfig)
    num_scenes: int = 20_000  # size of the training set (rendered on the fly, deterministic per index)
    stage_steps: list[int] | None = None  # per-stage training steps; None = train.steps for every stage
    dataset: str = "scenes"  # "scenes" (procedural, ``data``) or "emoji" (Noto Color Emoji, data/emoji)
    # Draw every scene once before training and keep the bytes (``data/rendered.py``): for a GPU
    # that trains faster than the CPU draws. ``render_cache`` keeps the drawing on disk for the next run.
    prerender: bool = False
    render_cache: str | None = None
    # Fine-tuning: start the trained stages from this model's weights (a shipped name such as
    # "scenes", or a model folder) instead of a random initialisation. A checkpoint to resume wins.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")

    def make_dataset(self) -> tuple[Dataset, Callable]:
        """The training set and its collate function."""
        if self.dataset == "emoji":
            # Each emoji appears num_scenes // N times, each time with its own caption (name or alias, templated).
            size = EmojiDataset(resolution=self.data.resolution, split="train")
            repeats = max(1, self.num_scenes // len(size))
            return (EmojiDataset(resolution=self.data.resolution, split="train", caption_mode="random_alias",
                                 seed=self.data.seed, repeats=repeats), collate_emoji)
        scenes = SceneDataset(self.data, length=self.num_scenes)
        if self.prerender:
            return render_all(scenes, cache_dir=self.render_cache), collate_rendered
        return scenes, collate_scenes

    def steps_for(self, stage: int) -> int:
        return self.stage_steps[stage] if self.stage_steps else self.train.steps

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


# ----------------------------------------------------------------------------- presets
# Colour-shape pairs the course models never see in training; evaluation asks for them (compositional
# generalisation, as DrawBench's "colors" and "positional" categories do).
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("yellow", "circle"))

def cpu_tiny() -> TrainRecipe:
    """About a minute on a laptop CPU: a tiny 32 px base + 64 px SR (smoke tests, demo fallback)."""
    base = StageConfig(unet=UNetConfig.tiny(image_size=32))
    sr = StageConfig(unet=UNetConfig.tiny(image_size=64, lowres_cond=True))
    train = TrainConfig(steps=150, batch_size=16, learning_rate=1e-3, warmup_steps=20, ema_decay=0.95,
                        log_every=25, checkpoint_every=75)
    return TrainRecipe(model=ImagenConfig(stages=[base, sr]), train=train,
                       data=SceneConfig(resolution=64, max_objects=2), num_scenes=4000, stage_steps=[150, 60])


def cpu_small() -> TrainRecipe:
    r"""The CPU course model: base 32 px + SR 64 px, about an hour a stage on one CPU core.

    The base predicts $v$ (Salimans & Ho, 2022): with the cosine schedule $\bar\alpha_T \approx 0$, so an
    $\epsilon$-model's first $x_0$ estimates divide by almost zero and few-step DDIM / DPM-Solver samples
    stay noisy; a $v$-model's do not.
    """
    base = StageConfig(unet=UNetConfig.base32(), prediction_type="v_prediction")
    # The SR stage trains on 32 px crops of the 64 px images: 4x less compute per sample, so it
    # sees ~4x more steps in the same hour (the base and SR stages can train side by side, one per core).
    sr = StageConfig(unet=UNetConfig.sr64(), prediction_type="v_prediction", train_crop_size=32)
    train = TrainConfig(steps=3000, batch_size=32, learning_rate=1e-3, warmup_steps=200, ema_decay=0.999,
                        log_every=50, checkpoint_every=100)
    return TrainRecipe(model=ImagenConfig(stages=[base, sr]), train=train,
                       data=SceneConfig(resolution=64, held_out_pairs=HELD_OUT_PAIRS), num_scenes=50_000,
                       stage_steps=[3000, 3600])


def emoji_cpu() -> TrainRecipe:
    """The emoji model: the cpu-small cascade trained on 1,554 emoji with their names (white background)."""
    recipe = cpu_small()
    recipe.dataset = "emoji"
    recipe.num_scenes = 50_000
    return recipe


def colab_t4() -> TrainRecipe:
    """One Colab T4 GPU, about 15 minutes a stage: wider U-Nets, bigger batches, mixed precision."""
    recipe = cpu_small()
    recipe.train = dataclasses.replace(recipe.train, steps=20_000, batch_size=128, learning_rate=3e-4,
                                       warmup_steps=500, ema_decay=0.9995, mixed_precision="auto",
                                       num_workers=2, checkpoint_every=2000)
    recipe.num_scenes = 200_000
    recipe.prerender = True  # Colab has 2 CPU cores: draw the 200,000 scenes once, not every epoch
    recipe.stage_steps = [20_000, 10_000]
    return recipe


def gpu_quick() -> TrainRecipe:
    """One data-centre GPU (H100 / H200) for about 6 minutes a stage: how the shipped weights were trained.

    Batch 256 in bf16, the 200,000 scenes drawn once (``render_cache``), checkpoints every 1,000 steps.
    Steps are open-ended: ``max_minutes`` ends the run, and the model card records the step reached
    (``mini-imagen train --steps N`` repeats it exactly). The SR stage is 24 channels wide (1.7M
    parameters) so that the shipped cascades fit the package's 30 MB.
    """
    recipe = colab_t4()
    recipe.model.stages[1].unet = UNetConfig.sr64(base_channels=24)
    recipe.train = dataclasses.replace(recipe.train, steps=100_000, batch_size=256, learning_rate=1e-3,
                                       warmup_steps=500, ema_decay=0.999, max_minutes=6.0, num_workers=0,
                                       log_every=250, checkpoint_every=1000, keep_checkpoints=100)
    recipe.stage_steps = None
    recipe.render_cache = "runs/render-cache"
    return recipe


PRESETS: dict[str, Callable[[], TrainRecipe]] = {
    "cpu-tiny": cpu_tiny, "cpu-small": cpu_small, "emoji-cpu": emoji_cpu, "colab-t4": colab_t4,
    "gpu-quick": gpu_quick,
}


# ----------------------------------------------------------------------------- loading configs
def load_recipe(name_or_path: str | Path) -> tuple[TrainRecipe, str]:
    """A preset name, or a YAML/JSON file of overrides on top of a preset (``preset:``, default cpu-small)."""
    name = str(name_or_path)
    if name in PRESETS:
        return PRESETS[name](), name
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"unknown config '{name}': give a file path or one of the presets {sorted(PRESETS)}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping with keys preset/model/train/data/num_scenes/stage_steps")
    preset = data.pop("preset", "cpu-small")
    if preset not in PRESETS:
        raise ValueError(f"{path}: unknown preset '{preset}'; choose one of {sorted(PRESETS)}")
    recipe = PRESETS[preset]()
    for key, value in data.items():
        if key == "model":
            recipe.model = ImagenConfig.from_dict(_merge_model(recipe.model.to_dict(), value, path))
        elif key in ("train", "data"):
            current = getattr(recipe, key)
            setattr(recipe, key, _replace(current, value, f"{path}: {key}"))
        elif key in ("num_scenes", "stage_steps", "dataset", "prerender", "render_cache", "init_from"):
            setattr(recipe, key, value)
        else:
            raise ValueError(f"{path}: unknown key '{key}'; allowed: preset, model, train, data, num_scenes, "
                             "stage_steps, dataset, prerender, render_cache, init_from")
    recipe.__post_init__()  # re-check what the file changed
    return recipe, path.stem


def _merge_model(base: dict[str, Any], overrides: dict[str, Any], path: Path) -> dict[str, Any]:
    """The preset's model with a file's overrides; ``stages`` is merged stage by stage, so a file can say
    ``model: {stages: [{}, {noise_aug_max: 0.0}]}`` to change one field of the second stage only."""
    merged = {**base, **overrides}
    if "stages" in overrides:
        stages = overrides["stages"]
        if not isinstance(stages, list) or len(stages) != len(base["stages"]):
            raise ValueError(f"{path}: model.stages must be a list of {len(base['stages'])} mappings (one per stage "
                             "of the preset; {} keeps a stage as it is)")
        merged["stages"] = []
        for index, (stage, change) in enumerate(zip(base["stages"], stages)):
            if not isinstance(change, dict):
                raise ValueError(f"{path}: model.stages[{index}] must be a mapping, got {change!r}")
            unknown = sorted(set(change) - set(stage))
            if unknown:
                raise ValueError(f"{path}: model.stages[{index}]: unknown field(s) {unknown}; allowed: {sorted(stage)}")
            merged["stages"].append({**stage, **change, "unet": {**stage["unet"], **change.get("unet", {})}})
    return merged


def _replace(obj: Any, overrides: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    fixed = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
             for k, v in overrides.items()}
    return dataclasses.replace(obj, **fixed)


# ----------------------------------------------------------------------------- training
def train_recipe(recipe: TrainRecipe, output: str | Path, stages: list[int] | None = None,
                 resume: bool = True) -> Path:
    """Train the recipe's stages one after the other and save the cascade into ``output``."""
    stages = list(range(len(recipe.model.stages))) if stages is None else stages
    # Fine-tuning: a bad name or a different U-Net fails here, before any file is written.
    start = load_start(recipe.init_from, recipe.model, stages) if recipe.init_from else None
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    if (output / "config.json").is_file():  # keep stages that are already trained
        imagen = Imagen.from_pretrained(output)
    else:
        imagen = Imagen(recipe.model)
    if start is not None:  # a fine-tune: the stages start from trained weights (a checkpoint to resume still wins)
        for index in stages:
            imagen.unets[index].load_state_dict(start.unets[index].state_dict())
            print(f"stage {index} starts from the weights of {recipe.init_from}")
    data = recipe.make_dataset()  # once for every stage (a prerendered set is drawn once)
    for index in stages:
        train_stage(imagen, index, recipe, output, resume, data)
        imagen.save_pretrained(output)
    return output


def load_start(model: str | Path, config: ImagenConfig, stages: list[int]) -> Imagen:
    """The trained cascade a fine-tune starts from (a shipped name such as "scenes", or a model folder),
    checked to have the same text encoder and the same U-Nets as ``config`` at ``stages``: else the
    weights would mean nothing."""
    from mini_imagen.checkpoint import CheckpointError
    from mini_imagen.generate import SHIPPED_MODELS, load_model  # names resolve as `mini-imagen generate` does

    name = str(model)
    if name not in SHIPPED_MODELS and not Path(name).exists():
        raise ValueError(f"init_from {name!r} is neither a shipped model ({', '.join(SHIPPED_MODELS)}) nor a "
                         "model folder; give one written by `mini-imagen train` or `Imagen.save_pretrained`")
    try:
        start = load_model(name, device="cpu")
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        raise ValueError(f"init_from {name!r} cannot be loaded: {error}") from None
    if start.config.text_encoder != config.text_encoder:
        raise ValueError(f"init_from {name!r} was trained with the text encoder {start.config.text_encoder!r}, "
                         f"this recipe uses {config.text_encoder!r}; fine-tune with the same encoder")
    for index in stages:
        if index >= len(start.config.stages) or start.config.stages[index].unet != config.stages[index].unet:
            raise ValueError(f"init_from {name!r}: its stage {index} is not the recipe's U-Net "
                             f"({_describe_unet(start.config, index)} vs {_describe_unet(config, index)}); "
                             "fine-tune from a model trained with the same model config")
    return start


def _describe_unet(config: ImagenConfig, index: int) -> str:
    if index >= len(config.stages):
        return "no such stage"
    unet = config.stages[index].unet
    return f"{unet.image_size} px, channels {unet.base_channels} x {tuple(unet.channel_mults)}"


def train_stage(imagen: Imagen, index: int, recipe: TrainRecipe, output: Path, resume: bool = True,
                data: tuple[Dataset, Callable] | None = None) -> Imagen:
    """Train stage ``index`` of ``imagen`` with the recipe (checkpoints in ``output/stage<index>``); keep its EMA.
    ``data``: the recipe's ``(dataset, collate)`` when the caller already made it."""
    dataset, collate = data or recipe.make_dataset()
    encoder = imagen.text_encoder
    config = dataclasses.replace(recipe.train, steps=recipe.steps_for(index), output_dir=str(output / f"stage{index}"))
    generator = torch.Generator().manual_seed(config.seed + index)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate, num_workers=config.num_workers, generator=generator)

    def loss_fn(unet: torch.nn.Module, batch: dict) -> torch.Tensor:
        images = batch["image"].to(next(unet.parameters()).device)
        text = encoder.encode(batch["caption"]).to(images.device)
        return imagen.stage_loss(index, unet, images, text)

    trainer = Trainer(imagen.unets[index], loss_fn, loader, config)
    if resume:
        trainer.resume()
    print(f"training stage {index} ({recipe.model.stages[index].image_size}px) for {config.steps} steps "
          f"-> {config.output_dir}")
    trainer.train()
    # Ship the EMA weights: they sample better than the raw weights (Imagen appendix, imagen-pytorch).
    imagen.unets[index].load_state_dict(trainer.ema_model.state_dict())
    imagen.unets[index].cpu()
    return imagen
