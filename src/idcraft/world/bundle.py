"""Where the world's trained models live: one folder, laid out like real checkpoints.

The models that ship with idcraft were trained by ``idcraft world build`` (its record of
commands, seeds and wall times is ``BUILD.json`` in the folder). Each is stored in the format its real
counterpart uses, so the same loaders read both::

    sd/                     a diffusers StableDiffusionPipeline folder (vae, text_encoder, tokenizer,
                            unet, scheduler) -- the miniature SD1.5
    image_encoder/          CLIPVisionModelWithProjection (the CLIP role, trained contrastively)
    identity/               the world's face analyser: detector + recogniser (the ArcFace role)
    judge/                  attribute classifiers that only score outputs; no model trains against them
    adapters/ip-adapter_world.safetensors         official IP-Adapter layout
    adapters/ip-adapter-plus_world.safetensors    official IP-Adapter-Plus layout
    adapters/ip-adapter-faceid_world.safetensors  official FaceID layout (adapter + LoRA)
    adapters/instantid/ip-adapter.safetensors     official InstantID adapter layout
    adapters/instantid/ControlNetModel/           IdentityNet, a diffusers ControlNet folder

``IDCRAFT_WORLD_BUNDLE`` points idcraft at another such folder (a rebuilt one, say).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import IdcraftError

ENV = "IDCRAFT_WORLD_BUNDLE"
PACKAGED = Path(__file__).resolve().parent / "bundle"

SD = "sd"
IMAGE_ENCODER = "image_encoder"
IDENTITY = "identity"
JUDGE = "judge"
ADAPTERS = {
    "ip-adapter": "adapters/ip-adapter_world.safetensors",
    "ip-adapter-plus": "adapters/ip-adapter-plus_world.safetensors",
    "faceid": "adapters/ip-adapter-faceid_world.safetensors",
    "instantid": "adapters/instantid/ip-adapter.safetensors",
}
IDENTITYNET = "adapters/instantid/ControlNetModel"
BUILD_RECORD = "BUILD.json"


def bundle_dir() -> Path:
    """The bundle in use: ``$IDCRAFT_WORLD_BUNDLE`` if set, else the one shipped in the package."""
    return Path(os.environ[ENV]).expanduser() if os.environ.get(ENV) else PACKAGED


def bundle_path(relative: str, root: str | os.PathLike | None = None) -> Path:
    """``root / relative`` (``root`` defaults to :func:`bundle_dir`), or a clear error when it is missing."""
    base = Path(root) if root is not None else bundle_dir()
    path = base / relative
    if not path.exists():
        raise IdcraftError(
            f"{path}: not in the world bundle at {base}. The bundle ships with idcraft; rebuild it with "
            f"`idcraft world build --output DIR` and point {ENV}=DIR at the result."
        )
    return path
