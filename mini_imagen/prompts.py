"""Prompt sets for evaluation: what to ask a model, DrawBench style, in the scenes' own vocabulary.

Imagen's DrawBench (Saharia et al., 2022, sec. 3) is about 200 prompts in 11 categories (colours,
counting, positional, long descriptions, rare words...) chosen to probe what a text-to-image model
gets wrong. Ours are built the same way from the scene vocabulary, so the scene scorer
(``mini_imagen.evaluation.scorer``) can check every prompt. Each prompt has

* a ``category``: ``single`` ("a red circle"), ``binding`` (two or three differently coloured
  shapes: is each colour on the right shape?), ``counting``, ``position`` (a named cell of the
  image), ``relation`` (left of / above ...), ``long`` (over 20 words) and ``paraphrase`` (words
  training never uses: "a crimson circle higher than an azure square");
* a ``split``: ``heldout`` when it asks for a colour-shape pair that training never shows
  (``recipes.HELD_OUT_PAIRS``: purple triangle, yellow circle), ``seen`` otherwise.

The sets are fixed: ``python -m mini_imagen.prompts`` rebuilds them (seeded, so byte for byte) into
``data/prompts/*.json``; ``load_prompts`` reads a set by name or any JSON file of the same schema.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mini_imagen.data.scenes import (
    ALL_PAIRS,
    POSITIONS,
    RELATIONS,
    SIZES,
    CaptionClaims,
    ObjectGroup,
    parse_caption,
    write_caption,
)
from mini_imagen.recipes import HELD_OUT_PAIRS

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
CATEGORIES = ("single", "binding", "counting", "position", "relation", "long", "paraphrase")
SPLITS = ("seen", "heldout")
SEEN_PAIRS = tuple(pair for pair in ALL_PAIRS if pair not in HELD_OUT_PAIRS)
# Long prompts: the scene first (the text encoder keeps the first 32 tokens), then words that claim nothing.
LONG_TEMPLATES = (
    "{scene}, drawn as flat shapes with crisp edges on a plain black background, with no shading, "
    "no texture and nothing else anywhere in the picture",
    "{scene}, every shape filled with one bright flat colour and sharply outlined against an empty dark "
    "background, in the style of a simple diagram",
    "{scene}; the picture is clean and minimal, like a diagram in a children's book, and the background "
    "stays completely black",
)


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of a set: its text, what it tests, and whether it asks for a held-out pair."""

    prompt: str
    category: str
    split: str

    @property
    def claims(self) -> CaptionClaims:
        return parse_caption(self.prompt)


# ----------------------------------------------------------------------------- building prompts
def _groups(rng: random.Random, split: str, counts: list[int]) -> list[ObjectGroup]:
    """Groups of distinct colour-shape pairs, sized now and then; with ``split="heldout"`` the first is held out."""
    first = [rng.choice(HELD_OUT_PAIRS)] if split == "heldout" else []
    pairs = first + rng.sample([p for p in SEEN_PAIRS if p not in first], len(counts) - len(first))
    groups = []
    for (colour, shape), count in zip(pairs, counts):
        size = rng.choice([None, *SIZES]) if count <= 2 else None  # scenes hold at most two large objects
        groups.append(ObjectGroup(count, colour, shape, size))
    return groups


def make_prompt(category: str, split: str, rng: random.Random) -> EvalPrompt:
    """One random prompt of ``category`` and ``split``, written in the training wording unless a paraphrase."""
    if category not in CATEGORIES or split not in SPLITS:
        raise ValueError(f"category must be one of {CATEGORIES} and split one of {SPLITS}; got {category!r}, {split!r}")
    kind = rng.choice(["single", "binding", "counting", "position", "relation"]) if category in (
        "long", "paraphrase") else category
    relation = position = None
    if kind == "single":
        groups = _groups(rng, split, [1])
    elif kind == "binding":
        groups = _groups(rng, split, [1] * rng.choice([2, 2, 3]))
    elif kind == "counting":
        count = rng.randint(2, 4)
        extra = [1] if count < 4 and rng.random() < 1 / 3 else []  # "two red circles and a blue square"
        groups = _groups(rng, split, [count] + extra)
    elif kind == "position":
        groups, position = _groups(rng, split, [1]), rng.choice(POSITIONS)
    else:
        groups, relation = _groups(rng, split, [1] * rng.choice([2, 2, 3])), rng.choice(RELATIONS)
    claims = CaptionClaims.make(groups, relation, position)
    text = write_caption(claims, rng, "heldout" if category == "paraphrase" else "train")
    if category == "long":
        text = rng.choice(LONG_TEMPLATES).format(scene=text)
    return EvalPrompt(text, category, split)


def build_prompts(recipe: dict[str, int], name: str) -> list[EvalPrompt]:
    """``recipe`` maps "category/split" to how many prompts; seeded by the set's name, no duplicates."""
    rng, prompts, seen = random.Random(f"prompts:{name}"), [], set()
    for key, count in recipe.items():
        category, split = key.split("/")
        while sum(p.category == category and p.split == split for p in prompts) < count:
            prompt = make_prompt(category, split, rng)
            if prompt.prompt not in seen:
                seen.add(prompt.prompt)
                prompts.append(prompt)
    return prompts


def _mix(per_split: dict[str, int], splits: tuple[str, ...] = SPLITS) -> dict[str, int]:
    return {f"{category}/{split}": count for split in splits for category, count in per_split.items()}


BASIC = {"single": 8, "binding": 10, "counting": 10, "position": 10, "relation": 10}
PROMPT_SETS: dict[str, tuple[str, dict[str, int]]] = {  # name: (description, "category/split": how many)
    "seen": ("compositions of colour-shape pairs the training data shows", _mix(BASIC, ("seen",))),
    "heldout": ("every prompt asks for a held-out pair (purple triangle, yellow circle)", _mix(BASIC, ("heldout",))),
    "counting": ("two to four objects of a kind, sometimes with one more object", _mix({"counting": 16})),
    "spatial": ("named positions and left/right/above/below relations", _mix({"position": 12, "relation": 12})),
    "long": ("prompts of more than 20 words; the scene comes first", _mix({"long": 12})),
    "drawbench_mini": ("a small mix of every category, DrawBench style", _mix({c: 2 for c in CATEGORIES})),
    "eval64": ("the default: 64 prompts, half seen and half held-out",
               _mix({"single": 6, "binding": 6, "counting": 7, "position": 6, "relation": 7})),
}


def build_prompt_set(name: str) -> list[EvalPrompt]:
    """The prompts of a built-in set, rebuilt from its seed (what ``data/prompts/<name>.json`` holds)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {sorted(PROMPT_SETS)} or give a JSON file")
    return build_prompts(PROMPT_SETS[name][1], name)


# ----------------------------------------------------------------------------- files
def prompt_set_to_json(name: str, prompts: list[EvalPrompt], description: str = "") -> str:
    """A set as JSON text with one prompt per line, so that a diff of a set reads like a list."""
    rows = ",\n".join(f"  {json.dumps(asdict(p))}" for p in prompts)
    return (f'{{\n "name": {json.dumps(name)},\n "description": {json.dumps(description)},\n'
            f' "prompts": [\n{rows}\n ]\n}}\n')


def write_prompt_sets(directory: str | Path = PROMPTS_DIR) -> list[Path]:
    """Write every built-in set to ``directory/<name>.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (description, _) in PROMPT_SETS.items():
        path = directory / f"{name}.json"
        path.write_text(prompt_set_to_json(name, build_prompt_set(name), description))
        paths.append(path)
    return paths


def load_prompts(name_or_path: str | Path) -> tuple[list[EvalPrompt], str]:
    """(prompts, name) of a built-in set ("eval64") or a JSON file; every prompt is checked to parse.

    A file holds ``{"prompts": [{"prompt": ..., "category": ..., "split": ...}, ...]}`` or just the list;
    ``category`` and ``split`` may be left out ("custom", "seen").
    """
    text = str(name_or_path)
    path = Path(text)
    if text in PROMPT_SETS and not path.is_file():
        stored = PROMPTS_DIR / f"{text}.json"
        if not stored.is_file():  # installed without the data folder: rebuild it, it is the same
            return build_prompt_set(text), text
        path = stored
    elif not path.is_file():
        raise ValueError(f"unknown prompt set '{text}': give a JSON file or one of {sorted(PROMPT_SETS)}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    entries = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path} must hold a non-empty list of prompts, or {{\"prompts\": [...]}}")
    return [_entry(item, index, path) for index, item in enumerate(entries)], path.stem


def _entry(item: Any, index: int, path: Path) -> EvalPrompt:
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise ValueError(f"{path}: prompt {index} must be a string or an object with a \"prompt\" string")
    prompt = EvalPrompt(item["prompt"], str(item.get("category", "custom")), str(item.get("split", "seen")))
    try:
        parse_caption(prompt.prompt)
    except ValueError:
        raise ValueError(f"{path}: prompt {index} ({prompt.prompt!r}) cannot be scored: it names no object "
                         "like 'a red circle' or 'two blue squares' in the scene vocabulary") from None
    return prompt


def uses_held_out_pair(prompt: str, held_out: tuple[tuple[str, str], ...] = HELD_OUT_PAIRS) -> bool:
    """True when the prompt asks for one of the held-out colour-shape pairs."""
    return any((g.colour, g.shape) in held_out for g in parse_caption(prompt).groups)


if __name__ == "__main__":
    for written in write_prompt_sets():
        print(f"wrote {written}")
