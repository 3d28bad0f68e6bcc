"""mini-imagen: Imagen-style text-to-image diffusion, built by hand to be read.

prompt -> frozen text encoder -> base U-Net (32 px) -> super-resolution U-Net (64 px)
-> safety check -> image.  Saharia et al., 2022, "Photorealistic Text-to-Image
Diffusion Models with Deep Language Understanding".
"""

__version__ = "0.1.0"

from mini_imagen.runtime import is_smoke_mode, pick_device, seed_everything, smoke

__all__ = ["__version__", "is_smoke_mode", "pick_device", "seed_everything", "smoke"]
