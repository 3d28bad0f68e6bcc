"""Evaluation that works offline: the scene scorer (``scorer``), prompt-set evaluation (``evaluate``),
domain FID / KID on a small shipped feature network (``features``) and a mini-CLIP (``clip``).

    from mini_imagen.evaluation import evaluate, format_report, score_image
    score_image(image, "a red circle above a blue square").faithful
    print(format_report(evaluate(imagen, "eval64", samples_per_prompt=2, steps=50)))
"""

# Imported eagerly on purpose: the function ``evaluate`` must win over the submodule of the same name.
from mini_imagen.evaluation.clip import MiniCLIP, MiniCLIPConfig, load_mini_clip, retrieval_accuracy
from mini_imagen.evaluation.evaluate import EvaluationReport, evaluate, evaluate_images, format_report, summarise
from mini_imagen.evaluation.features import (
    EVAL_WEIGHTS_DIR,
    DomainFeatureNet,
    SceneEncoder,
    domain_fid,
    domain_kid,
    load_domain_feature_net,
)
from mini_imagen.evaluation.scorer import (
    CATEGORIES,
    DetectedObject,
    SceneScore,
    category_accuracy,
    check_claims,
    find_objects,
    score_image,
    score_images,
)

__all__ = [
    "EVAL_WEIGHTS_DIR", "DomainFeatureNet", "MiniCLIP", "MiniCLIPConfig", "SceneEncoder", "domain_fid", "domain_kid",
    "load_domain_feature_net", "load_mini_clip", "retrieval_accuracy",
    "CATEGORIES", "DetectedObject", "EvaluationReport", "SceneScore", "category_accuracy", "check_claims",
    "evaluate", "evaluate_images", "find_objects", "format_report", "score_image", "score_images", "summarise",
]
