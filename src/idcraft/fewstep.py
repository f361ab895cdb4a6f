"""Few-step generation for the Stable Diffusion families: distillation LoRAs (or UNets) and their schedulers.

A recipe is applied **once, at load time**, to a loaded pipeline: the distilled weights are loaded from a
file the user gives and fused into the UNet (diffusers' ``load_lora_weights`` + ``fuse_lora``, then the
LoRA layers are removed so the UNet is a plain UNet again), and the pipeline's scheduler is replaced by the
recipe's, built from the pipeline's own scheduler config. :func:`apply_recipe` returns the steps and
guidance the recipe is meant to run with; requests then ask for those (nothing about a request changes the
shared pipeline: each call runs on a view with its own copy of the scheduler, see
:func:`idcraft.pipeline.request_view`).

| recipe | weights | scheduler | steps | guidance |
|---|---|---|---|---|
| ``lcm-lora`` | LCM-LoRA (SD1.5, SDXL) | ``LCMScheduler`` | 4 (4-8) | 1.0 (1-2) |
| ``sdxl-lightning`` | SDXL-Lightning LoRA or UNet file | ``EulerDiscreteScheduler``, trailing | 2/4/8 (from the file name) | 0 |
| ``hyper-sd`` | Hyper-SD N-step LoRA (SD1.5, SDXL) | ``DDIMScheduler``, trailing | N (from the file name) | 0 (5 for ``-CFG-``) |
| ``hyper-sd-tcd`` | Hyper-SD 1-step unified LoRA | ``TCDScheduler`` | 1 (1-8) | 0 |

    >>> engine = Engine.from_pretrained("./stable-diffusion-v1-5", "./ip-adapter_sd15.bin", "./image_encoder")
    >>> fast = apply_recipe(engine, "lcm-lora", "./lcm-lora-sdv1-5/pytorch_lora_weights.safetensors")
    >>> engine.generate(GenerationRequest(..., steps=fast.steps, guidance=fast.guidance))

With an adapter attached the LoRA targets only the base model's own layers (``to_q``, ``to_k`` ... never
the adapter's ``to_k_ip``), so the adapter is unchanged; whether identity survives the distilled sampler
is what ``idcraft eval`` measures (a column per recipe). Guidance 0 or 1 turns classifier-free guidance
off, and with it the adapter's negative (unconditional) image tokens.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IdcraftError

__all__ = [
    "RECIPES",
    "FewStepSettings",
    "Recipe",
    "apply_recipe",
    "get_recipe",
    "recipe_names",
    "recommended_settings",
]


@dataclass(frozen=True)
class Recipe:
    """A few-step recipe: which scheduler (and its options) the distilled weights were trained for, and the
    steps and guidance they are meant to run with."""

    name: str
    scheduler: str
    scheduler_options: dict[str, Any] = field(default_factory=dict)
    #: Steps when neither the call nor the file name says.
    steps: int = 4
    #: Step counts the weights were made for (others run, with a warning in :attr:`FewStepSettings.notes`).
    step_range: tuple[int, int] = (1, 8)
    guidance: float = 0.0
    #: Base kinds ("sd", "sdxl") the published weights exist for.
    bases: tuple[str, ...] = ("sd", "sdxl")
    #: Whether a full UNet file (not only a LoRA) is accepted.
    unet_file: bool = False
    #: Read the step count from the weights' file name (``..._4step_...``, ``...-8steps-...``).
    steps_from_name: bool = False
    source: str = ""


RECIPES: dict[str, Recipe] = {
    "lcm-lora": Recipe(
        "lcm-lora",
        "LCMScheduler",
        steps=4,
        step_range=(2, 8),
        guidance=1.0,
        source="latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl (guidance 1-2, 4-8 steps)",
    ),
    "sdxl-lightning": Recipe(
        "sdxl-lightning",
        "EulerDiscreteScheduler",
        {"timestep_spacing": "trailing"},
        steps=4,
        step_range=(1, 8),
        guidance=0.0,
        bases=("sdxl",),
        unet_file=True,
        steps_from_name=True,
        source="ByteDance/SDXL-Lightning (sdxl_lightning_{2,4,8}step_lora / _unet.safetensors)",
    ),
    "hyper-sd": Recipe(
        "hyper-sd",
        "DDIMScheduler",
        {"timestep_spacing": "trailing"},
        steps=8,
        step_range=(1, 12),
        guidance=0.0,
        steps_from_name=True,
        source="ByteDance/Hyper-SD (Hyper-SD15-Nsteps-lora, Hyper-SDXL-Nsteps-lora; -CFG- variants)",
    ),
    "hyper-sd-tcd": Recipe(
        "hyper-sd-tcd",
        "TCDScheduler",
        steps=1,
        step_range=(1, 8),
        guidance=0.0,
        source="ByteDance/Hyper-SD (Hyper-SD15-1step-lora, Hyper-SDXL-1step-lora) with TCD",
    ),
}

#: Other spellings accepted for recipe names.
_ALIASES = {
    "lcm": "lcm-lora",
    "lightning": "sdxl-lightning",
    "hypersd": "hyper-sd",
    "hyper-sd-ddim": "hyper-sd",
    "tcd": "hyper-sd-tcd",
}


@dataclass(frozen=True)
class FewStepSettings:
    """What :func:`apply_recipe` did and how to run the result: the recommended ``steps`` and
    ``guidance``, the scheduler now on the pipeline, the kind of weights fused (``"lora"`` or ``"unet"``)."""

    recipe: str
    steps: int
    guidance: float
    scheduler: str
    weights: str
    path: str
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": self.scheduler,
            "weights": self.weights,
            "path": self.path,
            "notes": list(self.notes),
        }


def recipe_names() -> tuple[str, ...]:
    return tuple(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (or an alias: ``lcm``, ``lightning``, ``tcd`` ...)."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in RECIPES:
        raise IdcraftError(f"unknown few-step recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    return RECIPES[key]


def steps_in_name(path: str | os.PathLike) -> int | None:
    """The step count a distilled file's name states (``sdxl_lightning_4step_lora``, ``Hyper-SD15-8steps``)."""
    match = re.search(r"(\d+)[-_]?steps?(?![a-z])", Path(path).name, re.IGNORECASE)
    return int(match.group(1)) if match else None


def recommended_settings(
    recipe: str | Recipe,
    weights: str | os.PathLike | None = None,
    *,
    steps: int | None = None,
    guidance: float | None = None,
) -> tuple[int, float]:
    """``(steps, guidance)`` a recipe runs with: the given values, else the step count in the weights'
    file name (Lightning, Hyper-SD), else the recipe's; guidance 5 for Hyper-SD's ``-CFG-`` LoRAs."""
    chosen = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    if steps is None:
        named = steps_in_name(weights) if weights is not None and chosen.steps_from_name else None
        steps = named or chosen.steps
    if guidance is None:
        guidance = chosen.guidance
        if chosen.name == "hyper-sd" and weights is not None and "cfg" in Path(weights).name.lower():
            guidance = 5.0  # the -CFG- LoRAs keep classifier-free guidance (5-8 recommended)
    return int(steps), float(guidance)


def apply_recipe(
    target: Any,
    recipe: str | Recipe,
    weights: str | os.PathLike | None = None,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    lora_scale: float = 1.0,
) -> FewStepSettings:
    """Make ``target`` a few-step model with ``recipe``: fuse ``weights`` (a LoRA file or folder in diffusers,
    kohya or peft format; for ``sdxl-lightning`` also a full UNet ``.safetensors``) into its UNet and give it
    the recipe's scheduler. Returns the steps and guidance to generate with (``steps``/``guidance`` override
    the recipe's; the step count in the file name wins over the recipe's default).

    ``target`` is a diffusers SD1.5/SDXL pipeline, an :class:`~idcraft.pipeline.IPAdapterPipeline`, or an
    :class:`~idcraft.engine.Engine` (every loaded SD method; a UNet shared by several methods is fused
    once). Call it once, right after loading: a pipeline that already carries a recipe is refused (fusing
    twice would double the update). ``weights=None`` only swaps the scheduler (for a base that is already
    distilled, such as a merged Lightning checkpoint).
    """
    chosen = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    pipes = _diffusers_pipelines(target)
    if not pipes:
        raise IdcraftError("few-step recipes apply to Stable Diffusion 1.5 / SDXL pipelines only.")
    for pipe in pipes:
        if getattr(pipe, "_idcraft_fewstep", None) is not None:
            raise IdcraftError(
                f"this pipeline already carries few-step recipe {pipe._idcraft_fewstep.recipe!r}: load the "
                "base model again to apply another (recipes are applied once, at load time)."
            )
    kinds = {"sdxl" if hasattr(pipe, "text_encoder_2") else "sd" for pipe in pipes}
    wrong = kinds - set(chosen.bases)
    if wrong:
        raise IdcraftError(
            f"{chosen.name} weights exist for {'/'.join(b.upper() for b in chosen.bases)} bases; this base "
            f"is {'SD1.x' if 'sd' in wrong else 'SDXL'}."
        )
    notes: list[str] = []
    kind, path = "none", ""
    if weights is not None:
        path = str(weights)
        kind = _weights_kind(Path(weights).expanduser())
        if kind == "unet" and not chosen.unet_file:
            raise IdcraftError(
                f"{weights}: holds a whole UNet, not a LoRA; {chosen.name} is loaded from a LoRA file."
            )
        done: set[int] = set()
        for pipe in pipes:
            if id(pipe.unet) in done:
                continue
            done.add(id(pipe.unet))
            if kind == "unet":
                _load_unet_file(pipe.unet, Path(weights).expanduser())
            else:
                _fuse_lora(pipe, Path(weights).expanduser(), lora_scale)
    steps, guidance = recommended_settings(chosen, weights, steps=steps, guidance=guidance)
    low, high = chosen.step_range
    if not low <= steps <= high:
        notes.append(f"{chosen.name} is made for {low}-{high} steps; {steps} may give poor images.")
    options = dict(chosen.scheduler_options)
    if chosen.name == "sdxl-lightning" and (steps == 1 or (weights and "x0" in Path(weights).name.lower())):
        options["prediction_type"] = "sample"  # the 1-step Lightning UNet predicts x0
    if chosen.name == "hyper-sd-tcd":
        notes.append("TCD runs with eta (gamma) 0: idcraft's pipelines pass diffusers' default eta.")
    for pipe in pipes:
        pipe.scheduler = _scheduler(chosen.scheduler, pipe.scheduler.config, options)
    settings = FewStepSettings(
        chosen.name, int(steps), float(guidance), chosen.scheduler, kind, path, tuple(notes)
    )
    for pipe in pipes:
        pipe._idcraft_fewstep = settings
    return settings


# ---------------------------------------------------------------------------- helpers
def _diffusers_pipelines(target: Any) -> list:
    """The diffusers pipelines inside ``target`` (a pipeline, an IPAdapterPipeline or an Engine)."""
    if hasattr(target, "methods") and hasattr(target, "pipeline"):  # an Engine
        out = []
        for name in target.methods:
            out.extend(_diffusers_pipelines(target.pipeline(name)))
        return out
    inner = getattr(target, "pipe", None)
    if inner is not None and hasattr(inner, "unet"):  # IPAdapterPipeline
        return [inner]
    if hasattr(target, "unet") and hasattr(target, "scheduler"):
        return [target]
    return []


def _scheduler(name: str, config, options: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, name)
    return cls.from_config(config, **options)


def _weights_kind(path: Path) -> str:
    """``"lora"`` or ``"unet"``, from the tensor names (a LoRA's contain ``lora``)."""
    if not path.exists():
        raise IdcraftError(f"few-step weights {path}: no such file or folder.")
    if path.is_dir():
        return "lora"  # a diffusers LoRA folder (pytorch_lora_weights.safetensors inside)
    if path.suffix != ".safetensors":
        return "lora"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:
        raise IdcraftError(f"few-step weights {path}: not a readable .safetensors file ({exc}).") from exc
    if not keys:
        raise IdcraftError(f"few-step weights {path}: the file holds no tensors.")
    return "lora" if any("lora" in k.lower() or k.endswith(".alpha") for k in keys) else "unet"


def _fuse_lora(pipe, path: Path, lora_scale: float) -> None:
    """Load the LoRA, fuse it into the weights and drop the LoRA layers (the fused update stays)."""
    kwargs = {}
    if path.is_dir():
        source = str(path)
    else:
        source, kwargs["weight_name"] = str(path.parent), path.name
    try:
        pipe.load_lora_weights(source, adapter_name="idcraft_fewstep", **kwargs)
    except Exception as exc:
        raise IdcraftError(
            f"few-step LoRA {path} does not load into this base model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); is it made for this base (SD1.5 vs SDXL)?"
        ) from exc
    pipe.fuse_lora(lora_scale=lora_scale, adapter_names=["idcraft_fewstep"])
    pipe.unload_lora_weights()


def _load_unet_file(unet, path: Path) -> None:
    """Copy a full UNet state dict (SDXL-Lightning ``*_unet.safetensors``) into ``unet``. Adapter weights
    attached to the UNet (its attention processors) are not in the file and stay as they are."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = unet.state_dict()
    base_keys = {k for k in own if ".processor." not in k}
    missing = sorted(base_keys - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        shown = (missing or unexpected)[:3]
        raise IdcraftError(
            f"{path}: not a UNet for this base model ({len(missing)} of its tensors missing, "
            f"{len(unexpected)} unexpected, e.g. {', '.join(shown)})."
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise IdcraftError(
                f"{path}: {key} is {tuple(tensor.shape)} but this base model's is {tuple(own[key].shape)}; the "
                "file is for another base model."
            )
    unet.load_state_dict(state, strict=False)
