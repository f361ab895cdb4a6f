"""Adapter training: ``idcraft train`` and :func:`train`.

A run is a :class:`TrainConfig` (defaults, then a YAML/JSON file, then flags); the generic loop
(:mod:`.loop`) drives a method-specific :class:`TrainingRecipe` (:mod:`.recipe`) found by method name.
The IP-Adapter family's recipe is :class:`~.ip_adapter.IPAdapterRecipe`, FaceID's
:class:`~.faceid.FaceIDRecipe`, InstantID's :class:`~.instantid.InstantIDRecipe`, InstantCharacter's
:class:`~.instantcharacter.InstantCharacterRecipe` (FLUX, flow matching); new families register
their own.

    from idcraft.training import TrainConfig, train

    result = train(TrainConfig(method="ip-adapter-plus", base="./sd15", image_encoder="./image_encoder",
                               data="./data.jsonl", output="./runs/plus", max_steps=10_000))
"""

from . import faceid as _faceid  # noqa: F401  (registers the FaceID family's recipe)
from . import instantcharacter as _instantcharacter  # noqa: F401  (registers InstantCharacter's recipe)
from . import instantid as _instantid  # noqa: F401  (registers InstantID's recipe)
from . import ip_adapter as _ip_adapter  # noqa: F401  (registers the IP-Adapter family's recipe)
from .config import TrainConfig
from .loop import StepInfo, Trainer, TrainResult, train
from .recipe import RECIPES, TrainingRecipe, recipe_for, register_recipe

__all__ = [
    "RECIPES",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingRecipe",
    "recipe_for",
    "register_recipe",
    "train",
]
