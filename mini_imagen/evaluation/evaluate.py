"""Evaluating a cascade on a prompt set: sample every prompt, score every image, report by category.

This is the course's DrawBench (Saharia et al., 2022, sec. 4.3): instead of human raters, the scene
scorer (``scorer.py``) checks each image claim by claim, like GenEval does with a detector. The report
gives, for every image group (all, each split, each prompt category), the fraction of images whose
colour, shape, count, size, position and relation claims hold, whose background is black, and the
headline number: *prompt faithfulness*, the fraction of images for which every claim holds. Seen and
held-out colour-shape pairs are reported apart: held-out pairs measure compositional generalisation.

    report = evaluate(imagen, load_prompts("eval64")[0], samples_per_prompt=4, steps=50)
    print(format_report(report))
    report.save("outputs/eval64.json")
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mini_imagen.evaluation.scorer import CATEGORIES, SceneScore, category_accuracy, score_image
from mini_imagen.prompts import EvalPrompt, load_prompts
from mini_imagen.safety import SafetyCheckDisabledWarning

COLUMNS = (*CATEGORIES, "faithful")


class Sampler(Protocol):
    """Anything with Imagen's ``sample(prompts, seed=..., **kwargs) -> output with .images``."""

    def sample(self, prompts: Sequence[str], **kwargs: Any) -> Any: ...


@dataclass
class EvaluationReport:
    """Scores of a prompt set: summaries per group, one row per image, and the images themselves."""

    prompt_set: str
    num_prompts: int
    samples_per_prompt: int
    resolution: int
    sampling: dict[str, Any]  # seed, steps, guidance_scale, ... as passed to ``Imagen.sample``
    overall: dict[str, float | int | None]  # "images" and the accuracy of each of COLUMNS
    by_split: dict[str, dict[str, float | int | None]]
    by_category: dict[str, dict[str, float | int | None]]
    samples: list[dict[str, Any]]  # per image: prompt, category, split, sample, each category, objects
    images: Tensor | None = field(default=None, repr=False)  # (N, 3, H, W) in [-1, 1]; not saved

    @property
    def faithfulness(self) -> float:
        """The headline number: the fraction of images for which every claim of the prompt holds."""
        return float(self.overall["faithful"] or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name != "images"}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def summarise(scores: Sequence[SceneScore]) -> dict[str, float | int | None]:
    """``{"images": N, "colour": ..., ..., "faithful": ...}``: accuracies rounded to 4 digits."""
    accuracy = category_accuracy(scores)
    return {"images": len(scores), **{k: None if v is None else round(v, 4) for k, v in accuracy.items()}}


def evaluate_images(images: Tensor | Sequence[Tensor], prompts: Sequence[EvalPrompt | str],
                    prompt_set: str = "custom", samples_per_prompt: int = 1,
                    sampling: dict[str, Any] | None = None) -> EvaluationReport:
    """Score images that are already made, ``images[i]`` for ``prompts[i]``, and build the report."""
    prompts = [p if isinstance(p, EvalPrompt) else EvalPrompt(p, "custom", "seen") for p in prompts]
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    scores = [score_image(image, prompt.prompt) for image, prompt in zip(images, prompts)]
    return _report(prompts, scores, images, prompt_set, samples_per_prompt, sampling or {})


@torch.no_grad()
def evaluate(imagen: Sampler, prompts: Sequence[EvalPrompt | str] | str, samples_per_prompt: int = 4,
             seed: int = 0, batch_size: int = 32, progress: bool = True, prompt_set: str = "custom",
             **sampling_kwargs: Any) -> EvaluationReport:
    """Sample ``samples_per_prompt`` images per prompt and score them all.

    ``prompts`` is a list, or the name / JSON file of a prompt set (``mini_imagen.prompts``);
    ``sampling_kwargs`` go to ``imagen.sample`` (``steps``, ``guidance_scale``, ``sampler``,
    ``stop_at_stage``...). Batch ``b`` is sampled with seed ``seed + b``: the same call gives the same report.
    The safety checks are off here (``safety=False``): this measures what the model draws.
    """
    name = prompt_set
    if isinstance(prompts, (str, Path)):
        prompts, name = load_prompts(prompts)
    prompts = [p if isinstance(p, EvalPrompt) else EvalPrompt(p, "custom", "seen") for p in prompts]
    if not prompts:
        raise ValueError("evaluate() needs at least one prompt")
    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"samples_per_prompt and batch_size must be at least 1, got {samples_per_prompt}, {batch_size}")
    jobs = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    scores: list[SceneScore] = []
    images: list[Tensor] = []
    with tqdm(total=len(jobs), desc=f"evaluating {name}", unit="image", disable=not progress) as bar:
        for batch, start in enumerate(range(0, len(jobs), batch_size)):
            texts = [prompt.prompt for prompt in jobs[start:start + batch_size]]
            # safety=False: this measures the model; the image check would black out some fair images.
            with warnings.catch_warnings():  # ...and says so once, in the docstring, not once per batch
                warnings.simplefilter("ignore", SafetyCheckDisabledWarning)
                output = imagen.sample(texts, seed=seed + batch, safety=False, **sampling_kwargs)
            for image, text in zip(output.images.float().cpu(), texts):
                scores.append(score_image(image, text))
                images.append(image)
                bar.update(1)
            bar.set_postfix(faithful=f"{sum(s.faithful for s in scores) / len(scores):.0%}")
    sampling = {"seed": seed, "batch_size": batch_size, **sampling_kwargs}
    return _report(jobs, scores, torch.stack(images), name, samples_per_prompt, sampling)


def _report(prompts: Sequence[EvalPrompt], scores: Sequence[SceneScore], images: Tensor | Sequence[Tensor],
            name: str, samples_per_prompt: int, sampling: dict[str, Any]) -> EvaluationReport:
    def groups(key: str) -> dict[str, dict[str, float | int | None]]:
        values = dict.fromkeys(getattr(p, key) for p in prompts)  # in order of first appearance
        return {value: summarise([s for p, s in zip(prompts, scores) if getattr(p, key) == value])
                for value in values}

    samples = []
    for index, (prompt, score) in enumerate(zip(prompts, scores)):
        samples.append({"prompt": prompt.prompt, "category": prompt.category, "split": prompt.split,
                        "sample": index % samples_per_prompt, **score.categories(), "faithful": score.faithful,
                        "objects": [vars(o) for o in score.objects]})
    images = images if isinstance(images, Tensor) else torch.stack(list(images))
    return EvaluationReport(
        prompt_set=name, num_prompts=len(prompts) // samples_per_prompt, samples_per_prompt=samples_per_prompt,
        resolution=int(images.shape[-1]), sampling=json.loads(json.dumps(sampling, default=str)),
        overall=summarise(scores), by_split=groups("split"), by_category=groups("category"),
        samples=samples, images=images.detach().float().cpu())


def format_report(report: EvaluationReport) -> str:
    """The report as a text table: one row per group, one column per category (percent; "-": not claimed)."""
    lines = [f"{report.prompt_set}: {report.num_prompts} prompts x {report.samples_per_prompt} samples "
             f"at {report.resolution} px",
             f"{'':18s}{'images':>7s}" + "".join(f"{name:>11s}" for name in COLUMNS)]

    def row(label: str, summary: dict[str, float | int | None]) -> str:
        cells = "".join(f"{'-' if summary[n] is None else f'{100 * summary[n]:.1f}%':>11s}" for n in COLUMNS)
        return f"{label:18s}{summary['images']:>7d}{cells}"

    lines.append(row("all", report.overall))
    lines += [row(f"split {name}", summary) for name, summary in report.by_split.items()]
    lines += [row(f"  {name}", summary) for name, summary in report.by_category.items()]
    return "\n".join(lines)


__all__ = ["EvaluationReport", "evaluate", "evaluate_images", "format_report", "summarise"]
