"""The models YAML: the model files of each method, read by ``idcraft serve``, ``batch``, ``eval`` and
``compare``, and loading them into engines.

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
    face_backend: insightface      # face analysis of references, for models that name none
    face_models: ~/.insightface/models/antelopev2
    limits: {max_steps: 500}       # idcraft.requests.Limits fields

:func:`read_models` reads ``models`` and the settings its entries share (``device``, ``dtype``,
``face_backend``, ``face_models``, ``limits``) for every reader; :func:`load_models_config` adds batch and
eval's sections (``recipes``; ``grid`` and ``scoring`` are kept for :mod:`idcraft.evaluation`) and ignores
``idcraft serve``'s (``server``, ``world``), whose reader (:mod:`idcraft.serve.config`) is built on the same
functions. Relative paths are taken from the config file's folder when something exists there. Unknown keys
are refused by name, so a typo never falls back to a default silently.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IdcraftError
from .requests import Limits

__all__ = [
    "ModelEntry",
    "ModelsConfig",
    "ModelsSection",
    "RecipeEntry",
    "load_engine",
    "load_engines",
    "load_models_config",
    "read_models",
]

#: Request settings a model entry may default.
DEFAULTABLE = (
    "steps", "guidance", "scale", "width", "height", "negative_prompt", "s_scale", "num_zero", "ortho", "sampler",
)  # fmt: skip

#: The top-level keys :func:`read_models` reads.
MODELS_KEYS = ("models", "device", "dtype", "face_backend", "face_models", "limits")


@dataclass
class ModelEntry:
    """One method's files and where it runs (the file's top-level settings filled in)."""

    label: str
    method: str
    base: str
    adapter: str
    image_encoder: str | None = None
    image_encoder_2: str | None = None
    controlnet: str | list[str] | None = None
    device: str = "auto"
    dtype: str | None = None
    offload: str | None = None
    #: infiniteyou: aes_stage2 or sim_stage1 when the adapter is the release's parent folder
    model_version: str | None = None
    width: int | None = None
    height: int | None = None
    face_backend: str = "insightface"
    face_models: str | None = None
    eva_clip: str | None = None  # pulid: EVA02-CLIP checkpoint
    face_parser: str | None = None  # pulid: BiSeNet parsing file
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sd(self) -> bool:
        """Runs on :class:`~idcraft.pipeline.IPAdapterPipeline` (SD bases, IP-Adapter-style families; PuLID
        has a pipeline of its own)."""
        from .registry import get_method

        method = get_method(self.method)
        return method.base == "sd" and method.family != "pulid"


@dataclass
class ModelsSection:
    """The ``models`` section, by label, and what its entries share."""

    models: dict[str, ModelEntry] = field(default_factory=dict)
    #: Face analysis for models that name none (the scorers' default too).
    face_backend: str = "insightface"
    face_models: str | None = None
    limits: Limits = field(default_factory=Limits)
    source: str = "config"
    #: The label used when a request names none (None: the only model; several is an error).
    default: str | None = None

    def model(self, label: str | None) -> ModelEntry:
        if label is None and self.default is not None:
            label = self.default
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
class ModelsConfig(ModelsSection):
    """``idcraft batch``/``eval``/``compare``'s configuration: the models and few-step recipes."""

    recipes: dict[str, RecipeEntry] = field(default_factory=dict)
    #: Sections for other readers (``grid``, ``scoring``), kept as parsed.
    extra: dict[str, Any] = field(default_factory=dict)

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


# ---------------------------------------------------------------------------- reading
def read_config_file(path: str | os.PathLike) -> tuple[Any, Path]:
    """The parsed YAML (or JSON) file at ``path``, and its folder (relative paths are taken from there)."""
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
    return data, file.parent


def read_models(data: Any, own: Iterable[str], where: str, relative_to: Path | None) -> dict[str, Any]:
    """The :class:`ModelsSection` fields of parsed YAML/JSON ``data``: its ``models`` (possibly none) and the
    settings they share. ``own``: the reader's other top-level keys; any further key is refused by name."""
    if not isinstance(data, dict):
        raise IdcraftError(f"{where}: expected a mapping at the top level.")
    check_keys(data, {*MODELS_KEYS, *own}, where)
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise IdcraftError(f"{where}: models must map each method's label to its files (base, adapter ...).")
    shared = {
        "device": str(data.get("device") or "auto"),
        "dtype": None if data.get("dtype") in (None, "auto") else str(data["dtype"]),
        "face_backend": str(data.get("face_backend") or "insightface"),
        "face_models": config_path(data.get("face_models"), relative_to),
    }
    return {
        "models": {
            str(label): _model(str(label), entry, f"{where}: models.{label}", relative_to, shared)
            for label, entry in models.items()
        },
        "face_backend": shared["face_backend"],
        "face_models": shared["face_models"],
        "limits": read_section(Limits, data.get("limits"), f"{where}: limits"),
        "source": where,
    }


def load_models_config(path: str | os.PathLike) -> ModelsConfig:
    """The configuration in the YAML (or JSON) file at ``path``."""
    data, folder = read_config_file(path)
    return models_config_from_dict(data, where=str(path), relative_to=folder)


def models_config_from_dict(
    data: Any, *, where: str = "config", relative_to: Path | None = None
) -> ModelsConfig:
    """A :class:`ModelsConfig` from parsed YAML/JSON, every key checked (``server``/``world``, idcraft
    serve's sections, are ignored)."""
    own = ("recipes", "grid", "scoring", "server", "world")
    config = ModelsConfig(**read_models(data, own, where, relative_to))
    config.extra = {k: data[k] for k in ("grid", "scoring") if k in data}
    if not config.models:
        raise IdcraftError(f"{where}: models must map each method's label to its files (base, adapter ...).")
    recipes = data.get("recipes") or {}
    if not isinstance(recipes, dict):
        raise IdcraftError(f"{where}: recipes must map names to {{recipe, lora, ...}}.")
    for name, entry in recipes.items():
        if str(name) == "none":
            raise IdcraftError(f"{where}: recipes.none: 'none' means no recipe; choose another name.")
        config.recipes[str(name)] = _recipe(str(name), entry, f"{where}: recipes.{name}", relative_to, config)
    return config


def _model(label: str, entry: Any, where: str, relative_to: Path | None, shared: dict) -> ModelEntry:
    from .registry import get_method

    if not isinstance(entry, dict):
        raise IdcraftError(f"{where}: expected a mapping with base, adapter, ... .")
    check_keys(entry, {f.name for f in dataclasses.fields(ModelEntry)} - {"label"}, where)
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
    if get_method(method).base == "sd" and (
        values.get("image_encoder_2") or values.get("offload") not in (None, "none")
    ):
        raise IdcraftError(
            f"{where}: image_encoder_2 and offload are for the FLUX methods (instantcharacter, infiniteyou, "
            "pulid-flux on FLUX.1) only."
        )
    if values.get("model_version") and method != "infiniteyou":
        raise IdcraftError(f"{where}: model_version is for infiniteyou only.")
    if get_method(method).family not in ("pulid", "pulid-flux") and (
        values.get("eva_clip") or values.get("face_parser")
    ):
        raise IdcraftError(f"{where}: eva_clip and face_parser are for pulid only (pulid, pulid-flux).")
    for key in (
        "base",
        "adapter",
        "image_encoder",
        "image_encoder_2",
        "face_models",
        "eva_clip",
        "face_parser",
    ):
        values[key] = config_path(values.get(key), relative_to)
    controlnet = values.get("controlnet")
    if isinstance(controlnet, (list, tuple)):
        values["controlnet"] = [config_path(c, relative_to) for c in controlnet]
    else:
        values["controlnet"] = config_path(controlnet, relative_to)
    defaults = values.get("defaults") or {}
    check_keys(defaults, set(DEFAULTABLE), f"{where}.defaults")
    values["defaults"] = dict(defaults)
    values["device"] = str(values.get("device") or shared["device"])
    dtype = values.get("dtype") or shared["dtype"]
    values["dtype"] = None if dtype in (None, "auto") else str(dtype)
    if values.get("face_backend"):  # its own face analysis: the top-level face_models are for another
        values["face_backend"] = str(values["face_backend"])
    else:
        values["face_backend"] = shared["face_backend"]
        values["face_models"] = values["face_models"] or shared["face_models"]
    return ModelEntry(label=label, method=method, **values)


def _recipe(name: str, entry: Any, where: str, relative_to: Path | None, config: ModelsConfig) -> RecipeEntry:
    from .fewstep import get_recipe

    if isinstance(entry, str):
        entry = {"recipe": entry}
    if not isinstance(entry, dict):
        raise IdcraftError(f"{where}: expected a mapping with recipe and lora.")
    check_keys(entry, {"recipe", "lora", "unet", "steps", "guidance", "lora_scale", "models"}, where)
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
        lora=config_path(weights, relative_to),
        steps=steps,
        guidance=None if entry.get("guidance") is None else float(entry["guidance"]),
        lora_scale=float(entry.get("lora_scale", 1.0)),
        models=models,
    )


def read_section(cls, data: Any, where: str):
    """An instance of the dataclass ``cls`` from a mapping of its fields (``None``: every default); numbers
    are checked against the defaults' types."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise IdcraftError(f"{where}: expected a mapping.")
    names = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(data, set(names), where)
    values = {}
    for key, value in data.items():
        default = names[key].default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise IdcraftError(f"{where}.{key}: expected a number, got {value!r}.")
            if isinstance(default, int) and not float(value).is_integer():
                raise IdcraftError(f"{where}.{key}: expected a whole number, got {value!r}.")
            value = int(value) if isinstance(default, int) else float(value)
        values[key] = value
    return cls(**values)


def check_keys(data: Any, allowed: set[str], where: str) -> None:
    """Refuse a non-mapping, or any key of ``data`` not in ``allowed``, by name."""
    if not isinstance(data, dict):
        raise IdcraftError(f"{where}: expected a mapping.")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise IdcraftError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}."
        )


def config_path(value: Any, relative_to: Path | None) -> str | None:
    """``value`` as a path, ``~`` expanded; relative ones are taken from the config's folder when something
    exists there (otherwise left as given: a hub id such as ``h94/IP-Adapter`` stays one)."""
    if value is None:
        return None
    text = os.path.expanduser(str(value))
    if relative_to is not None and not os.path.isabs(text) and (relative_to / text).exists():
        return str(relative_to / text)
    return text


# ---------------------------------------------------------------------------- loading
def load_engines(
    config: ModelsSection,
    labels: Iterable[str] | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """An :class:`~idcraft.engine.Engine` for each model of ``config`` (``labels``: those only), by label;
    ``device``/``dtype`` override the entries'.

    SD-family entries naming the same base, device and dtype share one loaded base model (and one image
    encoder per encoder folder), each with its own adapter attached, as the offline world does; the others
    (FLUX) load with :meth:`Engine.from_pretrained <idcraft.engine.Engine.from_pretrained>`. Entries with
    the same face settings share one engine (an engine has one face backend, and one entry per method)."""
    from collections import Counter

    from .engine import Engine
    from .pipeline import IPAdapterPipeline

    entries = [config.models[label] for label in (config.models if labels is None else labels)]
    repeated = [m for m, n in Counter(e.method for e in entries).items() if n > 1]
    if repeated:
        raise IdcraftError(f"models: {', '.join(repeated)} given more than once (one entry per method).")
    shared: dict = {}
    groups: dict[tuple, dict[str, Any]] = {}
    for entry in entries:
        files = (entry.base, entry.adapter, entry.image_encoder)
        where = {"device": device_name(device or entry.device), "dtype": dtype or entry.dtype}
        if entry.is_sd:
            pipe = IPAdapterPipeline.from_pretrained(
                *files, method=entry.method, controlnet=entry.controlnet, **where, shared=shared
            )
        else:
            pipe = Engine.from_pretrained(
                *files,
                method=entry.method,
                image_encoder_2=entry.image_encoder_2,
                controlnet=entry.controlnet,
                **where,
                offload=entry.offload,
                model_version=entry.model_version,
                width=entry.width,
                height=entry.height,
                **({"eva_clip": entry.eva_clip} if entry.eva_clip else {}),
                **({"face_parser": entry.face_parser} if entry.face_parser else {}),
            ).pipeline()
        groups.setdefault((entry.face_backend, entry.face_models), {})[entry.label] = pipe
    engines = {}
    for (backend, models), pipes in groups.items():
        engine = Engine(
            {config.models[label].method: pipe for label, pipe in pipes.items()},
            face_backend=backend,
            face_models=models,
            limits=config.limits,
        )
        engines.update(dict.fromkeys(pipes, engine))
    return engines


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
    engine = load_engines(config, [entry.label], device=device, dtype=dtype)[entry.label]
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


def device_name(device: str | None) -> str:
    """``device`` resolved (``auto``: the best one here), CUDA with its index (``cuda`` -> ``cuda:0``)."""
    from .models import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        return "cuda:0"
    return str(dev)
