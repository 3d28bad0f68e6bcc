"""The words of the captioned scenes: colours, shapes, sizes, positions, relations, and how captions say them.

Two wordings share one meaning: ``"train"`` is what training captions use, ``"heldout"`` (colour synonyms such
as "crimson", digits, new sentence frames) is language training never shows, for testing whether a frozen text
encoder carries meaning across (Imagen sec. 4.4). ``scenes.py`` draws pictures with these words; the scorer and
the prompt sets read captions with them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Saturated colours, far apart in hue, on a black background: easy to tell apart at 32 px.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 35, 35),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 30),
    "green": (40, 190, 40),
    "cyan": (0, 220, 230),
    "blue": (40, 80, 255),
    "purple": (150, 60, 230),
    "pink": (255, 100, 190),
    "white": (240, 240, 240),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
# Side of an object's (axis-aligned, square) bounding box, as a fraction of the image side.
SIZES = {"small": 0.25, "large": 0.375}
# Named positions: the cells of a 3x3 grid (thirds of the image), rows top to bottom.
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ALL_PAIRS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)

@dataclass(frozen=True)
class Wording:
    """The words of one vocabulary: each concept has one or more phrasings, and a caption picks one at random."""

    colours: dict[str, tuple[str, ...]]
    sizes: dict[str, tuple[str, ...]]
    relations: dict[str, tuple[str, ...]]
    positions: dict[str, tuple[str, ...]]
    counts: dict[int, tuple[str, ...]]
    templates: tuple[str, ...]  # "{scene}" is the description, "{be}" is "is" or "are"


WORDINGS = {
    "train": Wording(
        colours={colour: (colour,) for colour in COLOURS},
        sizes={"small": ("small", "little"), "large": ("large", "big")},
        relations={"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
                   "above": ("above", "over"), "below": ("below", "under")},
        positions={"top left": ("in the top left corner", "at the top left"), "top": ("at the top",),
                   "top right": ("in the top right corner", "at the top right"), "left": ("on the left",),
                   "centre": ("in the centre", "in the middle"), "right": ("on the right",),
                   "bottom left": ("in the bottom left corner", "at the bottom left"), "bottom": ("at the bottom",),
                   "bottom right": ("in the bottom right corner", "at the bottom right")},
        counts={2: ("two",), 3: ("three",), 4: ("four",)},
        templates=("{scene}", "a picture of {scene}", "there {be} {scene}", "{scene} on a black background"),
    ),
    # Language the training captions never use: synonyms, digits and new sentence frames.
    "heldout": Wording(
        colours={"red": ("crimson",), "orange": ("amber",), "yellow": ("golden",), "green": ("emerald",),
                 "cyan": ("turquoise",), "blue": ("azure",), "purple": ("violet",), "pink": ("magenta",),
                 "white": ("ivory",)},
        sizes={"small": ("tiny",), "large": ("huge",)},
        relations={"left of": ("on the left side of",), "right of": ("on the right side of",),
                   "above": ("higher than",), "below": ("lower than",)},
        positions={name: ("toward the " + name,) for name in POSITIONS if name != "centre"} | {
            "centre": ("at the center",)},
        counts={2: ("2",), 3: ("3",), 4: ("4",)},
        templates=("an image showing {scene}", "a drawing of {scene}", "{scene}, drawn on a dark background"),
    ),
}
