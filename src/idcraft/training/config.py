"""Training settings: one dataclass, filled from defaults, then a YAML/JSON file, then explicit overrides.

Every setting lives in :class:`TrainConfig`, so the command line, a config file and a library call all
describe a run the same way, and a checkpoint can record (and check on resume) what a run was started
with. Values that depend on the base model (the resolution) stay ``None`` until the recipe resolves them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import IdcraftError

MixedPrecision = Literal["no", "fp16", "bf16"]
ExportDtype = Literal["fp32", "fp16", "bf16"]

#: The ``export_dtype`` names (``idcraft.training.recipe.EXPORT_DTYPES`` maps them to torch dtypes).
EXPORT_DTYPE_NAMES = ("fp32", "fp16", "bf16")

#: Settings that must match between a run and its resume, or the resumed run would not continue the
#: same computation (data order, batch composition, objective). Anything else may change on resume
#: (e.g. ``max_steps`` to train longer, ``sample_every``).
RESUME_INVARIANT = (
    "method",
    "seed",
    "batch_size",
    "gradient_accumulation",
    "resolution",
    "drop_image",
    "drop_text",
    "drop_both",
    "noise_offset",
    "num_tokens",
    "lora_rank",
    "face_backend",
    "stage",
    "id_loss",
    "learning_rate",
    "weight_decay",
    "adam_betas",
    "adam_epsilon",
    "lr_scheduler",
    "lr_warmup_steps",
)


@dataclass
class TrainConfig:
    """One training run. Defaults follow the official IP-Adapter training scripts.

    Paths: ``base`` is a diffusers pipeline folder or hub id (SD1.x or SDXL); ``data`` a folder of images
    with ``.txt`` caption sidecars, or a ``.jsonl`` manifest; ``output`` the run folder (final adapter,
    checkpoints, logs, samples).
    """

    method: str
    base: str
    data: str
    output: str
    image_encoder: str | None = None
    image_encoder_2: str | None = None  # a second image encoder (InstantCharacter: DINOv2 beside SigLIP)

    # model / objective
    resolution: int | None = None  # None: 512 for SD1.x, 1024 for SDXL
    num_tokens: int | None = None  # None: the method's official count
    drop_image: float = 0.05  # classifier-free guidance drops, exclusive events per sample
    drop_text: float = 0.05
    drop_both: float = 0.05
    noise_offset: float = 0.0
    lora_rank: int = 128  # FaceID's LoRA on every attention layer (the official rank)
    stage: int | None = None  # a multi-stage recipe's stage (InstantCharacter: 1, 2, 3); sets its defaults
    id_loss: float = 0.0  # pulid: weight of PuLID's accurate-ID loss through a fast sampling path (off)
    init_from: str | None = None  # start the trainable weights from this official-layout adapter file
    init_controlnet: str | None = None  # InstantID: start IdentityNet from this ControlNet folder

    # face methods (FaceID, InstantID): where identity embeddings and keypoints come from, when the
    # manifest does not give them precomputed
    face_backend: str = "insightface"  # must give ArcFace embeddings (see idcraft.faces)
    face_models: str | None = None  # insightface model pack folder (default ~/.insightface/models/...)

    # optimisation
    batch_size: int = 8  # per process
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None
    lr_scheduler: str = "constant"  # any diffusers.optimization name
    lr_warmup_steps: int = 0
    max_steps: int | None = None  # optimizer steps; None = train for `epochs`
    epochs: int = 100
    mixed_precision: MixedPrecision | None = None  # None: accelerate's launch config, else "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    cpu: bool = False  # force CPU even where a GPU exists

    # data
    num_workers: int = 0
    cache_features: bool = False
    cache_dir: str | None = None  # default: OUTPUT/cache
    cache_batch_size: int = 16

    # checkpoints and outputs
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False  # replace a finished run (or an abandoned one's checkpoints) in `output`
    formats: tuple[str, ...] = ("safetensors",)
    export_dtype: ExportDtype = "fp32"  # the written adapter files (official releases are fp16)

    # reporting
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    sample_every: int | None = None
    sample_prompt: str = "a photo"
    sample_reference: str | None = None
    sample_steps: int = 30
    sample_guidance: float = 7.5
    sample_seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # recipe-specific settings
    #: filled in by the trainer: a cheap fingerprint of what `data` held (see
    #: :func:`~idcraft.training.data.data_fingerprint`), recorded in config.json and checked on --resume
    data_fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # type: ignore[assignment]
        self.formats = tuple(self.formats)
        for name in (
            "base",
            "data",
            "output",
            "image_encoder",
            "image_encoder_2",
            "init_from",
            "init_controlnet",
            "cache_dir",
            "sample_reference",
            "face_models",
        ):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        self.validate()

    def validate(self) -> None:
        """Reject settings that would fail late (after models are loaded) or silently mean nothing."""
        problems = []
        for name in (
            "batch_size",
            "gradient_accumulation",
            "epochs",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "cache_batch_size",
            "sample_steps",
            "lora_rank",
        ):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be at least 1 (got {self.max_steps})")
        if self.sample_every is not None and self.sample_every < 1:
            problems.append(f"sample_every must be at least 1 (got {self.sample_every})")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            problems.append(f"resolution must be a positive multiple of 8 (got {self.resolution})")
        drops = (self.drop_image, self.drop_text, self.drop_both)
        if any(p < 0 for p in drops) or sum(drops) > 1:
            problems.append(f"drop rates must be >= 0 and sum to at most 1 (got {drops})")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            problems.append(f"mixed_precision must be no, fp16 or bf16 (got {self.mixed_precision!r})")
        unknown = set(self.formats) - {"safetensors", "bin"}
        if unknown or not self.formats:
            problems.append(f"formats must be among safetensors, bin (got {list(self.formats)})")
        if self.export_dtype not in EXPORT_DTYPE_NAMES:
            problems.append(
                f"export_dtype must be one of {', '.join(EXPORT_DTYPE_NAMES)} (got {self.export_dtype!r})"
            )
        backends = face_backends()
        if self.face_backend not in backends:
            problems.append(f"face_backend must be one of {', '.join(backends)} (got {self.face_backend!r})")
        if self.stage is not None and self.stage not in (1, 2, 3):
            problems.append(f"stage must be 1, 2 or 3 (got {self.stage})")
        if self.stage == 3 and self.canonical_method == "infiniteyou":
            problems.append("infiniteyou has stages 1 (sim) and 2 (aes)")
        if self.init_from is not None and not Path(self.init_from).is_file():
            if not (self.canonical_method == "infiniteyou" and Path(self.init_from).is_dir()):
                problems.append(f"init_from {self.init_from}: no such file")
        if self.init_controlnet is not None:
            if self.canonical_method != "instantid":
                problems.append("init_controlnet (--init-controlnet) applies to instantid only")
            elif not (Path(self.init_controlnet) / "config.json").is_file():
                problems.append(
                    f"init_controlnet {self.init_controlnet}: not a diffusers ControlNet folder "
                    "(no config.json)"
                )
        if self.stage is not None and self.canonical_method not in ("instantcharacter", "infiniteyou"):
            problems.append("stage (--stage) applies to instantcharacter and infiniteyou only")
        if not self.id_loss >= 0:
            problems.append(f"id_loss must be 0 or more (got {self.id_loss})")
        elif self.id_loss and self.canonical_method != "pulid":
            problems.append(
                f"id_loss (--id-loss) applies to pulid (SDXL) only, not to {self.canonical_method}"
            )
        if self.num_workers < 0:
            problems.append("num_workers must be >= 0")
        if problems:
            raise IdcraftError("invalid training settings: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_sources(cls, file: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
        """Defaults < ``file`` (YAML or JSON) < ``overrides`` whose value is not ``None``."""
        values: dict[str, Any] = dict(read_config_file(file)) if file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(values, source=str(file) if file else "settings")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "settings") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise IdcraftError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
            )
        missing = [
            f.name
            for f in fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in normalised
        ]
        if missing:
            raise IdcraftError(f"{source}: missing required setting(s) {', '.join(missing)}.")
        try:
            return cls(**normalised)
        except (TypeError, ValueError) as exc:
            raise IdcraftError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def canonical_method(self) -> str:
        """The registry's name for ``method`` (aliases, any case); unknown names lowercased."""
        from ..registry import get_method

        try:
            return get_method(self.method).name
        except IdcraftError:
            return self.method.lower()

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def feature_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.output_dir / "cache"


def face_backends() -> tuple[str, ...]:
    """The face analysis backends :mod:`idcraft.faces` knows, read when validating (not a copy that could
    fall behind when a backend is added). Whether a backend's embeddings can train (ArcFace) is checked
    when the face data is built."""
    from ..faces.analyser import backend_names

    return backend_names()


def read_config_file(path: str | os.PathLike) -> Mapping[str, Any]:
    """A mapping from a ``.json`` or ``.yaml``/``.yml`` file (YAML needs PyYAML)."""
    path = Path(path)
    if not path.is_file():
        raise IdcraftError(f"{path}: no such config file.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise IdcraftError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a .json file."
            ) from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise IdcraftError(f"{path}: not valid YAML ({exc}).") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IdcraftError(f"{path}: not valid JSON ({exc}).") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise IdcraftError(f"{path}: expected a mapping of settings, found {type(data).__name__}.")
    return data


def check_resumable(saved: Mapping[str, Any], current: TrainConfig) -> None:
    """Refuse to resume a run whose invariant settings changed (the continuation would be a different run)."""
    now = current.to_dict()
    changed = [
        f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_INVARIANT if k in saved and saved[k] != now[k]
    ]
    if changed:
        raise IdcraftError(
            "cannot resume: settings that determine the computation changed since the checkpoint ("
            + "; ".join(changed)
            + "). Restore them, or start a new run in another --output folder."
        )


def _same_location(a: str | None, b: str | None) -> bool:
    """Whether two model/data references name the same thing: equal strings, or the same local path."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    left, right = Path(a).expanduser(), Path(b).expanduser()
    if left.exists() and right.exists():
        try:
            return left.resolve() == right.resolve()
        except OSError:
            return False
    return False


def check_same_run(saved: Mapping[str, Any], current: TrainConfig) -> None:
    """Refuse ``--resume`` into a run made with another method, base model, image encoder or dataset:
    the checkpoint's weights and data position belong to that run. Cheap (no model is loaded), so it
    runs before anything else. The data may move (same fingerprint, other path) but not change."""
    problems = []
    method = saved.get("method")
    if method is not None and method != current.canonical_method and method != current.method:
        problems.append(f"it trained --method {method}, this run asks for {current.method}")
    for name, flag in (("base", "--base"), ("image_encoder", "--image-encoder")):
        if name in saved and not _same_location(saved[name], getattr(current, name)):
            problems.append(f"it used {flag} {saved[name]}, this run names {getattr(current, name)}")
    old_print, new_print = saved.get("data_fingerprint"), current.data_fingerprint
    same_path = _same_location(saved.get("data"), current.data)
    if old_print and new_print and old_print != new_print:
        if same_path:
            problems.append(
                f"--data {current.data} changed since the run started (its files or manifest differ; "
                f"fingerprint {old_print} -> {new_print})"
            )
        else:
            problems.append(f"it trained on --data {saved.get('data')}, this run names {current.data}")
    elif not same_path and not (old_print and old_print == new_print):
        problems.append(f"it trained on --data {saved.get('data')}, this run names {current.data}")
    if problems:
        raise IdcraftError(
            f"cannot resume the run in {current.output}: "
            + "; ".join(problems)
            + ". Resume with the original settings, or start a new run in another --output folder."
        )
