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

import importlib

#: Public names, and the module each lives in: imported when first used, so that reading and checking a
#: TrainConfig (``idcraft train``'s first step) does not load torch and diffusers.
_EXPORTS = {
    "TrainConfig": ".config",
    "StepInfo": ".loop",
    "Trainer": ".loop",
    "TrainResult": ".loop",
    "train": ".loop",
    "RECIPES": ".recipe",
    "TrainingRecipe": ".recipe",
    "recipe_for": ".recipe",
    "register_recipe": ".recipe",
}
#: The modules that register the built-in families' recipes.
RECIPE_MODULES = (
    ".faceid",
    ".infiniteyou",
    ".instantcharacter",
    ".instantid",
    ".ip_adapter",
    ".pulid",
    ".pulid_flux",
)


def register_builtin_recipes() -> None:
    for module in RECIPE_MODULES:
        importlib.import_module(module, __name__)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _EXPORTS[name] != ".config":
        register_builtin_recipes()
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


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
