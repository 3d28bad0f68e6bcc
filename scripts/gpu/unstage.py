"""On the GPU machine: turn the staged MiniLM (``.gpu/minilm``, int8 + gzip) back into an fp32 model folder.

    python3 scripts/gpu/unstage.py            # writes /tmp/minilm, where .gpu/site's stand-in module points

Needs only torch and safetensors (both on the GPU machine). ``stage.py`` says how the folder was made.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from safetensors.torch import load, save_file

ROOT = Path(__file__).resolve().parents[2]


def unpack(weights: dict) -> dict:
    """``name.q8`` (int8 groups) times ``name.scale`` (fp16) back into ``name`` (fp32); fp16 tensors to fp32."""
    out = {}
    for name, value in weights.items():
        if name.endswith(".scale"):
            continue
        if name.endswith(".q8"):
            base = name[:-3]
            groups = value.float() * weights[base + ".scale"].float()
            out[base] = groups.reshape(groups.shape[0], -1)
        else:
            out[name] = value.float() if value.is_floating_point() else value
    return {k: v.contiguous() for k, v in out.items()}


def main(source: Path = ROOT / ".gpu" / "minilm", target: Path = Path("/tmp/minilm")) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with gzip.open(source / "model8.safetensors.gz", "rb") as file:
        save_file(unpack(load(file.read())), str(target / "model.safetensors"))
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("model8"):
            shutil.copy(path, target / path.name)
    print(f"MiniLM ready in {target}: {sorted(p.name for p in target.iterdir())}")


if __name__ == "__main__":
    main()
