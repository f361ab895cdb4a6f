"""What a method's training is, as one object the generic loop drives.

The loop (:mod:`idcraft.training.loop`) knows nothing about adapters, encoders or objectives. A
:class:`TrainingRecipe` tells it, for one method family:

* which modules exist and which of them train (:meth:`build`, :meth:`trainable_parameters`,
  :attr:`model` = the module handed to ``accelerator.prepare``, whose forward runs the denoiser so that
  DDP/FSDP see it);
* how a reference image becomes encoder input in a data worker (:meth:`reference_preprocessor`) and
  features on the device (:meth:`encode_references`; cacheable when :meth:`cache_fingerprint` says so);
* how a batch becomes conditioning and a loss (:meth:`loss`, given a seeded generator it must draw all
  its randomness from, so that runs are reproducible and resumable bit for bit);
* what the trained result is on disk (:meth:`export`) and how to preview it (:meth:`sample`).

New families plug in by subclassing and registering, without touching the loop:

* FaceID: an IP-Adapter recipe whose references go through a face-recognition model, plus LoRA
  parameters on the UNet's attention layers in :meth:`trainable_parameters`;
* InstantID: adds a ControlNet to :attr:`model` (trainable) fed with face keypoints from the batch;
* InstantCharacter: a FLUX transformer with a flow-matching :meth:`loss` instead of
  :class:`~idcraft.training.diffusion.UNetDiffusionRecipe`'s noise prediction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import nn

from ..errors import IdcraftError
from .config import TrainConfig

ReferencePreprocessor = Callable[[Image.Image], dict[str, torch.Tensor]]


class TrainingRecipe(ABC):
    """The method-specific part of a training run (see the module docstring)."""

    #: ``--method`` names this recipe trains (canonical names from :mod:`idcraft.registry`).
    methods: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TrainConfig):
        self.config = config
        self.model: nn.Module | None = None

    # ------------------------------------------------------------------ modules
    @abstractmethod
    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Load the frozen parts in ``weight_dtype`` on ``device``, create the trainable ones (in float32:
        they are the optimizer's master weights) and set :attr:`model`. The global RNG is seeded before
        this is called, so fresh initialisations are reproducible."""

    @property
    @abstractmethod
    def resolution(self) -> int:
        """Training image size after :meth:`build` (the config's, or the base model's native size)."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters the optimizer updates."""

    @abstractmethod
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Every frozen module by name (tests check that their weights never change)."""

    @abstractmethod
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, as saved in training checkpoints (exact dtypes, for bit-exact resume)."""

    @abstractmethod
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy checkpointed tensors into the existing parameters (in place: the optimizer keeps them)."""

    # ------------------------------------------------------------------ data
    @abstractmethod
    def reference_preprocessor(self) -> ReferencePreprocessor:
        """A picklable callable run in data workers: reference image -> named CPU tensors."""

    @abstractmethod
    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batched preprocessor output -> frozen-encoder features ``[B, ...]`` (no gradient)."""

    def cache_fingerprint(self) -> dict | None:
        """What the cached features depend on (encoder, feature kind, dtype); ``None`` = not cacheable."""
        return None

    # ------------------------------------------------------------------ objective
    @abstractmethod
    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The scalar training loss of ``batch`` through ``model`` (the prepared :attr:`model`).

        ``batch`` holds the collated sample tensors (``pixels``, ``caption``, ``original_size``,
        ``crop_top_left``, and either the preprocessor's tensors or cached ``features``). All randomness
        (drops, noise, timesteps, latent sampling) must come from ``generator``, a CPU generator whose
        state is checkpointed."""

    # ------------------------------------------------------------------ results
    @abstractmethod
    def export(self, directory: Path, formats: Sequence[str], metadata: dict[str, str]) -> list[Path]:
        """Write the trained result in its official layout; returns the files written."""

    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Preview images with the current weights; must not disturb training state."""
        raise IdcraftError(f"{type(self).__name__} cannot make sample images.")


RECIPES: dict[str, type[TrainingRecipe]] = {}


def register_recipe(cls: type[TrainingRecipe]) -> type[TrainingRecipe]:
    """Class decorator: make ``cls`` the recipe for each of its :attr:`~TrainingRecipe.methods`."""
    for method in cls.methods:
        RECIPES[method] = cls
    return cls


def canonical_method(name: str) -> str:
    """Registry name for ``name`` (aliases and official file stems work); unknown names pass through so
    recipes for methods outside the generation registry can still register."""
    from ..registry import get_method

    try:
        return get_method(name).name
    except IdcraftError:
        return name.lower()


def recipe_for(method: str) -> type[TrainingRecipe]:
    """The recipe class that trains ``method``."""
    name = canonical_method(method)
    if name not in RECIPES:
        raise IdcraftError(
            f"training is not available for method {method!r}; "
            f"trainable methods: {', '.join(sorted(RECIPES))}."
        )
    return RECIPES[name]
