"""How fast is mini-imagen's Efficient U-Net? A timing race against two public U-Nets.

    .venv/bin/python benchmarks/unet_speed.py                # the 32 px base U-Net, batch 16, 2 threads
    .venv/bin/python benchmarks/unet_speed.py --batch 32 --threads 4 --rounds 20
    .venv/bin/python benchmarks/unet_speed.py --mode quality --budget 600   # equal training time, then score

Contenders, all text-conditioned noise predictors of (nearly) the same size:

* ``mini_imagen.unet.EfficientUNet`` with the ``UNetConfig.base32()`` preset (or ``--config``);
* diffusers' ``UNet2DConditionModel`` (Stable Diffusion's U-Net), given the same levels, residual
  blocks per level, attention levels, text width and heads; its width is chosen to match the
  parameter count, and the pooled text is added to its time embedding (``class_embed_type="projection"``);
* imagen-pytorch's ``Unet`` (lucidrains), likewise mirrored, in its ``memory_efficient`` mode.

Every contender gets the same batch (noisy images, timesteps, 32 text tokens of width 384 with a
padding mask, pooled text), the same thread count and the same optimizer (AdamW). A *train step*
is forward + MSE loss on the noise + backward + optimizer step; a *sampling step* is one no-grad
forward pass over the batch (a guided step costs two of these, or one of twice the batch).
Rounds are interleaved (A, B, C, A, B, C, ...) after warm-up so a busy machine slows every
contender alike, and the median round is reported. Peak memory is measured in a fresh child
process per contender (the growth of resident memory during one step, Linux only) or with
``torch.cuda.max_memory_allocated`` on a GPU.

imagen-pytorch needs two work-arounds, both applied only inside this script: its package
``__init__`` imports its trainer, which needs the (large) ``datasets`` library, so only the
``imagen_pytorch.imagen_pytorch`` module is imported; and that module calls
``T5Config.from_pretrained`` at import time, which contacts the Hugging Face hub, so that one
lookup is answered with a local ``T5Config`` (it only sets a default we override). When
imagen-pytorch is missing (``pip install imagen-pytorch --no-deps beartype kornia einops``) its
column is skipped with the reason.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mini_imagen.runtime import pick_device
from mini_imagen.unet import EfficientUNet, UNetConfig

PRESETS: dict[str, Callable[[], UNetConfig]] = {"base32": UNetConfig.base32, "tiny": UNetConfig.tiny}
PEER_WIDTHS = range(8, 257, 2)  # widths tried when matching a peer's parameter count


@dataclass
class Batch:
    """One training batch, shared by every contender."""

    x_t: Tensor  # (B, 3, H, W) noisy images
    t: Tensor  # (B,) integer timesteps in [0, 1000)
    noise: Tensor  # (B, 3, H, W) the target
    tokens: Tensor  # (B, L, 384)
    mask: Tensor  # (B, L) bool, True = real token
    pooled: Tensor  # (B, 384)


@dataclass
class Contender:
    key: str  # "mini-imagen", or a key of BUILDERS
    name: str
    model: nn.Module
    denoise: Callable[[Batch], Tensor]  # the model's noise prediction for the batch
    width: int  # the width that was matched (mini-imagen: base_channels)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make_batch(config: UNetConfig, batch_size: int, device: torch.device, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    size, length, dim = config.image_size, config.max_text_len, config.text_embed_dim
    lengths = torch.randint(4, length + 1, (batch_size,), generator=generator)
    tensors = {
        "x_t": torch.randn(batch_size, config.in_channels, size, size, generator=generator),
        "t": torch.randint(0, 1000, (batch_size,), generator=generator),
        "noise": torch.randn(batch_size, config.out_channels, size, size, generator=generator),
        "tokens": torch.randn(batch_size, length, dim, generator=generator),
        "mask": torch.arange(length)[None, :] < lengths[:, None],
        "pooled": torch.randn(batch_size, dim, generator=generator),
    }
    return Batch(**{name: value.to(device) for name, value in tensors.items()})


# ----------------------------------------------------------------------------- the contenders


def build_mini_imagen(config: UNetConfig) -> Contender:
    model = EfficientUNet(config)
    return Contender("mini-imagen", "mini-imagen EfficientUNet", model,
                     lambda b: model(b.x_t, b.t, b.tokens, b.mask, b.pooled), config.base_channels)


def build_diffusers(config: UNetConfig, width: int) -> Contender:
    from mini_imagen.diffusers_baseline import diffusers_unet  # the same mirror the course's baseline uses

    model = diffusers_unet(config, width)
    return Contender("diffusers", "diffusers UNet2DConditionModel", model, lambda b: model(
        b.x_t, b.t, b.tokens, class_labels=b.pooled, encoder_attention_mask=b.mask).sample, width)


@functools.cache
def import_imagen_pytorch_unet() -> type:
    """imagen-pytorch's ``Unet`` class without its trainer and without the hub (see the module docstring)."""
    import transformers

    spec = importlib.util.find_spec("imagen_pytorch")
    if spec is None:
        raise ImportError("imagen-pytorch is not installed (pip install imagen-pytorch --no-deps beartype kornia)")
    package = types.ModuleType("imagen_pytorch")  # an empty package, so that its __init__ is not run
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["imagen_pytorch"] = package
    local_t5 = classmethod(lambda cls, name, **kwargs: cls(d_model=768))  # t5-v1_1-base's width, no download
    with mock.patch.object(transformers.T5Config, "from_pretrained", local_t5):
        return importlib.import_module("imagen_pytorch.imagen_pytorch").Unet


def build_imagen_pytorch(config: UNetConfig, width: int) -> Contender:
    Unet = import_imagen_pytorch_unet()
    model = Unet(
        dim=width, dim_mults=config.channel_mults, num_resnet_blocks=config.num_res_blocks,
        layer_attns=tuple(s in config.attention_resolutions for s in config.level_sizes),
        layer_cross_attns=tuple(s in config.cross_attention_resolutions for s in config.level_sizes),
        attn_heads=config.num_heads, text_embed_dim=config.text_embed_dim, max_text_len=config.max_text_len,
        channels=config.in_channels, channels_out=config.out_channels, memory_efficient=True,
    )
    # imagen-pytorch works in continuous time t/T in [0, 1], and reads no pooled vector (it pools the tokens).
    return Contender("imagen-pytorch", "imagen-pytorch Unet", model, lambda b: model(
        b.x_t, b.t.float() / 1000, text_embeds=b.tokens, text_mask=b.mask), width)


BUILDERS: dict[str, Callable[[UNetConfig, int], Contender]] = {
    "diffusers": build_diffusers, "imagen-pytorch": build_imagen_pytorch,
}


def match_width(builder: Callable[[UNetConfig, int], Contender], config: UNetConfig, target: int) -> Contender:
    """The contender whose parameter count is closest to ``target`` (widths grow until they overshoot)."""
    best: Contender | None = None
    for width in PEER_WIDTHS:
        try:
            contender = builder(config, width)
        except (ValueError, AssertionError, RuntimeError):  # e.g. width not divisible by the heads
            continue
        if best is None or abs(contender.num_parameters - target) < abs(best.num_parameters - target):
            best = contender
        if contender.num_parameters > target:
            break
    if best is None:
        raise ValueError(f"no width in {PEER_WIDTHS} builds")
    return best


# ----------------------------------------------------------------------------- measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(contender: Contender, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    loss = F.mse_loss(contender.denoise(batch), batch.noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def sampling_step(contender: Contender, batch: Batch) -> None:
    with torch.inference_mode():
        contender.denoise(batch)


def race(contenders: list[Contender], step: Callable[[Contender], None], warmup: int, rounds: int,
         device: torch.device) -> list[float]:
    """Median seconds per step of each contender, rounds interleaved across contenders."""
    times: list[list[float]] = [[] for _ in contenders]
    for round_index in range(warmup + rounds):
        for contender, seconds in zip(contenders, times, strict=True):
            sync(device)
            start = time.perf_counter()
            step(contender)
            sync(device)
            if round_index >= warmup:
                seconds.append(time.perf_counter() - start)
    return [statistics.median(seconds) for seconds in times]


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # the value is in kB


def peak_memory_mib(contender: Contender, batch: Batch, device: torch.device) -> tuple[float, float]:
    """Extra memory of one (sampling step, train step) above what the model and batch already hold."""
    optimizer = torch.optim.AdamW(contender.model.parameters(), lr=1e-4)
    peaks = []
    for step in (lambda: sampling_step(contender, batch), lambda: train_step(contender, optimizer, batch)):
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        else:
            base = _rss_mib("VmRSS")
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset the peak-RSS counter (VmHWM) of this process
            step()
            peaks.append(_rss_mib("VmHWM") - base)
    return peaks[0], peaks[1]


def probe_memory_in_child(key: str, width: int, args: argparse.Namespace) -> tuple[float, float] | None:
    """Run ``peak_memory_mib`` for one contender in a fresh process, so contenders cannot share freed memory."""
    if not sys.platform.startswith("linux"):
        return None
    command = [sys.executable, os.path.abspath(__file__), "--probe-memory", f"{key}:{width}",
               "--config", args.config, "--batch", str(args.batch), "--threads", str(args.threads)]
    # glibc then returns every freed block over 64 KiB to the OS, so resident memory follows live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"  (memory probe of {key} failed: {result.stderr.strip().splitlines()[-1:]})")
        return None
    sample_mib, train_mib = json.loads(result.stdout.strip().splitlines()[-1])
    return sample_mib, train_mib


# ----------------------------------------------------------------------------- modes


def build_contenders(config: UNetConfig) -> tuple[list[Contender], list[str]]:
    """mini-imagen's U-Net, and each peer at the width that matches its parameter count (or why it is skipped)."""
    mini = build_mini_imagen(config)
    contenders, skipped = [mini], []
    for name, builder in BUILDERS.items():
        try:
            contenders.append(match_width(builder, config, mini.num_parameters))
        except (ImportError, ValueError, RuntimeError, TypeError) as error:  # a missing peer only loses its column
            skipped.append(f"{name}: {type(error).__name__}: {error}")
    return contenders, skipped


def describe_machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    if sys.platform.startswith("linux"):
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    if device.type == "cuda":
        cpu = torch.cuda.get_device_name(device)
    return f"device {device} ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_table(contenders: list[Contender], train: list[float], sample: list[float],
                memory: list[tuple[float, float] | None], batch_size: int) -> None:
    header = (f"{'model':32s} {'params':>8s} {'train ms':>9s} {'img/s':>7s} {'sample ms':>10s} {'img/s':>7s} "
              f"{'train MiB':>10s} {'sample MiB':>11s}")
    print("\n" + header + "\n" + "-" * len(header))
    for contender, train_s, sample_s, mem in zip(contenders, train, sample, memory, strict=True):
        train_mib, sample_mib = ("n/a", "n/a") if mem is None else (f"{mem[1]:.0f}", f"{mem[0]:.0f}")
        print(f"{contender.name:32s} {contender.num_parameters / 1e6:7.2f}M {1e3 * train_s:9.1f} "
              f"{batch_size / train_s:7.1f} {1e3 * sample_s:10.1f} {batch_size / sample_s:7.1f} "
              f"{train_mib:>10s} {sample_mib:>11s}")
    print("\nspeed-up of mini-imagen (peer time / mini-imagen time):")
    for contender, train_s, sample_s in zip(contenders[1:], train[1:], sample[1:], strict=True):
        size = contender.num_parameters / contenders[0].num_parameters - 1
        matched = "" if abs(size) <= 0.1 else "  NOT matched within 10%"
        print(f"  vs {contender.name:32s} train {train_s / train[0]:.2f}x, sampling {sample_s / sample[0]:.2f}x "
              f"(width {contender.width}, params {size:+.1%}){matched}")


def run_speed(args: argparse.Namespace) -> None:
    """Train-step and sampling-step throughput and peak memory of the three U-Nets."""
    device = pick_device(args.device)
    config = PRESETS[args.config]()
    batch = make_batch(config, args.batch, device)
    contenders, skipped = build_contenders(config)
    for contender in contenders:
        contender.model.to(device).train()
    print(f"{describe_machine(device)}, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"batch {args.batch} x {config.in_channels}x{config.image_size}x{config.image_size}, text "
          f"{config.max_text_len}x{config.text_embed_dim}, config '{args.config}', {args.warmup} warm-up + "
          f"{args.rounds} timed rounds (median)")
    for reason in skipped:
        print(f"skipped {reason}")

    optimizers = {id(c): torch.optim.AdamW(c.model.parameters(), lr=1e-4) for c in contenders}
    train = race(contenders, lambda c: train_step(c, optimizers[id(c)], batch), args.warmup, args.rounds, device)
    sample = race(contenders, lambda c: sampling_step(c, batch), args.warmup, args.rounds, device)
    load = os.getloadavg()[0]
    memory = [probe_memory_in_child(c.key, c.width, args) if device.type == "cpu"
              else peak_memory_mib(c, batch, device) for c in contenders]
    print_table(contenders, train, sample, memory, args.batch)
    print(f"(load average {load:.1f} after timing: other work on the machine slows every contender)")


def scene_batches(config: UNetConfig, batch_size: int, seed: int = 0):
    """Endless (images, captions) batches of training scenes (held-out pairs excluded), the same for everyone."""
    from torch.utils.data import DataLoader

    from mini_imagen.data import SceneConfig, SceneDataset, collate_scenes
    from mini_imagen.recipes import HELD_OUT_PAIRS

    data = SceneDataset(SceneConfig(resolution=config.image_size, held_out_pairs=HELD_OUT_PAIRS, seed=seed), 50_000)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate_scenes,
                        generator=torch.Generator().manual_seed(seed))
    while True:
        for batch in loader:
            yield batch["image"], batch["caption"]


def noisy_batch(images: Tensor, captions: list[str], encoder, schedule, generator: torch.Generator,
                device: torch.device) -> Batch:
    """$x_t = \\sqrt{\\bar\\alpha_t} x_0 + \\sqrt{1 - \\bar\\alpha_t} \\epsilon$ with the text of each caption."""
    t = torch.randint(0, schedule.num_train_timesteps, (len(images),), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    text = encoder.encode(captions)
    return Batch(schedule.add_noise(images, noise, t).float().to(device), t.to(device), noise.to(device),
                 text.tokens.to(device), text.mask.to(device), text.pooled.to(device))


@torch.no_grad()
def sample_contender(contender: Contender, captions: list[str], size: int, encoder, schedule, steps: int,
                     seed: int, device: torch.device) -> Tensor:
    """DDPM ancestral sampling (no guidance: the peers have no null-text path), the package's own sampler."""
    from mini_imagen.samplers import make_sampler, run_sampler

    text = encoder.encode(captions)
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(len(captions), 3, size, size, generator=generator)

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1)[:1].expand(len(x_t)) if t.numel() != len(x_t) else t
        batch = Batch(x_t.float().to(device), t.to(device), x_t, text.tokens.to(device), text.mask.to(device),
                      text.pooled.to(device))
        return contender.denoise(batch).to(x_t.dtype).cpu()

    sampler = make_sampler("ddpm", schedule, thresholding="static")
    return run_sampler(model_fn, sampler, x_T, steps, generator=generator).clamp(-1, 1)


def run_quality(args: argparse.Namespace) -> None:
    """Train each U-Net for the same wall-clock budget on the scenes, then score its samples (scene scorer)."""
    from mini_imagen.evaluation import evaluate_images, format_report
    from mini_imagen.prompts import load_prompts
    from mini_imagen.schedule import NoiseSchedule
    from mini_imagen.text import load_text_encoder

    device = pick_device(args.device)
    config = PRESETS[args.config]()
    contenders, skipped = build_contenders(config)
    encoder = load_text_encoder(max_length=config.max_text_len)
    schedule = NoiseSchedule(1000, beta_schedule="cosine")
    prompts, set_name = load_prompts(args.prompts)
    print(f"{describe_machine(device)}, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"each model trains for {args.budget:.0f} s of its own train steps (batch {args.batch}, AdamW lr "
          f"{args.lr}, epsilon loss, cosine schedule), then draws {args.samples} samples for each of the "
          f"{len(prompts)} prompts of '{set_name}' with {args.sample_steps} DDPM steps")
    for reason in skipped:
        print(f"skipped {reason}")
    rows = []
    for contender in contenders:
        model = contender.model.to(device).train()
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        batches, generator = scene_batches(config, args.batch), torch.Generator().manual_seed(0)
        spent, steps, losses = 0.0, 0, []
        while spent < args.budget:
            batch = noisy_batch(*next(batches), encoder, schedule, generator, device)  # data time is not counted
            sync(device)
            start = time.perf_counter()
            loss = F.mse_loss(contender.denoise(batch), batch.noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync(device)
            spent += time.perf_counter() - start
            steps, losses = steps + 1, losses + [loss.item()]
        model.eval()
        captions = [p.prompt for p in prompts for _ in range(args.samples)]
        images = sample_contender(contender, captions, config.image_size, encoder, schedule, args.sample_steps,
                                  seed=1, device=device)
        report = evaluate_images(images, [p for p in prompts for _ in range(args.samples)], prompt_set=set_name,
                                 samples_per_prompt=args.samples)
        tail = statistics.mean(losses[-20:])
        rows.append((contender, steps, tail, report))
        print(f"\n{contender.name}: {steps} steps in {spent:.0f} s, final loss {tail:.4f}")
        print(format_report(report))
    print(f"\n{'model':32s} {'params':>8s} {'steps':>6s} {'loss':>7s} {'faithful':>9s} {'colour':>7s} {'shape':>6s}"
          f" {'count':>6s} {'black bg':>9s}")
    for contender, steps, tail, report in rows:
        cat = report.overall
        print(f"{contender.name:32s} {contender.num_parameters / 1e6:7.2f}M {steps:6d} {tail:7.4f} "
              + " ".join(f"{_pct(cat.get(k)):>{w}s}" for k, w in
                         (("faithful", 9), ("colour", 7), ("shape", 6), ("count", 6), ("background", 9))))
    print(f"(load average {os.getloadavg()[0]:.1f} at the end)")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


MODES: dict[str, Callable[[argparse.Namespace], None]] = {"speed": run_speed, "quality": run_quality}


def probe_memory(args: argparse.Namespace) -> None:
    """Child-process entry point of ``probe_memory_in_child``: prints [sample MiB, train MiB] as JSON."""
    name, width = args.probe_memory.split(":")
    config = PRESETS[args.config]()
    contender = build_mini_imagen(config) if name == "mini-imagen" else BUILDERS[name](config, int(width))
    batch = make_batch(config, args.batch, torch.device("cpu"))
    print(json.dumps(peak_memory_mib(contender, batch, torch.device("cpu"))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="speed")
    parser.add_argument("--config", choices=sorted(PRESETS), default="base32", help="the mini-imagen U-Net preset")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every contender")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--budget", type=float, default=600, help="quality mode: seconds of training per model")
    parser.add_argument("--lr", type=float, default=1e-3, help="quality mode: AdamW learning rate")
    parser.add_argument("--prompts", default="eval64", help="quality mode: prompt set to score")
    parser.add_argument("--samples", type=int, default=2, help="quality mode: samples per prompt")
    parser.add_argument("--sample-steps", type=int, default=100, help="quality mode: DDPM sampling steps")
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)  # internal: NAME:WIDTH, run in a child
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.probe_memory:
        probe_memory(args)
    else:
        MODES[args.mode](args)


if __name__ == "__main__":
    main()
