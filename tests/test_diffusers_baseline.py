"""The diffusers U-Net baseline: same call as EfficientUNet, trains with the course's loss, saves in diffusers' format."""

from __future__ import annotations

import pytest
import torch

from mini_imagen.data import SceneConfig, SceneDataset
from mini_imagen.diffusers_baseline import DiffusersBaseUNet, baseline_imagen, load_baseline, save_baseline
from mini_imagen.imagen import ImagenConfig, StageConfig
from mini_imagen.text import load_text_encoder
from mini_imagen.unet import EfficientUNet, UNetConfig


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


def tiny() -> ImagenConfig:
    return ImagenConfig(stages=[StageConfig(unet=UNetConfig.tiny(image_size=16), prediction_type="v_prediction")])


def test_the_baseline_matches_the_efficient_unets_size_and_call():
    config = UNetConfig.tiny(image_size=16)
    baseline = DiffusersBaseUNet.like(config)
    ours = EfficientUNet(config).num_parameters()
    assert abs(baseline.num_parameters() - ours) / ours < 0.15  # matched width (tiny models match coarsely)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    tokens, mask, pooled = torch.randn(2, 32, 384), torch.ones(2, 32, dtype=torch.bool), torch.randn(2, 384)
    assert baseline(x, t, tokens, mask, pooled).shape == (2, 3, 16, 16)
    # drop_text swaps in the learned null text: the dropped row stops depending on its prompt
    drop = torch.tensor([False, True])
    a = baseline(x, t, tokens, mask, pooled, drop_text=drop)
    b = baseline(x, t, torch.randn_like(tokens), mask, torch.randn_like(pooled), drop_text=drop)
    assert torch.allclose(a[1], b[1]) and not torch.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="base-stage model"):
        baseline(x, t, tokens, mask, pooled, lowres_image=x)
    with pytest.raises(ValueError, match="base stage only"):
        DiffusersBaseUNet.like(UNetConfig.tiny(image_size=16, lowres_cond=True))


def test_it_learns_with_the_course_loss_and_round_trips_through_diffusers_format(encoder, tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    imagen = baseline_imagen(tiny(), text_encoder=encoder)
    scenes = SceneDataset(SceneConfig(resolution=16, seed=3), length=4)
    images = torch.stack([scenes[i]["image"] for i in range(4)])
    text = imagen.encode_text([scenes[i]["caption"] for i in range(4)])
    optimizer = torch.optim.AdamW(imagen.unets[0].parameters(), lr=5e-3)
    losses = []
    for step in range(40):  # overfit four scenes (same 4 noise draws in turn): the loss must fall well below its start
        generator = torch.Generator().manual_seed(step % 4)
        loss = imagen.stage_loss(0, imagen.unets[0], images, text, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4])

    folder = save_baseline(imagen, tmp_path / "baseline")
    plain = UNet2DConditionModel.from_pretrained(folder / "unet")  # a diffusers model folder, nothing else needed
    assert isinstance(plain, UNet2DConditionModel)
    loaded = load_baseline(folder, text_encoder=encoder)
    imagen.eval()
    kwargs = dict(steps=3, sampler="ddim", guidance_scale=2.0, seed=1, safety=False)
    torch.testing.assert_close(loaded.sample(["a red circle"], **kwargs).images,
                               imagen.sample(["a red circle"], **kwargs).images)
    with pytest.raises(FileNotFoundError, match="not a diffusers baseline folder"):
        load_baseline(tmp_path)
