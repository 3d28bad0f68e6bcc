"""Data sets for the course: procedurally drawn, captioned scenes (``scenes.py``, their words in
``vocabulary.py``, data/README.md) and emoji rendered from the Noto Color Emoji font (``emoji.py``,
data/emoji/README.md)."""

from mini_imagen.data.emoji import EmojiDataset, EmojiRecord, collate_emoji, load_emoji  # noqa: F401 (data/emoji)
from mini_imagen.data.scenes import (
    ALL_PAIRS,
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    WORDINGS,
    CaptionClaims,
    ObjectGroup,
    Scene,
    SceneConfig,
    SceneDataset,
    SceneObject,
    claims_hold,
    collate_scenes,
    make_scenes,
    parse_caption,
    position_name,
    render_scene,
    sample_scene,
    spatial_relation,
    write_caption,
)

__all__ = [
    "ALL_PAIRS", "COLOURS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "WORDINGS",
    "CaptionClaims", "ObjectGroup", "Scene", "SceneConfig", "SceneDataset", "SceneObject",
    "claims_hold", "collate_scenes", "make_scenes", "parse_caption", "position_name", "render_scene",
    "sample_scene", "spatial_relation", "write_caption",
    "EmojiDataset", "EmojiRecord", "collate_emoji", "load_emoji",
]
