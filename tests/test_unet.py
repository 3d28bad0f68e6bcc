"""The Efficient U-Net: shapes, text conditioning and its mask, the CFG null text, the
super-resolution inputs, clear errors, and that it can learn (overfit one batch)."""

import pytest
import torch
import torch.nn.functional as F

from mini_imagen.unet import EfficientUNet, UNetConfig

TEXT_LEN, TEXT_DIM = 8, 384


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread is faster than two, and on a busy machine far faster
    (two threads that wait on each other can slow a step down tenfold)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(config: UNetConfig, seed: int = 0) -> EfficientUNet:
    """A U-Net whose zero-initialised layers (the last conv of every residual branch, the output conv)
    get small random weights, as after some training, so that every input can reach the output."""
    torch.manual_seed(seed)
    model = EfficientUNet(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return model


def make_text(batch: int, seed: int, length: int = TEXT_LEN) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, length // 2 :] = False  # the second half is padding
    return {
        "text_tokens": torch.randn(batch, length, TEXT_DIM, generator=generator),
        "text_mask": mask,
        "text_pooled": torch.randn(batch, TEXT_DIM, generator=generator),
    }


def run(model: EfficientUNet, x: torch.Tensor, text: dict, t: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    t = torch.full((x.shape[0],), 500) if t is None else t
    with torch.no_grad():
        return model(x, t, **text, **kwargs)


@pytest.mark.parametrize(
    "config, lowres_size",
    [
        (UNetConfig.tiny(), None),
        (UNetConfig.tiny(image_size=16), None),
        (UNetConfig.tiny(image_size=64, lowres_cond=True), 32),
        (UNetConfig.tiny(in_channels=1, out_channels=2), None),  # e.g. grey-scale in, mean + variance out
        (UNetConfig.tiny(channel_mults=(1, 2), num_res_blocks=(1, 1), attention_resolutions=(),
                         cross_attention_resolutions=(16,)), None),  # two levels, text at 16 px
    ],
)
def test_output_has_the_input_size_and_out_channels(config, lowres_size):
    model = make_model(config)
    size = config.image_size
    x = torch.randn(2, config.in_channels, size, size)
    extra = {}
    if lowres_size:
        extra = {"lowres_image": torch.randn(2, config.in_channels, lowres_size, lowres_size),
                 "lowres_noise_level": torch.tensor([0, 250])}
    out = run(model, x, make_text(2, seed=0), **extra)
    assert out.shape == (2, config.out_channels, size, size)
    assert torch.isfinite(out).all()


def test_fully_convolutional_runs_at_another_divisible_size():
    model = make_model(UNetConfig.tiny(image_size=32))
    assert run(model, torch.randn(1, 3, 48, 48), make_text(1, seed=0)).shape == (1, 3, 48, 48)


def test_text_conditions_the_output():
    model, x = make_model(UNetConfig.tiny()), torch.randn(2, 3, 32, 32)
    assert not torch.allclose(run(model, x, make_text(2, seed=0)), run(model, x, make_text(2, seed=1)), atol=1e-4)


def test_masked_out_tokens_do_not_change_the_output():
    model, x = make_model(UNetConfig.tiny()), torch.randn(2, 3, 32, 32)
    text = make_text(2, seed=0)
    changed = dict(text, text_tokens=text["text_tokens"].clone())
    changed["text_tokens"][~text["text_mask"]] = 100.0  # only the padding positions
    assert torch.allclose(run(model, x, text), run(model, x, changed), atol=1e-5)
    # ...while changing a real token does change it.
    changed["text_tokens"][:, 0] = -changed["text_tokens"][:, 0]
    assert not torch.allclose(run(model, x, text), run(model, x, changed), atol=1e-4)


def test_a_row_with_every_token_masked_out_stays_finite():
    model, text = make_model(UNetConfig.tiny()), make_text(2, seed=0)
    text["text_mask"][0] = False
    assert torch.isfinite(run(model, torch.randn(2, 3, 32, 32), text)).all()


def test_drop_text_replaces_the_text_by_the_null_embedding():
    model, x = make_model(UNetConfig.tiny()), torch.randn(3, 3, 32, 32)
    text_a, text_b = make_text(3, seed=0), make_text(3, seed=1)
    text_b["text_mask"][:, -1] = True  # also a different mask
    all_dropped = torch.ones(3, dtype=torch.bool)
    assert torch.equal(run(model, x, text_a, drop_text=all_dropped), run(model, x, text_b, drop_text=all_dropped))

    none_dropped = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(run(model, x, text_a, drop_text=none_dropped), run(model, x, text_a))

    first_dropped = torch.tensor([True, False, False])
    mixed_a, mixed_b = run(model, x, text_a, drop_text=first_dropped), run(model, x, text_b, drop_text=first_dropped)
    assert torch.allclose(mixed_a[0], mixed_b[0], atol=1e-6)
    assert not torch.allclose(mixed_a[1:], mixed_b[1:], atol=1e-4)


def test_null_text_is_a_learned_parameter_that_receives_gradient():
    model = make_model(UNetConfig.tiny()).train()
    names = {name for name, _ in model.named_parameters()}
    assert {"null_text_tokens", "null_text_pooled"} <= names
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), **make_text(2, seed=0),
                drop_text=torch.tensor([True, False]))
    out.square().mean().backward()
    for parameter in (model.null_text_tokens, model.null_text_pooled):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    # Only the tokens the null row can attend to (the first TEXT_LEN of max_text_len) are used.
    assert model.null_text_tokens.grad[TEXT_LEN:].abs().sum() == 0


def test_timestep_changes_the_output_and_may_be_int_float_or_scalar():
    model, x, text = make_model(UNetConfig.tiny()), torch.randn(2, 3, 32, 32), make_text(2, seed=0)
    out = run(model, x, text, t=torch.tensor([500, 500]))
    assert torch.allclose(out, run(model, x, text, t=torch.tensor([500.0, 500.0])))
    assert torch.allclose(out, run(model, x, text, t=torch.tensor(500)))
    assert not torch.allclose(out, run(model, x, text, t=torch.tensor([20, 20])), atol=1e-4)


def test_super_resolution_uses_the_lowres_image_and_its_noise_level():
    model = make_model(UNetConfig.tiny(image_size=64, lowres_cond=True))
    x, text = torch.randn(2, 3, 64, 64), make_text(2, seed=0)
    lowres, level = torch.randn(2, 3, 32, 32), torch.tensor([100, 100])
    out = run(model, x, text, lowres_image=lowres, lowres_noise_level=level)
    assert not torch.allclose(out, run(model, x, text, lowres_image=lowres + 0.5, lowres_noise_level=level), atol=1e-4)
    assert not torch.allclose(out, run(model, x, text, lowres_image=lowres, lowres_noise_level=level + 300), atol=1e-4)
    # The low-res image is up-sampled (bilinear) to the output size, so passing it pre-up-sampled is the same.
    upsampled = F.interpolate(lowres, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(out, run(model, x, text, lowres_image=upsampled, lowres_noise_level=level), atol=1e-5)
    # No level means a clean low-res image: level 0.
    assert torch.allclose(run(model, x, text, lowres_image=lowres),
                          run(model, x, text, lowres_image=lowres, lowres_noise_level=torch.tensor([0, 0])))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x": torch.randn(2, 4, 32, 32)}, r"x_t must be \(B, 3, H, W\)"),
        ({"x": torch.randn(2, 3, 30, 30)}, "must be divisible by 4"),
        ({"text_tokens": torch.randn(2, TEXT_LEN, 512)}, "text_embed_dim=384"),
        ({"text_tokens": torch.randn(2, 40, TEXT_DIM), "text_mask": torch.ones(2, 40, dtype=torch.bool)},
         "more than max_text_len=32"),
        ({"text_mask": torch.ones(2, TEXT_LEN)}, "text_mask must be a bool tensor"),
        ({"text_pooled": torch.randn(2, 512)}, "text_pooled must be"),
        ({"t": torch.zeros(3)}, r"t must be a scalar or have shape \(B,\)"),
        ({"drop_text": torch.zeros(2)}, "drop_text must be a \\(B,\\) bool tensor"),
        ({"lowres_image": torch.randn(2, 3, 16, 16)}, "is a base model"),
        ({"lowres_noise_level": torch.zeros(2)}, "is a base model"),
    ],
)
def test_bad_input_is_a_clear_value_error(change, message):
    model = make_model(UNetConfig.tiny())
    inputs = dict(x=torch.randn(2, 3, 32, 32), t=torch.zeros(2), **make_text(2, seed=0))
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        model(inputs.pop("x"), inputs.pop("t"), **inputs)


def test_super_resolution_without_its_lowres_image_is_a_clear_value_error():
    model = make_model(UNetConfig.tiny(image_size=64, lowres_cond=True))
    with pytest.raises(ValueError, match="super-resolution U-Net .* pass lowres_image"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1), **make_text(1, seed=0))
    with pytest.raises(ValueError, match="lowres_image must be"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1), **make_text(1, seed=0), lowres_image=torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_res_blocks": (1, 2)}, "one entry per level"),
        ({"image_size": 30}, "must be divisible by 4"),
        ({"attention_resolutions": (4,)}, r"not feature-map sizes; choose from \(32, 16, 8\)"),
        ({"num_heads": 3}, "not divisible by num_heads=3"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_config_is_a_clear_value_error(fields, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**fields)


def test_presets_and_json_lists():
    assert 2e6 < EfficientUNet(UNetConfig.base32()).num_parameters() < 4e6
    sr = UNetConfig.sr64()
    assert sr.lowres_cond and sr.image_size == 64 and sr.attention_resolutions == ()
    assert UNetConfig(channel_mults=[1, 2, 4], num_res_blocks=[1, 2, 3]).channel_mults == (1, 2, 4)  # from JSON
    assert UNetConfig.tiny(image_size=64).level_sizes == (64, 32, 16)


def test_a_tiny_unet_overfits_one_batch_with_the_epsilon_loss():
    # A 5-line linear noise schedule (DDPM): $\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)$.
    betas = torch.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([50, 300, 600, 900])
    a_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
    # $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$ (DDPM eq. 4)
    x_t = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * noise
    text = make_text(4, seed=0)

    torch.manual_seed(0)
    model = EfficientUNet(UNetConfig.tiny(image_size=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x_t, t, **text), noise)  # the epsilon loss $\|\epsilon - \epsilon_\theta(x_t, t)\|^2$
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
