"""Captioned scenes: a text-to-image data set drawn by code, small enough to read in one sitting.

Imagen is trained on hundreds of millions of captioned photographs (Saharia et al., 2022, sec. 4.1).
We cannot do that on a laptop, so we *draw* our pictures: 1 to 4 flat coloured shapes on a black
background, each picture with a caption that is true of it,

    "a small green triangle at the top"        "two red circles and a blue square"
    "a red circle to the left of a blue square" "a cyan star above a pink cross and a white diamond"

Everything about a picture is decided by a seeded random number generator, so sample ``i`` of a
data set is the same picture and the same caption on every machine. Each sample keeps its
*structured* description (``Scene``: the objects, and the ``CaptionClaims`` the caption makes), so
a later lesson can score generated images for colour, shape, count and position.

Two knobs test generalisation, as Imagen's DrawBench does (sec. 3: colours, counting, positions):

* ``held_out_pairs`` -- colour-shape pairs (say a purple triangle) that training never shows;
  ``pairs="heldout"`` then makes scenes that all contain one (compositional generalisation);
* ``wording="heldout"`` -- colour synonyms ("crimson", "azure"...) and sentence templates that
  training never uses: can the frozen text encoder carry the meaning across (sec. 4.4)?

Pipeline: ``sample_scene`` (objects + claims) -> ``write_caption`` (words) -> ``render_scene``
(pixels, drawn 4x larger and box-filtered down: anti-aliasing at any resolution).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------- vocabulary and layout rules
from mini_imagen.data.vocabulary import (  # noqa: F401 (re-exported: the scorer and prompt sets read them here)
    COLOURS,
    BACKGROUND,
    SHAPES,
    PLURALS,
    SIZES,
    POSITIONS,
    RELATIONS,
    INVERSE_RELATION,
    ALL_PAIRS,
    Wording,
    WORDINGS,
)

# The kinds of caption a scene of n objects can have ("pair"/"triple": a relation; "group": n of one kind).
KINDS_BY_COUNT = {1: ("single",), 2: ("pair", "group", "list"), 3: ("triple", "group", "list"), 4: ("group", "list")}
MAX_OBJECTS = 4

# Geometry rules that keep every caption true and every scene scorable.
EDGE_MARGIN = 0.02  # objects stay this far inside the image
MAX_LARGE = 2  # large objects per scene: four objects always fit
MIN_GAP = 0.06  # bounding boxes of two objects are at least this far apart (2 px at 32 px)
POSITION_MARGIN = 0.03  # a named position keeps the centre this far from the 1/3 and 2/3 lines
RELATION_MIN_DISTANCE = 0.2  # "A left of B": B.x - A.x >= 0.2 ...
RELATION_MAX_SLOPE = 0.5  # ... and |B.y - A.y| <= 0.5 * (B.x - A.x): no diagonal ambiguity


# ----------------------------------------------------------------------------- structured description
@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. ``x, y`` is the centre of its bounding box: (0, 0) top left, (1, 1) bottom right."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def extent(self) -> float:
        """Side of the bounding box as a fraction of the image side."""
        return SIZES[self.size]

    @property
    def position(self) -> str:
        """The named 3x3-grid cell of the centre: "top left", "top", ..., "centre", ..., "bottom right"."""
        return position_name(self.x, self.y)


@dataclass(frozen=True)
class ObjectGroup:
    """What a caption says about some objects.

    "two small red circles" is ``ObjectGroup(2, "red", "circle", "small")``.
    """

    count: int
    colour: str
    shape: str
    size: str | None = None  # None: the caption does not say


@dataclass(frozen=True)
class CaptionClaims:
    """Everything a caption asserts, in canonical order so that equal meanings compare equal.

    ``relation`` relates every object of ``groups[0]`` to every object of the other groups;
    ``position`` says where the only object is. Build with ``CaptionClaims.make`` to canonicalise.
    """

    groups: tuple[ObjectGroup, ...]
    relation: str | None = None
    position: str | None = None

    @classmethod
    def make(cls, groups: Sequence[ObjectGroup], relation: str | None = None,
             position: str | None = None) -> CaptionClaims:
        groups = list(groups)
        if relation in ("right of", "below") and len(groups) == 2:  # "B right of A" == "A left of B"
            groups, relation = groups[::-1], INVERSE_RELATION[relation]
        def key(group: ObjectGroup) -> tuple:
            return group.colour, group.shape, group.count, group.size or ""

        if relation is None:
            groups = sorted(groups, key=key)
        else:  # the subject stays first, the objects of the relation are a set
            groups = groups[:1] + sorted(groups[1:], key=key)
        return cls(tuple(groups), relation, position)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionClaims:
        groups = [ObjectGroup(**group) for group in data["groups"]]
        return cls.make(groups, data.get("relation"), data.get("position"))


@dataclass
class Scene:
    """A drawn scene: its objects, what its caption claims about them, and the caption itself."""

    objects: list[SceneObject]
    claims: CaptionClaims
    caption: str
    kind: str  # how it was sampled: "single", "pair", "triple", "group" or "list"

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(obj) for obj in self.objects], "claims": self.claims.to_dict(),
                "caption": self.caption, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(objects=[SceneObject(**obj) for obj in data["objects"]],
                   claims=CaptionClaims.from_dict(data["claims"]), caption=data["caption"], kind=data["kind"])


# ----------------------------------------------------------------------------- geometry: when is a claim true?
def position_name(x: float, y: float) -> str:
    """The 3x3-grid cell a point falls in, by thirds of the image."""
    row = ("top", "", "bottom")[min(int(y * 3), 2)]
    column = ("left", "", "right")[min(int(x * 3), 2)]
    return " ".join(word for word in (row, column) if word) or "centre"


def spatial_relation(a: SceneObject, b: SceneObject) -> str | None:
    """How ``a`` lies relative to ``b``: "left of", "right of", "above", "below", or None when unclear."""
    dx, dy = b.x - a.x, b.y - a.y  # image y grows downwards, so dy > 0 means a is above b
    major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if major < RELATION_MIN_DISTANCE or minor > RELATION_MAX_SLOPE * major:
        return None
    if abs(dx) > abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def claims_hold(claims: CaptionClaims, objects: Sequence[SceneObject]) -> bool:
    """True when ``objects`` are exactly what ``claims`` describe (no object missing, none extra)."""
    members = {(g.colour, g.shape): [o for o in objects if (o.colour, o.shape) == (g.colour, g.shape)]
               for g in claims.groups}
    if sum(len(group) for group in members.values()) != len(objects):
        return False
    for group in claims.groups:
        found = members[(group.colour, group.shape)]
        if len(found) != group.count or (group.size and any(o.size != group.size for o in found)):
            return False
    if claims.position is not None and (len(objects) != 1 or objects[0].position != claims.position):
        return False
    if claims.relation is not None:
        subject = (claims.groups[0].colour, claims.groups[0].shape)
        subjects = members[subject]
        others = [o for o in objects if (o.colour, o.shape) != subject]
        return all(spatial_relation(a, b) == claims.relation for a in subjects for b in others)
    return True


# ----------------------------------------------------------------------------- configuration
@dataclass
class SceneConfig:
    """What scenes a data set draws. Every field is plain data, so a recipe file can set it."""

    resolution: int = 32
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    held_out_pairs: tuple[tuple[str, str], ...] = ()  # (colour, shape) pairs, e.g. (("purple", "triangle"),)
    pairs: str = "train"  # "train": never a held-out pair; "heldout": every scene shows one
    wording: str = "train"  # "train" or "heldout" vocabulary and templates
    seed: int = 0

    def __post_init__(self) -> None:
        self.held_out_pairs = tuple((str(c).lower(), str(s).lower()) for c, s in self.held_out_pairs)
        if not 16 <= self.resolution <= 1024:
            raise ValueError(f"resolution must be between 16 and 1024 pixels (e.g. 32, 64, 128), got {self.resolution}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                             f"got min_objects={self.min_objects}, max_objects={self.max_objects}")
        for colour, shape in self.held_out_pairs:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"held-out pair ({colour!r}, {shape!r}) is not a colour and a shape; "
                                 f"colours: {list(COLOURS)}, shapes: {list(SHAPES)}")
        if self.pairs not in ("train", "heldout"):
            raise ValueError(f"pairs must be 'train' or 'heldout', got {self.pairs!r}")
        if self.pairs == "heldout" and not self.held_out_pairs:
            raise ValueError("pairs='heldout' needs held_out_pairs, e.g. held_out_pairs=(('purple', 'triangle'),)")
        if len(set(ALL_PAIRS) - set(self.held_out_pairs)) < MAX_OBJECTS:
            raise ValueError(f"held_out_pairs leaves fewer than {MAX_OBJECTS} colour-shape pairs to train on")
        if self.wording not in WORDINGS:
            raise ValueError(f"wording must be one of {list(WORDINGS)}, got {self.wording!r}")


# ----------------------------------------------------------------------------- sampling a scene
def sample_scene(config: SceneConfig, index: int) -> Scene:
    """Scene number ``index`` of the data set ``config`` describes: the same on every machine."""
    rng = random.Random(f"{config.seed}:{index}")  # string seeds hash with SHA-512: platform independent
    # 1. What is in the scene: how many objects, which kind of caption, which colours and shapes.
    count = rng.randint(config.min_objects, config.max_objects)
    kind = rng.choice(KINDS_BY_COUNT[count])
    distinct = rng.randint(2, count) if kind == "list" else {"single": 1, "group": 1, "pair": 2, "triple": 3}[kind]
    pairs = _draw_pairs(config, rng, distinct)
    pairs += [rng.choice(pairs) for _ in range(count - distinct)]  # every drawn pair appears at least once
    sizes = _draw_sizes(rng, count, same=kind == "group")
    position = rng.choice(POSITIONS) if kind == "single" else None

    # 2. Where: random non-overlapping layouts until one makes the caption clearly true.
    for _ in range(1000):
        centres = [_point_in_cell(rng, position, SIZES[sizes[0]])] if position else _place(rng, sizes)
        if centres is None:
            continue
        objects = [SceneObject(shape, colour, size, x, y)
                   for (colour, shape), size, (x, y) in zip(pairs, sizes, centres)]
        relation = spatial_relation(objects[0], objects[1]) if kind in ("pair", "triple") else None
        if kind in ("pair", "triple") and (relation is None or any(
                spatial_relation(objects[0], other) != relation for other in objects[2:])):
            continue
        # 3. What the caption says, then the words it says it with.
        claims = CaptionClaims.make(_describe_groups(objects, rng), relation, position)  # objects[0] is the subject
        return Scene(objects, claims, write_caption(claims, rng, config.wording), kind)
    raise RuntimeError(f"could not lay out scene {index} ({kind}, {count} objects); this is a bug, please report it")


def _draw_pairs(config: SceneConfig, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """``k`` distinct (colour, shape) pairs: training pairs only, or a held-out pair first."""
    if config.pairs == "heldout":
        first = rng.choice(config.held_out_pairs)
        return [first] + rng.sample([p for p in ALL_PAIRS if p != first], k - 1)
    return rng.sample([p for p in ALL_PAIRS if p not in config.held_out_pairs], k)


def _draw_sizes(rng: random.Random, count: int, same: bool) -> list[str]:
    """Random sizes (one for all when ``same``), at most ``MAX_LARGE`` large so that crowds fit."""
    if same:
        return [rng.choice(list(SIZES)) if count <= MAX_LARGE else "small"] * count
    sizes = [rng.choice(list(SIZES)) for _ in range(count)]
    for index in [i for i, size in enumerate(sizes) if size == "large"][MAX_LARGE:]:
        sizes[index] = "small"
    return sizes


def _point_in_cell(rng: random.Random, position: str, extent: float) -> tuple[float, float]:
    """A centre inside the named cell, clear of the cell borders, with the object inside the image."""
    row, column = divmod(POSITIONS.index(position), 3)

    def uniform_in_third(third: int) -> float:
        low = max(extent / 2 + EDGE_MARGIN, third / 3 + POSITION_MARGIN)  # inside the image and the cell
        high = min(1 - extent / 2 - EDGE_MARGIN, (third + 1) / 3 - POSITION_MARGIN)
        return round(rng.uniform(low, high), 3)

    return uniform_in_third(column), uniform_in_third(row)


def _place(rng: random.Random, sizes: Sequence[str], tries: int = 50) -> list[tuple[float, float]] | None:
    """Random centres for objects of the given sizes, every pair of bounding boxes ``MIN_GAP`` apart."""
    centres: list[tuple[float, float]] = []
    for size in sizes:
        half = SIZES[size] / 2
        for _ in range(tries):
            x = round(rng.uniform(half + EDGE_MARGIN, 1 - half - EDGE_MARGIN), 3)
            y = round(rng.uniform(half + EDGE_MARGIN, 1 - half - EDGE_MARGIN), 3)
            # Two boxes are apart when they are separated along x *or* along y.
            if all(max(abs(x - cx), abs(y - cy)) - half - SIZES[other] / 2 >= MIN_GAP
                   for (cx, cy), other in zip(centres, sizes)):
                centres.append((x, y))
                break
        else:
            return None
    return centres


def _describe_groups(objects: Sequence[SceneObject], rng: random.Random) -> list[ObjectGroup]:
    """Group equal (colour, shape) objects; name their size half the time, when they share one."""
    groups = []
    for colour, shape in dict.fromkeys((o.colour, o.shape) for o in objects):
        members = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
        same_size = len({o.size for o in members}) == 1
        size = members[0].size if same_size and rng.random() < 0.5 else None
        groups.append(ObjectGroup(len(members), colour, shape, size))
    return groups


# ----------------------------------------------------------------------------- words
def write_caption(claims: CaptionClaims, rng: random.Random | None = None, wording: str = "train") -> str:
    """Put ``claims`` into words, picking a template, paraphrases and the order of a list with ``rng``."""
    if wording not in WORDINGS:
        raise ValueError(f"wording must be one of {list(WORDINGS)}, got {wording!r}")
    rng = rng or random.Random(0)
    words = WORDINGS[wording]
    groups, relation = list(claims.groups), claims.relation
    if relation is None:
        rng.shuffle(groups)  # "a red circle and a blue square" == "a blue square and a red circle"
    if relation and len(groups) == 2 and rng.random() < 0.5:  # "A left of B" -> "B right of A"
        groups, relation = groups[::-1], INVERSE_RELATION[relation]
    phrases = [_group_phrase(group, words, rng) for group in groups]
    if relation:
        scene = f"{phrases[0]} {rng.choice(words.relations[relation])} {_join(phrases[1:])}"
    elif claims.position:
        scene = f"{phrases[0]} {rng.choice(words.positions[claims.position])}"
    else:
        scene = _join(phrases)
    return rng.choice(words.templates).format(scene=scene, be="is" if groups[0].count == 1 else "are")


def _group_phrase(group: ObjectGroup, words: Wording, rng: random.Random) -> str:
    adjectives = [rng.choice(words.sizes[group.size])] if group.size else []
    adjectives.append(rng.choice(words.colours[group.colour]))
    if group.count == 1:
        article = "an" if adjectives[0][0] in "aeiou" else "a"
        return " ".join([article, *adjectives, group.shape])
    return " ".join([rng.choice(words.counts[group.count]), *adjectives, PLURALS[group.shape]])


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _alternation(words: dict[str, Any]) -> str:
    """A regex alternation of phrases, longest first so "to the left of" wins over "left of"."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _inverted(table_name: str) -> dict[Any, Any]:
    """Phrase -> meaning, over every wording."""
    return {phrase: meaning for w in WORDINGS.values() for meaning, phrases in getattr(w, table_name).items()
            for phrase in phrases}


_COLOUR_WORDS, _SIZE_WORDS = _inverted("colours"), _inverted("sizes")
_RELATION_WORDS, _POSITION_WORDS = _inverted("relations"), _inverted("positions")
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1} | _inverted("counts")
_SHAPE_WORDS = {shape: shape for shape in SHAPES} | {plural: shape for shape, plural in PLURALS.items()}
_GROUP = re.compile(rf"\b({_alternation(_COUNT_WORDS)}) (?:({_alternation(_SIZE_WORDS)}) )?"
                    rf"({_alternation(_COLOUR_WORDS)}) ({_alternation(_SHAPE_WORDS)})\b")
_RELATION = re.compile(rf"\b({_alternation(_RELATION_WORDS)})\b")
_POSITION = re.compile(rf"\b({_alternation(_POSITION_WORDS)})\b")


def parse_caption(caption: str) -> CaptionClaims:
    """Read back what a caption in either wording claims: the inverse of ``write_caption``."""
    text = " ".join(caption.lower().replace(",", " ").split())
    matches = list(_GROUP.finditer(text))
    if not matches:
        raise ValueError(f"no object like 'a red circle' or 'two blue squares' found in {caption!r}; "
                         f"colours: {list(COLOURS)}, shapes: {list(SHAPES)}")
    groups = [ObjectGroup(_COUNT_WORDS[count], _COLOUR_WORDS[colour], _SHAPE_WORDS[shape],
                          _SIZE_WORDS[size] if size else None)
              for count, size, colour, shape in (m.groups() for m in matches)]
    relation = position = None
    if len(matches) > 1:  # a relation sits between the first and the second object
        found = _RELATION.search(text, matches[0].end(), matches[1].start())
        relation = _RELATION_WORDS[found.group(1)] if found else None
    else:
        found = _POSITION.search(text, matches[0].end())
        position = _POSITION_WORDS[found.group(1)] if found else None
    return CaptionClaims.make(groups, relation, position)


# ----------------------------------------------------------------------------- pixels
def _unit_polygon(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale and shift a polygon so that its bounding box is exactly [-1, 1] x [-1, 1]."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy, half = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return [((x - cx) / half, (y - cy) / half) for x, y in points]


_ARM = 0.36  # half-width of a cross's arm, as a fraction of the half-side
_STAR = [(r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5))  # 5 outer and 5 inner corners
         for k, r in zip(range(10), [1.0, 0.5] * 5)]
UNIT_POLYGONS = {  # every shape but the circle, pointing up, bounding box [-1, 1]^2 (y down)
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "star": _unit_polygon(_STAR),
}


def render_scene(scene: Scene, resolution: int = 32, supersample: int = 4) -> Tensor:
    """Draw ``scene`` as a (3, resolution, resolution) float tensor in [-1, 1].

    Shapes are drawn ``supersample`` times larger and box-filtered down: each output pixel is the
    average of the ``supersample**2`` pixels it covers, so edges are anti-aliased at any size.
    """
    canvas = resolution * supersample
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, half = obj.x * canvas, obj.y * canvas, obj.extent * canvas / 2
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
        else:
            draw.polygon([(cx + half * u, cy + half * v) for u, v in UNIT_POLYGONS[obj.shape]], fill=colour)
    image = image.resize((resolution, resolution), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3): [0, 255] -> [-1, 1]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)


# ----------------------------------------------------------------------------- torch data set
class SceneDataset(Dataset):
    """``length`` captioned scenes, drawn on the fly; item ``i`` is the same for the same config.

    ``dataset[i]`` is ``{"image": (3, H, W) in [-1, 1], "caption": str, "scene": Scene}``;
    use ``collate_scenes`` as the ``DataLoader``'s ``collate_fn``.
    """

    def __init__(self, config: SceneConfig | None = None, length: int = 10_000):
        if length < 1:
            raise ValueError(f"length must be a positive number of scenes, got {length}")
        self.config = config or SceneConfig()
        self.length = length

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The structured scene (and caption) of item ``index``, without drawing it."""
        if not 0 <= index < self.length:
            raise IndexError(f"scene index {index} out of range for a data set of {self.length} scenes")
        return sample_scene(self.config, index)

    def captions(self) -> list[str]:
        """Every caption of the data set, in order (cheap: nothing is drawn)."""
        return [self.scene(i).caption for i in range(self.length)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(int(index))
        return {"image": render_scene(scene, self.config.resolution), "caption": scene.caption, "scene": scene}


def collate_scenes(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into ``{"image": (B, 3, H, W), "caption": [str] * B, "scene": [Scene] * B}``."""
    if not samples:
        raise ValueError("collate_scenes needs at least one sample")
    return {"image": torch.stack([s["image"] for s in samples]), "caption": [s["caption"] for s in samples],
            "scene": [s["scene"] for s in samples]}


def make_scenes(count: int, config: SceneConfig | None = None, start: int = 0) -> dict[str, Any]:
    """Scenes ``start .. start + count - 1`` as one batch (see ``collate_scenes``), for lessons and benchmarks."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    dataset = SceneDataset(config, length=start + count)
    return collate_scenes([dataset[i] for i in range(start, start + count)])
