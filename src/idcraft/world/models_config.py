"""The bundled world as a models configuration: what ``idcraft batch`` (and any reader of the models YAML)
runs on when no ``--config`` is given, as ``idcraft serve`` and ``idcraft eval`` do.

Each bundled adapter becomes one entry with the bundle's files, exactly as a user would write them in a
``models.yaml`` for real checkpoints: the miniature SD1.5 as ``base`` (one loaded base shared by the
entries, see :func:`idcraft.model_config.load_engines`), the CLIP-role image encoder, the world's face
analyser for FaceID and InstantID, IdentityNet as InstantID's ControlNet, and the world's sampling
defaults. A job that names no model runs on the first (``ip-adapter``), as a request to ``idcraft serve``
does.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import IdcraftError
from . import bundle
from .generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, available_methods


def world_models_config(bundle_root: str | os.PathLike | None = None, device: str = "auto"):
    """A :class:`~idcraft.model_config.ModelsConfig` serving every adapter of the bundle at ``bundle_root``
    (default: :func:`idcraft.world.bundle.bundle_dir`), labelled by method name, in float32."""
    from ..model_config import models_config_from_dict
    from ..registry import get_method

    root = Path(bundle_root) if bundle_root is not None else bundle.bundle_dir()
    methods = available_methods(root)
    if not methods:
        raise IdcraftError(
            f"no adapters in the world bundle at {root}: rebuild it with `idcraft world build`."
        )
    models = {}
    for name in methods:
        method = get_method(name)
        entry = {
            "base": str(bundle.bundle_path(bundle.SD, root)),
            "adapter": str(bundle.bundle_path(bundle.ADAPTERS[name], root)),
            "dtype": "float32",  # the world's models are small; they are trained and run in float32
            "defaults": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
        }
        if method.needs_image_encoder:
            entry["image_encoder"] = str(bundle.bundle_path(bundle.IMAGE_ENCODER, root))
        if method.identitynet:
            entry["controlnet"] = str(bundle.bundle_path(bundle.IDENTITYNET, root))
        models[name] = entry
    config = models_config_from_dict(
        {
            "models": models,
            "device": device,
            "face_backend": "world",
            "face_models": str(bundle.bundle_path(bundle.IDENTITY, root)),
        },
        where=f"the offline world ({root})",
    )
    config.default = methods[0]
    return config
