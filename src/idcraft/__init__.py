"""idcraft: zero-shot identity- and character-preserving image generation."""

from .errors import CheckpointError, IdcraftError, ImageError, IncompatibleAdapterError, ModelLoadError
from .images import load_image

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "IdcraftError",
    "ImageError",
    "IncompatibleAdapterError",
    "ModelLoadError",
    "load_image",
    "__version__",
]
