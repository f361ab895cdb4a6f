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

Under FSDP or DeepSpeed the live trainable modules hold shards (or half-precision copies), so the loop
gathers the full trainable tensors itself and hands them to :meth:`export` as ``state``; a recipe whose
:meth:`export` takes that argument can train sharded. The tensors of :meth:`trainable_state_dict` are
found in the prepared model's state by identity (:func:`model_state_keys`), so no recipe has to spell
out its model's key names.

New families plug in by subclassing and registering, without touching the loop:

* FaceID: an IP-Adapter recipe whose references go through a face-recognition model, plus LoRA
  parameters on the UNet's attention layers in :meth:`trainable_parameters`;
* InstantID: adds a ControlNet to :attr:`model` (trainable) fed with face keypoints from the batch;
* InstantCharacter: a FLUX transformer with a flow-matching :meth:`loss` instead of
  :class:`~idcraft.training.diffusion.UNetDiffusionRecipe`'s noise prediction.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import nn

from ..checkpoints import AdapterCheckpoint, save_checkpoint
from ..errors import IdcraftError
from .config import TrainConfig

ReferencePreprocessor = Callable[[Image.Image], dict[str, torch.Tensor]]

#: ``--export-dtype`` -> torch dtype of the floating-point tensors in the written files.
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ``--format`` -> file suffix of the official adapter file.
SUFFIXES = {"safetensors": ".safetensors", "bin": ".bin"}


class TrainingRecipe(ABC):
    """The method-specific part of a training run (see the module docstring)."""

    #: ``--method`` names this recipe trains (canonical names from :mod:`idcraft.registry`).
    methods: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TrainConfig):
        self.config = config
        self.model: nn.Module | None = None

    def check_extra(self, known) -> None:
        """Refuse ``extra`` settings this recipe does not read (a misspelt one would silently do nothing)."""
        unknown = sorted(set(self.config.extra) - set(known))
        if unknown:
            raise IdcraftError(
                f"{self.methods[0]} training: unknown extra setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(known)}."
            )

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

    def trained_modules(self) -> dict[str, nn.Module]:
        """The modules that train, by the key prefix their tensors get in :meth:`trainable_state_dict`
        (``""``: none, for a single module). Default: ``self.adapter`` alone."""
        return {"": self.adapter}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters the optimizer updates (default: those of :meth:`trained_modules`)."""
        return [p for module in self.trained_modules().values() for p in module.parameters()]

    @abstractmethod
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Every frozen module by name (tests check that their weights never change)."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, as saved in training checkpoints (exact dtypes, for bit-exact resume):
        each of :meth:`trained_modules`' state dicts, keys prefixed with its name."""
        return {
            f"{name}.{key}" if name else key: tensor.detach()
            for name, module in self.trained_modules().items()
            for key, tensor in module.state_dict().items()
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy checkpointed tensors into the existing parameters (in place: the optimizer keeps them)."""
        for name, module in self.trained_modules().items():
            prefix = f"{name}." if name else ""
            module.load_state_dict(
                {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            )

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
    def export(
        self,
        directory: Path,
        formats: Sequence[str],
        metadata: dict[str, str],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Path]:
        """Write the trained result in its official layout; returns the files written.

        ``state`` is the trainable tensors to write, keyed as :meth:`trainable_state_dict` keys them; ``None``
        means the live modules. The loop passes it under FSDP/DeepSpeed, where the live modules hold shards
        (recipes written before sharded training may leave the argument out; they then train under DDP
        only). Built-in recipes write floating-point tensors in ``config.export_dtype``."""

    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Preview images with the current weights; must not disturb training state."""
        raise IdcraftError(f"{type(self).__name__} cannot make sample images.")


def register_adapter(model: nn.Module, adapter: nn.Module, projection: str) -> None:
    """Make ``adapter`` usable as ``model.adapter`` while registering only its projection (as
    ``model.<projection>``) as a submodule of ``model``.

    Attached adapters' attention processors are already submodules of the denoiser (the UNet or FLUX
    transformer holds them), so registering the whole adapter as well would make each processor reachable
    under two paths. DDP does not mind; FSDP2 does when it shards the denoiser's blocks separately (the usual
    policy for large bases): the block shards the processor, then the root finds it again, already sharded,
    and fails. Reached once, every trainable parameter still belongs to ``model`` for DDP, FSDP and
    DeepSpeed."""
    object.__setattr__(model, "adapter", adapter)  # a plain attribute, not in model._modules
    setattr(model, projection, getattr(adapter, projection))


def exports_state(recipe: TrainingRecipe) -> bool:
    """Whether ``recipe.export`` accepts gathered tensors (``state=``), as sharded training needs."""
    return "state" in inspect.signature(recipe.export).parameters


def model_state_keys(recipe: TrainingRecipe) -> dict[str, list[str]]:
    """For each key of ``recipe.trainable_state_dict()``, the keys under which ``recipe.model.state_dict()``
    holds the same tensor (same storage, offset and shape), before the model is wrapped.

    Under DeepSpeed the loop reads the trainable tensors out of ``accelerator.get_state_dict(model)``,
    which is keyed by the model's module paths; matching by identity spares every recipe from listing them.
    A module reachable twice (an attention processor is both ``adapter.layers.3`` and a UNet attribute)
    gives several keys; any of them holds the tensor."""
    model_state = recipe.model.state_dict(keep_vars=True)
    by_storage: dict[tuple, list[str]] = {}
    for key, tensor in model_state.items():
        by_storage.setdefault(_storage_id(tensor), []).append(key)
    found, missing = {}, []
    for key, tensor in recipe.trainable_state_dict().items():
        keys = by_storage.get(_storage_id(tensor))
        if keys:
            found[key] = keys
        else:
            missing.append(key)
    if missing:
        raise IdcraftError(
            f"{type(recipe).__name__}: trainable tensors {missing[:3]} are not part of the model handed to "
            "accelerate (recipe.model), so FSDP/DeepSpeed could not train or save them."
        )
    return found


def _storage_id(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)


def export_tensors(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``state``, floating-point tensors cast to ``dtype`` (``fp32``, ``fp16``,
    ``bf16``); training keeps float32 master weights, official releases ship float16."""
    target = EXPORT_DTYPES[dtype]
    return {
        k: (t.detach().to(target) if t.is_floating_point() else t.detach()).cpu().contiguous()
        for k, t in state.items()
    }


def adapter_checkpoint(
    state: Mapping[str, torch.Tensor], projection: str = "image_proj."
) -> AdapterCheckpoint:
    """The official layout from an adapter module's state dict: ``<projection>*`` -> ``image_proj``,
    ``layers.<i>.<name>`` -> ``ip_adapter`` ``<i>.<name>`` (what ``IPAdapter.to_checkpoint`` and
    ``InstantCharacterAdapter.to_checkpoint`` give for the live modules, key for key, in order)."""
    image_proj = {k[len(projection) :]: t for k, t in state.items() if k.startswith(projection)}
    ip_adapter = {k[len("layers.") :]: t for k, t in state.items() if k.startswith("layers.")}
    unknown = [k for k in state if not k.startswith((projection, "layers."))]
    if unknown:
        raise IdcraftError(f"unexpected adapter tensors {unknown[:3]} (not {projection}* or layers.*).")
    return AdapterCheckpoint(image_proj, ip_adapter)


def write_adapter(
    checkpoint: AdapterCheckpoint, directory: Path, formats: Sequence[str], metadata: Mapping[str, str]
) -> list[Path]:
    """``directory/adapter.<suffix>`` per format, with ``metadata`` (safetensors only)."""
    checkpoint.metadata = dict(metadata)
    return [save_checkpoint(checkpoint, Path(directory) / f"adapter{SUFFIXES[f]}") for f in formats]


def write_flat_release(
    tensors: Mapping[str, torch.Tensor], directory: Path, formats: Sequence[str], metadata: Mapping[str, str]
) -> list[Path]:
    """``directory/adapter.<suffix>`` per format for a release that is one flat state dict (PuLID's): the
    tensors as they are, ``metadata`` in the safetensors header; written atomically."""
    import io

    from safetensors.torch import save

    from ..outputs import atomic_write_bytes

    written = []
    for fmt in formats:
        if fmt == "safetensors":
            data = save(dict(tensors), metadata={k: str(v) for k, v in metadata.items()})
        else:
            buffer = io.BytesIO()
            torch.save(dict(tensors), buffer)
            data = buffer.getvalue()
        written.append(atomic_write_bytes(Path(directory) / f"adapter{SUFFIXES[fmt]}", data))
    return written


def engine_preview(
    recipe: TrainingRecipe, pipeline, prompt: str, reference: str, **settings
) -> list[Image.Image]:
    """Preview images as a user would generate them: ``pipeline`` (built on copies of the trained modules)
    in an :class:`~idcraft.engine.Engine` with the run's face backend (the largest face of the reference), at
    the training resolution; ``settings`` are ``seed``, ``steps`` and ``guidance``."""
    from ..engine import Engine, GenerationRequest
    from ..methods import reads_faces

    size = recipe.resolution
    if reads_faces(getattr(pipeline, "method", None)):
        settings["face_index"] = 0  # the largest face: a group photo must not stop a training run
    request = GenerationRequest(prompt, references=[reference], width=size, height=size, **settings)
    config = recipe.config
    engine = Engine([pipeline], face_backend=config.face_backend, face_models=config.face_models)
    return engine.generate(request).images


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
    from . import register_builtin_recipes

    register_builtin_recipes()
    name = canonical_method(method)
    if name not in RECIPES:
        raise IdcraftError(
            f"training is not available for method {method!r}; "
            f"trainable methods: {', '.join(sorted(RECIPES))}."
        )
    return RECIPES[name]
