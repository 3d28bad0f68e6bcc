"""Lesson 09's self-checks: right answers pass, the usual mistakes fail with a hint, nothing raises."""

import numpy as np
import scipy.linalg
import torch

from mini_imagen.evaluation import CATEGORIES
from mini_imagen.exercises.lesson09 import check_category_accuracy, check_clip_score, check_frechet_distance


def frechet(mu1, sigma1, mu2, sigma2):
    root = scipy.linalg.sqrtm(sigma1.numpy() @ sigma2.numpy()).real
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * np.trace(root))


def frechet_torch(mu1, sigma1, mu2, sigma2):  # a tensor answer, via eigenvalues as torchmetrics does
    root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace


def test_frechet_distance_check(capsys):
    assert check_frechet_distance(frechet)
    assert check_frechet_distance(frechet_torch)
    elementwise = lambda m1, s1, m2, s2: float(  # noqa: E731
        (m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * torch.trace((s1 @ s2).abs().sqrt()))
    assert not check_frechet_distance(elementwise)
    assert "matrix square root" in capsys.readouterr().out
    not_squared = lambda m1, s1, m2, s2: frechet(m1, s1, m2, s2) - float((m1 - m2).square().sum() - (m1 - m2).norm())  # noqa: E731
    assert not check_frechet_distance(not_squared)
    assert "squared" in capsys.readouterr().out
    assert not check_frechet_distance(lambda *args: None)
    assert "not attempted" in capsys.readouterr().out


def clip_score(clip, images, prompts):
    with torch.no_grad():
        cosine = (clip.encode_image(images) * clip.encode_text(prompts)).sum(dim=-1)
    return 100 * cosine.clamp(min=0).mean().item()


def test_clip_score_check(capsys):
    assert check_clip_score(clip_score)
    assert not check_clip_score(lambda clip, images, prompts: clip_score(clip, images, prompts) / 100)
    assert "100" in capsys.readouterr().out
    unclamped = lambda clip, images, prompts: 100 * float(  # noqa: E731
        (clip.encode_image(images) * clip.encode_text(prompts)).sum(-1).mean())
    assert not check_clip_score(unclamped)
    assert "clamp" in capsys.readouterr().out
    assert not check_clip_score(lambda clip, images, prompts: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().out


def category_accuracy(scores):
    accuracy = {}
    for name in (*CATEGORIES, "faithful"):
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        accuracy[name] = sum(values) / len(values) if values else None
    return accuracy


def test_category_accuracy_check(capsys):
    assert check_category_accuracy(category_accuracy)
    over_all = lambda scores: {name: sum(bool(getattr(s, name)) for s in scores) / len(scores)  # noqa: E731
                               for name in (*CATEGORIES, "faithful")}
    assert not check_category_accuracy(over_all)
    assert "whose caption claims it" in capsys.readouterr().out
    assert not check_category_accuracy(lambda scores: {"faithful": 0.5})
    assert "missing keys" in capsys.readouterr().out
