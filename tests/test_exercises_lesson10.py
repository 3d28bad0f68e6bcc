"""Lesson 10's self-checks: right answers pass, the usual mistakes fail with a hint, nothing raises."""

import pytest
import torch
from diffusers import DDIMScheduler

from mini_imagen.exercises.lesson10 import check_ddim_scheduler, check_denoise, check_unet_call

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def unet_call(unet, x_t, t, text):
    return unet(x_t, t, encoder_hidden_states=text.tokens, encoder_attention_mask=text.mask,
                class_labels=text.pooled).sample


def test_unet_call_check(capsys):
    assert check_unet_call(unet_call)
    assert not check_unet_call(lambda unet, x_t, t, text: unet(x_t, t, encoder_hidden_states=text.tokens,
                                                               class_labels=text.pooled).sample)
    assert "encoder_attention_mask" in capsys.readouterr().out
    assert not check_unet_call(lambda unet, x_t, t, text: unet(x_t, t, encoder_hidden_states=text.tokens))
    assert "class_labels=text.pooled" in capsys.readouterr().out
    assert not check_unet_call(lambda unet, x_t, t, text: unet(x_t, t, encoder_hidden_states=text.tokens,
                                                               encoder_attention_mask=text.mask,
                                                               class_labels=text.pooled))
    assert ".sample" in capsys.readouterr().out
    assert not check_unet_call(lambda *args: None)
    assert "not attempted" in capsys.readouterr().out


def ddim_scheduler(imagen):
    stage, schedule = imagen.config.stages[0], imagen.schedules[0]
    names = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear"}
    return DDIMScheduler(num_train_timesteps=stage.num_train_timesteps, beta_schedule=names[schedule.beta_schedule],
                         beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                         prediction_type=stage.prediction_type, thresholding=True, dynamic_thresholding_ratio=0.995,
                         sample_max_value=float("inf"))


def test_ddim_scheduler_check(capsys):
    assert check_ddim_scheduler(ddim_scheduler)
    assert "right" in capsys.readouterr().out

    def capped(imagen):
        scheduler = ddim_scheduler(imagen)
        return DDIMScheduler.from_config(scheduler.config, sample_max_value=1.0)

    assert not check_ddim_scheduler(capped)
    assert "pitfall" in capsys.readouterr().out
    cosine_by_our_name = lambda imagen: DDIMScheduler(beta_schedule=imagen.schedules[0].beta_schedule)  # noqa: E731
    assert not check_ddim_scheduler(cosine_by_our_name)
    assert "squaredcos_cap_v2" in capsys.readouterr().out
    hard_coded = lambda imagen: DDIMScheduler.from_config(  # noqa: E731
        ddim_scheduler(imagen).config, prediction_type="v_prediction")
    assert not check_ddim_scheduler(hard_coded)
    assert "reads its output as 'v_prediction'" in capsys.readouterr().out
    unthresholded = lambda imagen: DDIMScheduler.from_config(ddim_scheduler(imagen).config,  # noqa: E731
                                                             thresholding=False)
    assert not check_ddim_scheduler(unthresholded)
    assert "thresholding=True" in capsys.readouterr().out
    assert not check_ddim_scheduler(lambda imagen: DDIMScheduler())
    assert "squaredcos_cap_v2" in capsys.readouterr().out
    assert not check_ddim_scheduler(lambda imagen: None)
    assert "not attempted" in capsys.readouterr().out


def denoise(unet, scheduler, text, guidance_scale, num_inference_steps, generator):
    size = unet.config.image_size
    x = torch.randn((len(text), 3, size, size), generator=generator) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps)
    null = torch.ones(len(text), dtype=torch.bool)
    for t in scheduler.timesteps:
        cond = unet(x, t, text.tokens, text.mask, text.pooled)
        uncond = unet(x, t, text.tokens, text.mask, text.pooled, drop_text=null)
        x = scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
    return x


def test_denoise_check(capsys):
    assert check_denoise(denoise)

    def unguided(unet, scheduler, text, guidance_scale, steps, generator):
        return denoise(unet, scheduler, text, 1.0, steps, generator)

    assert not check_denoise(unguided)
    assert "conditional prediction alone" in capsys.readouterr().out

    def unseeded(unet, scheduler, text, guidance_scale, steps, generator):
        return denoise(unet, scheduler, text, guidance_scale, steps, None)

    assert not check_denoise(unseeded)
    assert "generator" in capsys.readouterr().out

    def backwards(unet, scheduler, text, guidance_scale, steps, generator):
        return denoise(unet, scheduler, text, 1 - guidance_scale, steps, generator)

    assert not check_denoise(backwards)
    assert "wrong way" in capsys.readouterr().out
    assert not check_denoise(lambda *args: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::mini_imagen.safety.SafetyCheckDisabledWarning")
def test_the_denoise_reference_is_the_pipelines_loop():
    from mini_imagen.exercises.lesson10 import _reference_denoise
    from mini_imagen.pipeline import MiniImagenPipeline, MiniImagenUNet, make_scheduler
    from mini_imagen.schedule import NoiseSchedule
    from mini_imagen.text import TextEmbeddings
    from mini_imagen.unet import EfficientUNet, UNetConfig

    torch.manual_seed(0)
    unet = EfficientUNet(UNetConfig.tiny(image_size=16)).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    text = TextEmbeddings(torch.randn(2, 8, 384), torch.ones(2, 8, dtype=torch.bool), torch.randn(2, 384))
    scheduler = make_scheduler("dpm++2m", NoiseSchedule(beta_schedule="cosine"), "v_prediction", "dynamic")
    pipe = MiniImagenPipeline(unet=MiniImagenUNet.from_efficient_unet(unet), scheduler=scheduler,
                              requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe.denoise(pipe.unet, scheduler, text, 4, 3.0, torch.Generator().manual_seed(1))
        ours = _reference_denoise(unet, type(scheduler).from_config(scheduler.config), text, 3.0, 4,
                                  torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
