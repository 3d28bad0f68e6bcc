"""From prompts to a PNG grid: the package's main job, used by ``mini-imagen generate`` and ``make demo``.

Which model answers:
1. ``model=`` the name of a shipped model (``"scenes"``, ``"emoji"``), or a folder written by
   ``Imagen.save_pretrained`` (or ``mini-imagen train``);
2. otherwise the scene model shipped inside the package (``mini_imagen/weights/scenes``);
3. while no weights ship, a small scene cascade trained once on this machine (about a minute on a
   CPU, preset ``cpu-tiny``), cached under ``~/.cache/mini-imagen/`` and reused afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from torchvision.utils import make_grid, save_image

from mini_imagen.imagen import Imagen
from mini_imagen.runtime import pick_device
from mini_imagen.safety import MAX_PROMPT_CHARS

SHIPPED_SCENE_MODEL = Path(__file__).resolve().parent / "weights" / "scenes"
# the cascades that ship inside the package, by the name `--model` accepts (model cards beside the weights)
SHIPPED_MODELS = {"scenes": SHIPPED_SCENE_MODEL, "emoji": SHIPPED_SCENE_MODEL.parent / "emoji"}


def cache_dir() -> Path:
    return Path(os.environ.get("MINI_IMAGEN_CACHE", Path.home() / ".cache" / "mini-imagen"))


def default_model_dir() -> Path:
    """The shipped scene model, or the locally trained fallback (trained on first use)."""
    if (SHIPPED_SCENE_MODEL / "config.json").is_file():
        return SHIPPED_SCENE_MODEL
    fallback = cache_dir() / "quick-scenes"
    if not (fallback / "config.json").is_file():
        from mini_imagen.recipes import load_recipe, train_recipe

        print(
            "mini-imagen: no trained weights ship with this version yet, so a small scene model is being trained "
            f"on this machine first (preset cpu-tiny, about a minute on a CPU); it is cached in {fallback}"
        )
        recipe, _ = load_recipe("cpu-tiny")
        train_recipe(recipe, fallback, resume=True)
    return fallback


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Reject empty prompts, cut absurdly long ones (the text encoder truncates further and warns)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    cleaned = []
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, got {type(prompt).__name__}")
        text = "".join(ch for ch in prompt if ch.isprintable() or ch == " ").strip()
        if not text:
            raise ValueError("a prompt is empty (or only spaces / control characters); give some words, "
                             "e.g. 'a red circle above a blue square'")
        if len(text) > MAX_PROMPT_CHARS:
            print(f"mini-imagen: warning: prompt of {len(text)} characters cut to {MAX_PROMPT_CHARS}")
            text = text[:MAX_PROMPT_CHARS]
        cleaned.append(text)
    if not cleaned:
        raise ValueError("no prompts given")
    return cleaned


def load_model(model: str | Path | None = None, device: str = "auto") -> Imagen:
    """A shipped model by name ("scenes", "emoji"), a model folder, or (None) the default scene model."""
    name = str(model) if model else "scenes"
    if name in SHIPPED_MODELS and not Path(name).exists():  # a folder of that name in the cwd wins
        # the scene model may fall back to one trained on first use (a stripped install)
        directory = default_model_dir() if name == "scenes" else SHIPPED_MODELS[name]
    else:
        directory = Path(name)
    return Imagen.from_pretrained(directory, device=pick_device(device))


def generate_grid(
    prompts: Sequence[str],
    model: str | Path | None = None,
    out: Path = Path("outputs/grid.png"),
    num_images: int = 4,
    guidance_scale: float = 2.0,
    steps: int = 25,
    sampler: str = "dpm++2m",
    thresholding: str = "static",
    noise_aug_level: float = 0.1,
    seed: int = 0,
    device: str = "auto",
    base_only: bool = False,
    safety: bool = True,
) -> Path:
    """Sample ``num_images`` per prompt and save one row per prompt as a PNG grid.

    With ``safety`` (the default) prompts are checked before any compute and images after
    (``mini_imagen.safety``); ``safety=False`` skips both and says so.
    """
    prompts = check_prompts(prompts)
    if not 1 <= num_images <= 64:
        raise ValueError(f"--num-images must be between 1 and 64, got {num_images}")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    imagen = load_model(model, device)
    if not safety:
        print("mini-imagen: warning: the safety check is off (--no-safety): prompts and images are not checked")
    repeated = [p for p in prompts for _ in range(num_images)]
    # Imagen.sample checks the prompts before any compute and the images after (unless safety=False).
    output = imagen.sample(
        repeated, guidance_scale=guidance_scale, steps=steps, sampler=sampler, thresholding=thresholding,
        noise_aug_level=noise_aug_level, seed=seed, stop_at_stage=0 if base_only else None, progress=True,
        safety=safety,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid((output.images.float().cpu() + 1) / 2, nrow=num_images, padding=2, pad_value=1.0)
    save_image(grid, out)
    for row, prompt in enumerate(prompts):
        print(f"row {row}: {prompt}")
    return out


__all__ = ["generate_grid", "load_model", "default_model_dir", "check_prompts"]
