"""Data sets for the course: procedurally drawn, captioned scenes (see ``scenes.py`` and data/README.md)."""

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
]
