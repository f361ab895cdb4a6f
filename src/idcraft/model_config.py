"""``models.yaml``: the model files of each method, and few-step recipes, for ``idcraft batch``, ``eval`` and
``compare``.

::

    models:                        # one entry per method (the key is its label; `method` defaults to it)
      ip-adapter-plus:
        base: ./stable-diffusion-v1-5
        adapter: ./IP-Adapter/models/ip-adapter-plus_sd15.safetensors
        image_encoder: ./IP-Adapter/models/image_encoder
      faceid-sdxl:
        method: faceid
        base: ./stable-diffusion-xl-base-1.0
        adapter: ./ip-adapter-faceid_sdxl.bin
        face_models: ~/.insightface/models/buffalo_l
      instantid:
        base: ./stable-diffusion-xl-base-1.0
        adapter: ./InstantID/ip-adapter.bin
        controlnet: ./InstantID/ControlNetModel
        defaults: {scale: 0.8}     # request settings left out take these
    recipes:                       # few-step recipes (idcraft.fewstep), applied at load time
      lcm:   {recipe: lcm-lora, lora: ./lcm-lora-sdv1-5/pytorch_lora_weights.safetensors, models: [ip-adapter-plus]}
      light: {recipe: sdxl-lightning, lora: ./sdxl_lightning_4step_lora.safetensors, models: [faceid-sdxl, instantid]}
    device: auto                   # every model's default (a model may set its own)
    dtype: auto
    face_backend: insightface      # face analysis of references (FaceID, InstantID)
    face_models: ~/.insightface/models/antelopev2

``idcraft serve``'s configuration file is read too (its ``server``/``world`` sections are ignored; its
``limits`` apply). Relative paths are taken from the config file's folder when something exists there.
Unknown keys are refused by name, so a typo never falls back to a default silently. The eval's own
settings (``grid``, ``scoring``) may sit in the same file; they are read by :mod:`idcraft.evaluation`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IdcraftError
from .requests import Limits

__all__ = ["ModelEntry", "ModelsConfig", "RecipeEntry", "load_engine", "load_models_config"]

#: Request settings a model entry may default.
DEFAULTABLE = ("steps", "guidance", "scale", "width", "height", "negative_prompt", "s_scale")


@dataclass
class ModelEntry:
    """One method's files and where it runs."""

    label: str
    method: str
    base: str
    adapter: str
    image_encoder: str | None = None
    image_encoder_2: str | None = None
    controlnet: str | list[str] | None = None
    device: str | None = None
    dtype: str | None = None
    offload: str | None = None
    width: int | None = None
    height: int | None = None
    face_backend: str | None = None
    face_models: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        from .registry import get_method

        return get_method(self.method).family

    @property
    def is_sd(self) -> bool:
        from .registry import get_method

        return get_method(self.method).base == "sd"


@dataclass
class RecipeEntry:
    """A few-step recipe with its weights file, for the models it names (default: every SD model)."""

    name: str
    recipe: str
    lora: str | None = None
    steps: list[int] | None = None
    guidance: float | None = None
    lora_scale: float = 1.0
    models: list[str] | None = None

    def applies_to(self, model: ModelEntry) -> bool:
        return model.is_sd and (self.models is None or model.label in self.models)


@dataclass
class ModelsConfig:
    models: dict[str, ModelEntry] = field(default_factory=dict)
    recipes: dict[str, RecipeEntry] = field(default_factory=dict)
    device: str = "auto"
    dtype: str | None = None
    face_backend: str = "insightface"
    face_models: str | None = None
    limits: Limits = field(default_factory=Limits)
    #: Sections for other readers (``grid``, ``scoring``), kept as parsed.
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = "config"

    def model(self, label: str | None) -> ModelEntry:
        if label is None:
            if len(self.models) != 1:
                raise IdcraftError(
                    f"{self.source} lists {len(self.models)} models: name one per request "
                    f"({', '.join(self.models)})."
                )
            return next(iter(self.models.values()))
        if label not in self.models:
            by_method = [e for e in self.models.values() if e.method == _method_name(label)]
            if len(by_method) == 1:  # a method name where its entry has another label
                return by_method[0]
            raise IdcraftError(
                f"model {label!r} is not in {self.source}; it lists {', '.join(self.models) or 'none'}."
            )
        return self.models[label]

    def recipe(self, name: str | None) -> RecipeEntry | None:
        if name in (None, "", "none"):
            return None
        if name not in self.recipes:
            raise IdcraftError(
                f"few-step recipe {name!r} is not in {self.source}'s recipes; it lists "
                f"{', '.join(self.recipes) or 'none'}."
            )
        return self.recipes[name]


def _method_name(name: str) -> str | None:
    from .registry import get_method

    try:
        return get_method(name).name
    except Exception:  # noqa: BLE001 - not a method name
        return None


def load_models_config(path: str | os.PathLike) -> ModelsConfig:
    """The configuration in the YAML (or JSON) file at ``path``."""
    import yaml

    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except OSError as exc:
        raise IdcraftError(f"--config {path}: cannot read it ({exc.strerror or exc}).") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise IdcraftError(f"--config {path}: not valid YAML ({exc}).") from exc
    return models_config_from_dict(data, where=str(path), relative_to=file.parent)


_TOP = {"models", "recipes", "device", "dtype", "face_backend", "face_models", "limits", "grid", "scoring"}
_IGNORED = {"server", "world"}  # idcraft serve's sections


def models_config_from_dict(
    data: Any, *, where: str = "config", relative_to: Path | None = None
) -> ModelsConfig:
    """A :class:`ModelsConfig` from parsed YAML/JSON, every key checked."""
    if not isinstance(data, dict):
        raise IdcraftError(f"{where}: expected a mapping at the top level.")
    _known(data, _TOP | _IGNORED, where)
    config = ModelsConfig(
        device=str(data.get("device") or "auto"),
        dtype=None if data.get("dtype") in (None, "auto") else str(data["dtype"]),
        face_backend=str(data.get("face_backend") or "insightface"),
        face_models=_path(data.get("face_models"), relative_to),
        source=where,
        extra={k: data[k] for k in ("grid", "scoring") if k in data},
    )
    limits = data.get("limits")
    if limits is not None:
        if not isinstance(limits, dict):
            raise IdcraftError(f"{where}: limits must be a mapping.")
        _known(limits, {f.name for f in dataclasses.fields(Limits)}, f"{where}: limits")
        config.limits = Limits(**{k: int(v) for k, v in limits.items()})
    models = data.get("models") or {}
    if not isinstance(models, dict) or not models:
        raise IdcraftError(f"{where}: models must map each method's label to its files (base, adapter ...).")
    for label, entry in models.items():
        config.models[str(label)] = _model(str(label), entry, f"{where}: models.{label}", relative_to)
    recipes = data.get("recipes") or {}
    if not isinstance(recipes, dict):
        raise IdcraftError(f"{where}: recipes must map names to {{recipe, lora, ...}}.")
    for name, entry in recipes.items():
        if str(name) == "none":
            raise IdcraftError(f"{where}: recipes.none: 'none' means no recipe; choose another name.")
        config.recipes[str(name)] = _recipe(str(name), entry, f"{where}: recipes.{name}", relative_to, config)
    return config


def _model(label: str, entry: Any, where: str, relative_to: Path | None) -> ModelEntry:
    from .registry import get_method

    if not isinstance(entry, dict):
        raise IdcraftError(f"{where}: expected a mapping with base, adapter, ... .")
    fields = {f.name for f in dataclasses.fields(ModelEntry)} - {"label"}
    _known(entry, fields, where)
    for required in ("base", "adapter"):
        if not entry.get(required):
            raise IdcraftError(f"{where}: {required} is required.")
    values = dict(entry)
    method = str(values.pop("method", None) or label)
    try:
        method = get_method(method).name
    except Exception as exc:
        raise IdcraftError(
            f"{where}: {method!r} is not a method name; give `method:` (e.g. ip-adapter-plus, faceid, instantid)."
        ) from exc
    for key in ("base", "adapter", "image_encoder", "image_encoder_2", "face_models"):
        if values.get(key) is not None:
            values[key] = _path(values[key], relative_to)
    if isinstance(values.get("controlnet"), (list, tuple)):
        values["controlnet"] = [_path(c, relative_to) for c in values["controlnet"]]
    elif values.get("controlnet") is not None:
        values["controlnet"] = _path(values["controlnet"], relative_to)
    defaults = dict(values.get("defaults") or {})
    _known(defaults, set(DEFAULTABLE), f"{where}.defaults")
    values["defaults"] = defaults
    return ModelEntry(label=label, method=method, **values)


def _recipe(name: str, entry: Any, where: str, relative_to: Path | None, config: ModelsConfig) -> RecipeEntry:
    from .fewstep import get_recipe

    if isinstance(entry, str):
        entry = {"recipe": entry}
    if not isinstance(entry, dict):
        raise IdcraftError(f"{where}: expected a mapping with recipe and lora.")
    _known(entry, {"recipe", "lora", "unet", "steps", "guidance", "lora_scale", "models"}, where)
    recipe = get_recipe(entry.get("recipe") or name).name
    weights = entry.get("lora") or entry.get("unet")
    steps = entry.get("steps")
    if steps is not None:
        steps = [int(s) for s in (steps if isinstance(steps, (list, tuple)) else [steps])]
        if any(s < 1 for s in steps):
            raise IdcraftError(f"{where}.steps: step counts must be at least 1.")
    models = entry.get("models")
    if models is not None:
        models = [str(m) for m in (models if isinstance(models, (list, tuple)) else [models])]
        unknown = [m for m in models if m not in config.models]
        if unknown:
            raise IdcraftError(
                f"{where}.models: {', '.join(unknown)} not in models ({', '.join(config.models)})."
            )
    return RecipeEntry(
        name=name,
        recipe=recipe,
        lora=_path(weights, relative_to),
        steps=steps,
        guidance=None if entry.get("guidance") is None else float(entry["guidance"]),
        lora_scale=float(entry.get("lora_scale", 1.0)),
        models=models,
    )


def _known(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise IdcraftError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}."
        )


def _path(value: Any, relative_to: Path | None) -> str | None:
    """``value`` as a path; relative ones are taken from the config's folder when something exists there
    (otherwise left as given: a hub id, or relative to the working folder)."""
    if value is None:
        return None
    text = os.path.expanduser(str(value))
    if relative_to is not None and not os.path.isabs(text):
        candidate = relative_to / text
        if candidate.exists():
            return str(candidate)
    return text


# ---------------------------------------------------------------------------- loading
def load_engine(
    config: ModelsConfig,
    label: str | None,
    recipe: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
):
    """``(engine, few-step settings or None)``: the model ``label`` loaded with its files, and ``recipe``
    applied to it once (see :func:`idcraft.fewstep.apply_recipe`)."""
    from .engine import Engine

    entry = config.model(label)
    chosen = config.recipe(recipe)
    if chosen is not None and not chosen.applies_to(entry):
        raise IdcraftError(
            f"few-step recipe {chosen.name!r} does not apply to {entry.label} "
            + (
                "(Stable Diffusion methods only)."
                if not entry.is_sd
                else f"(it lists {', '.join(chosen.models or [])})."
            )
        )
    engine = Engine.from_pretrained(
        entry.base,
        entry.adapter,
        entry.image_encoder,
        method=entry.method,
        image_encoder_2=entry.image_encoder_2,
        controlnet=entry.controlnet,
        device=device or entry.device or config.device,
        dtype=dtype or entry.dtype or config.dtype,
        offload=entry.offload,
        width=entry.width,
        height=entry.height,
        face_backend=entry.face_backend or config.face_backend,
        face_models=entry.face_models or config.face_models,
        limits=config.limits,
    )
    settings = None
    if chosen is not None:
        from .fewstep import apply_recipe

        settings = apply_recipe(
            engine,
            chosen.recipe,
            chosen.lora,
            steps=chosen.steps[0] if chosen.steps else None,
            guidance=chosen.guidance,
            lora_scale=chosen.lora_scale,
        )
    return engine, settings
