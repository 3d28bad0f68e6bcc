"""Domain FID / KID: the shipped feature network ranks image sets sensibly, and the numbers match the formulas."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

from mini_imagen.data import SceneConfig, SceneDataset, render_scene
from mini_imagen.evaluation.features import (
    CONFIG_FILE,
    EVAL_WEIGHTS_DIR,
    FEATURES_FILE,
    DomainFeatureNet,
    SceneEncoderConfig,
    domain_fid,
    domain_kid,
    load_domain_feature_net,
    scene_labels,
)
from mini_imagen.evaluation.train_eval_models import distorted_sets

N = 256  # images per set: enough for a stable ranking, small enough to be fast


@pytest.fixture(scope="module")
def net() -> DomainFeatureNet:
    return load_domain_feature_net()


@pytest.fixture(scope="module")
def scenes():
    dataset = SceneDataset(SceneConfig(resolution=32, seed=4242), length=2 * N)  # a seed training never used
    return [dataset.scene(i) for i in range(2 * N)]


@pytest.fixture(scope="module")
def real(scenes) -> torch.Tensor:
    return torch.stack([render_scene(s, 32) for s in scenes[:N]])


@pytest.fixture(scope="module")
def other(scenes) -> torch.Tensor:
    """An independent draw of the same distribution."""
    return torch.stack([render_scene(s, 32) for s in scenes[N:]])


@pytest.fixture(scope="module")
def fids(net, real, other) -> dict[str, float]:
    sets = {"same distribution": other} | distorted_sets(other)
    return {name: domain_fid(real, fake, net) for name, fake in sets.items()}


def test_fid_is_small_for_the_same_distribution_and_large_for_noise_and_blank(fids):
    """FID is biased upwards at small N (here 256 images, 128-d features), so "small" is relative."""
    same = fids["same distribution"]
    assert same < 0.5 * fids["blur sigma=1"]
    assert same < 0.1 * fids["gaussian noise"] and same < 0.1 * fids["blank (all black)"]


def test_fid_grows_with_the_distortion(fids):
    for milder, harsher in [("same distribution", "blur sigma=1"), ("blur sigma=0.5", "blur sigma=1"),
                            ("blur sigma=1", "gaussian noise"), ("same distribution", "colour shift (RGB -> GBR)"),
                            ("colour shift (RGB -> GBR)", "blank (all black)")]:
        assert fids[milder] < fids[harsher], (milder, harsher, fids)


def test_kid_is_about_zero_for_the_same_distribution_and_grows_with_the_distortion(net, real, other):
    sets = {"same distribution": other} | distorted_sets(other)
    del sets["blank (all black)"]  # the FID test covers it
    kid = {name: domain_kid(real, fake, net, subsets=20, subset_size=128) for name, fake in sets.items()}
    same_mean, same_std = kid["same distribution"]
    assert abs(same_mean) < 3 * same_std + 0.01 * kid["blur sigma=1"][0]  # unbiased: zero within its noise
    order = ["same distribution", "blur sigma=0.5", "blur sigma=1", "gaussian noise"]
    means = [kid[name][0] for name in order]
    assert means == sorted(means), dict(zip(order, means))
    assert kid["colour shift (RGB -> GBR)"][0] > 10 * abs(same_mean)


def test_64px_images_are_measured_on_the_32px_grid(net, real, scenes):
    big = torch.stack([render_scene(s, 64) for s in scenes[:64]])
    small = real[:64]
    assert torch.allclose(net(big), net(small), atol=0.35 * net(small).std().item())  # box filter ~ the renderer
    assert domain_fid(small, big, net) < 0.1 * domain_fid(small, torch.full_like(small, -1.0), net)


def test_domain_fid_matches_the_frechet_formula(net, real, other):
    r"""torchmetrics' FID with our network == $|\mu_r-\mu_g|^2 + Tr(\Sigma_r+\Sigma_g-2(\Sigma_r\Sigma_g)^{1/2})$."""
    with torch.no_grad():
        f_real, f_fake = net(real).double().numpy(), net(other).double().numpy()
    mu_r, mu_g = f_real.mean(0), f_fake.mean(0)
    sigma_r, sigma_g = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_r @ sigma_g).real
    expected = ((mu_r - mu_g) ** 2).sum() + np.trace(sigma_r + sigma_g - 2 * root)
    assert domain_fid(real, other, net) == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_domain_kid_matches_the_unbiased_mmd_formula(net, real, other):
    """With one subset of every image, KID is the unbiased MMD^2 under $k(x, y) = (x^T y / d + 1)^3$."""
    with torch.no_grad():
        x, y = net(real[:100]).double(), net(other[:100]).double()
    d, m = x.shape[1], len(x)
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    expected = ((k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1)) - 2 * k_xy.mean()).item()
    mean, std = domain_kid(real[:100], other[:100], net, subsets=1, subset_size=100)
    assert mean == pytest.approx(expected, rel=1e-3, abs=1e-5) and std == 0.0


def test_kid_is_reproducible_and_leaves_the_global_rng_alone(net, real, other):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = domain_kid(real[:64], other[:64], net, subsets=5, subset_size=32, seed=7)
    assert torch.rand(1) == before
    assert domain_kid(real[:64], other[:64], net, subsets=5, subset_size=32, seed=7) == first


def test_the_classifier_reads_the_scenes(net, scenes, real):
    """The features are meaningful: the heads recover count and colour-shape pairs of unseen scenes."""
    with torch.no_grad():
        logits = net.classify(real)
    labels = scene_labels(scenes[:N])
    assert (logits["count"].argmax(1) == labels["count"]).float().mean() > 0.9
    assert ((logits["pairs"] > 0) == labels["pairs"].bool()).float().mean() > 0.99  # per label
    assert ((logits["pairs"] > 0) == labels["pairs"].bool()).all(1).float().mean() > 0.8  # whole scene


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    scenes = [SceneDataset(SceneConfig(resolution=32), length=16).scene(i) for i in range(16)]
    images = torch.stack([render_scene(s, 32) for s in scenes])
    model = DomainFeatureNet(SceneEncoderConfig(width=8, feature_dim=32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model.loss(images, scenes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_torchmetrics_reads_the_feature_size(net):
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=net)
    assert fid.real_features_sum.shape == (net.num_features,) == (128,)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 1, 32, 32), r"\(N, 3, H, W\)"),
    (torch.zeros(3, 32, 32), r"\(N, 3, H, W\)"),
    (torch.full((4, 3, 32, 32), 200.0), r"in \[-1, 1\]"),
    (torch.zeros(1, 3, 32, 32), "at least 2"),
])
def test_bad_images_fail_clearly(net, real, bad, message):
    with pytest.raises(ValueError, match=message):
        domain_fid(real[:8], bad, net)


def test_uint8_images_are_accepted(net, real):
    as_bytes = ((real[:8] + 1) * 127.5).round().to(torch.uint8)
    assert torch.allclose(net(as_bytes), net(real[:8]), atol=1e-2)


def test_missing_or_corrupt_weights_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_eval_models"):
        load_domain_feature_net(tmp_path)
    shutil.copy(EVAL_WEIGHTS_DIR / CONFIG_FILE, tmp_path / CONFIG_FILE)
    (tmp_path / FEATURES_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable"):
        load_domain_feature_net(tmp_path)


def test_the_training_script_writes_weights_that_load(tmp_path):
    """Three steps of the real script: float16 weights, config and training record, read back by the loader."""
    from mini_imagen.evaluation.train_eval_models import EvalTrainConfig, train_and_ship

    config = EvalTrainConfig(feature_steps=3, batch_size=8, eval_scenes=32)
    record = train_and_ship("domain_features", config, tmp_path)
    assert record["steps"] == 3 and set(record["measured"]["fid"]) >= {"gaussian noise", "blank (all black)"}
    net = load_domain_feature_net(tmp_path)
    assert not net.training and net(torch.zeros(2, 3, 64, 64)).shape == (2, 128)
