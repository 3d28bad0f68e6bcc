"""mini-imagen: Imagen-style text-to-image diffusion, built by hand to be read.

prompt -> frozen text encoder -> base U-Net (32 px) -> super-resolution U-Net (64 px)
-> safety check -> image.  Saharia et al., 2022, "Photorealistic Text-to-Image
Diffusion Models with Deep Language Understanding".

The modules, in the order the data flows (each one concept, each readable in one sitting):
``runtime`` (smoke mode, devices), ``data`` (captioned scenes), ``text`` (frozen encoder),
``schedule`` (forward process, loss), ``guidance`` (CFG, thresholding), ``samplers``
(DDPM, DDIM, DPM-Solver++), ``unet`` (Efficient U-Net), ``imagen`` (the cascade),
``checkpoint`` / ``train`` (the trainer), ``recipes`` (presets), ``generate`` / ``cli``.
"""

__version__ = "0.1.0"

from mini_imagen.runtime import is_smoke_mode, pick_device, seed_everything, smoke
# Everything else loads on first use (PEP 562), so `import mini_imagen` and `mini-imagen --help`
# stay fast: `mini_imagen.Imagen` imports mini_imagen.imagen the first time it is touched.
_LAZY = {
    "data": ["SceneConfig", "SceneDataset", "collate_scenes", "make_scenes"],
    "text": ["FrozenTextEncoder", "TextEmbeddings", "TextEncoderUnavailableError", "load_text_encoder"],
    "schedule": ["NoiseSchedule", "diffusion_loss"],
    "guidance": ["apply_thresholding", "classifier_free_guidance", "dynamic_threshold"],
    "samplers": ["DDIMSampler", "DDPMSampler", "DPMSolverPP2MSampler", "make_sampler", "run_sampler"],
    "unet": ["EfficientUNet", "UNetConfig"],
    "imagen": ["Imagen", "ImagenConfig", "StageConfig"],
    "checkpoint": ["CheckpointError"],
    "train": ["NonFiniteLossError", "TrainConfig", "Trainer"],
    "safety": ["ImageSafetyChecker", "PromptChecker", "SafetyRefusal", "load_concepts", "normalize_prompt"],
    "evaluation": ["EvaluationReport", "SceneScore", "evaluate", "find_objects", "format_report", "score_image",
                   "score_images", "domain_fid", "domain_kid", "load_mini_clip"],
    "prompts": ["EvalPrompt", "load_prompts"],
    "pipeline": ["MiniImagenPipeline", "MiniImagenUNet", "make_scheduler", "diffusers_thresholding"],
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(f"mini_imagen.{_WHERE[name]}"), name)
        globals()[name] = value  # cache: later lookups skip this function
        return value
    raise AttributeError(f"module 'mini_imagen' has no attribute '{name}'")


__all__ = ["__version__", "is_smoke_mode", "pick_device", "seed_everything", "smoke", *_WHERE]
