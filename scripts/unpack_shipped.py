"""Turn the pack written by ``scripts/train_shipped_on_gpu.py`` into the package's model folders.

    python scripts/unpack_shipped.py runs/shipped/pack runs/unpacked      # then check, then copy into the package

Writes, each in fp16 (the package ships fp16; inference runs in fp32 after loading):

    scenes/                   the scene cascade (base + SR), ``Imagen.save_pretrained``
    scenes_sr_no_aug/         lesson 07's ablation: the SR stage's weights alone (``model.safetensors``)
    emoji/                    the emoji cascade
    diffusers_baseline/       the diffusers baseline at the equal-steps checkpoint (``save_baseline``)
    scenes_base_at_equal_steps/  the scene base at that same step (not shipped: for the comparison)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mini_imagen.diffusers_baseline import baseline_imagen, save_baseline
from mini_imagen.imagen import Imagen
from mini_imagen.recipes import load_recipe
from mini_imagen.text import load_text_encoder

WEIGHTS = Path(__file__).resolve().parents[1] / "mini_imagen" / "weights"


def stage_weights(pack: Path, name: str) -> tuple[dict[str, torch.Tensor], int]:
    path = pack / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as file:
        step = int(file.metadata()["step"])
    return {key: value.float() for key, value in load_file(str(path)).items()}, step


def cascade(recipe_file: str, stages: list[dict[str, torch.Tensor]], encoder) -> Imagen:
    imagen = Imagen(load_recipe(WEIGHTS / recipe_file)[0].model, text_encoder=encoder)
    for unet, state in zip(imagen.unets, stages, strict=True):
        unet.load_state_dict(state)  # strict: the recipe's architecture
    return imagen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pack", help="folder with the unpacked *.safetensors of the pack")
    parser.add_argument("output", help="where the model folders go")
    args = parser.parse_args()
    pack, output = Path(args.pack), Path(args.output)
    encoder = load_text_encoder()
    steps = {}

    base, steps["scenes_base"] = stage_weights(pack, "scenes_base")
    sr, steps["scenes_sr"] = stage_weights(pack, "scenes_sr")
    cascade("scenes.yaml", [base, sr], encoder).save_pretrained(output / "scenes", dtype=torch.float16)
    (output / "scenes_sr_no_aug").mkdir(parents=True, exist_ok=True)
    shutil.copy(pack / "scenes_sr_no_aug.safetensors", output / "scenes_sr_no_aug" / "model.safetensors")
    steps["scenes_sr_no_aug"] = stage_weights(pack, "scenes_sr_no_aug")[1]

    emoji_base, steps["emoji_base"] = stage_weights(pack, "emoji_base")
    emoji_sr, steps["emoji_sr"] = stage_weights(pack, "emoji_sr")
    cascade("emoji.yaml", [emoji_base, emoji_sr], encoder).save_pretrained(output / "emoji", dtype=torch.float16)

    recipe = load_recipe(WEIGHTS / "scenes.yaml")[0]
    baseline = baseline_imagen(recipe.model, text_encoder=encoder)
    state, steps["diffusers_baseline"] = stage_weights(pack, "diffusers_baseline_at_equal_steps")
    baseline.unets[0].load_state_dict(state)
    save_baseline(baseline, output / "diffusers_baseline", dtype=torch.float16)
    equal, steps["scenes_base_at_equal_steps"] = stage_weights(pack, "scenes_base_at_equal_steps")
    cascade("scenes.yaml", [equal, sr], encoder).save_pretrained(output / "scenes_base_at_equal_steps",
                                                                  dtype=torch.float16)
    (output / "steps.json").write_text(json.dumps(steps, indent=2))
    print(json.dumps(steps, indent=2))


if __name__ == "__main__":
    main()
