"""What a run will need, known before anything is loaded: parameter counts from safetensors headers.

FLUX.1 (12B) + T5-XXL (4.8B) + SigLIP + DINOv2-giant + the 2.8B-parameter adapter do not fit everywhere, and
finding out after minutes of loading is the worst way to learn it. :func:`estimate_memory` reads the
parameter count of every component from its safetensors header (the JSON at the front of the file: names,
dtypes and shapes, no weights) or, where a folder has no safetensors, by building the model on the meta
device from its config; multiplies by the run's dtype; and places the weights where the chosen offload
mode puts them:

* no offload: every weight on the device;
* ``model`` (diffusers ``enable_model_cpu_offload``): the largest component at a time on the GPU (the FLUX
  transformer with the adapter's attention layers), the rest in RAM; the encoders and the projector's
  timestep-independent half visit the GPU once per reference;
* ``sequential`` (``enable_sequential_cpu_offload``): one layer at a time on the GPU (the largest single
  weight, or the largest of the encoders / projector half, which visit whole), everything in RAM.

Activations are a rough allowance (transformer tokens x width, the VAE decode at full resolution), so the
figure is an estimate, not a promise; weights dominate it and are exact.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import IdcraftError
from ..flux_base import FLUX_COMPONENTS

GiB = 1024**3
#: Python, torch, CUDA context and allocator slack, per device.
BASELINE_RAM = 2 * GiB
BASELINE_GPU = int(0.75 * GiB)
LABELS = {
    "transformer": "FLUX transformer",
    "text_encoder": "CLIP text",
    "text_encoder_2": "T5",
    "vae": "VAE",
    "siglip": "SigLIP",
    "dinov2": "DINOv2",
    "projector": "projector",
    "resampler": "resampler",
    "attention": "adapter attention",
}


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one component: the total and the largest single tensor."""

    total: int
    largest: int


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 1024**2:
            raise IdcraftError(f"{path}: not a safetensors file (header length {length}).")
        return json.loads(f.read(length))


def _shapes_from_safetensors(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        for name, info in _header(file).items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    return shapes


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files ``from_pretrained`` would read (no variant such as ``.fp16``), if any."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    return []


def _count(shapes) -> ParamCount:
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return ParamCount(sum(sizes), max(sizes, default=0))


def folder_params(folder: str | os.PathLike, model_class=None) -> ParamCount:
    """Parameters of a model folder: from its safetensors headers, else ``model_class`` built on the meta
    device from the folder's config."""
    folder = Path(folder)
    files = _weight_files(folder)
    if files:
        return _count(_shapes_from_safetensors(files).values())
    if model_class is None:
        raise IdcraftError(f"{folder}: no safetensors weights to read the parameter count from.")
    if hasattr(model_class, "load_config"):  # diffusers
        config = model_class.load_config(str(folder))
        with torch.device("meta"):
            model = model_class.from_config(config)
    else:  # transformers
        config = model_class.config_class.from_pretrained(str(folder))
        with torch.device("meta"):
            model = model_class(config)
    return _count(p.shape for p in model.parameters())


def adapter_params(path: str | os.PathLike) -> dict[str, ParamCount]:
    """The adapter file's parameters, split as they are placed: ``projector`` (the timestep-independent
    half), ``resampler`` and ``attention`` (the per-block layers). ``.bin`` files are memory-mapped: only
    their shapes are read."""
    path = Path(path)
    if path.suffix == ".safetensors":
        shapes = _shapes_from_safetensors([path])
    else:
        from ..checkpoints import load_torch_file

        data = load_torch_file(path, mmap=True)
        shapes = {
            f"{g}.{k}": tuple(t.shape) for g, d in data.items() if isinstance(d, dict) for k, t in d.items()
        }
    parts: dict[str, list] = {"projector": [], "resampler": [], "attention": []}
    for name, shape in shapes.items():
        if name.startswith("ip_adapter."):
            parts["attention"].append(shape)
        elif name.startswith("image_proj.resampler."):
            parts["resampler"].append(shape)
        else:
            parts["projector"].append(shape)
    return {k: _count(v) for k, v in parts.items()}


def flux_params(base: str | os.PathLike) -> dict[str, ParamCount]:
    """Parameters of each weight-holding component of a local FLUX pipeline folder."""
    import importlib

    base = Path(base)
    index = json.loads((base / "model_index.json").read_text())
    counts = {}
    for name in FLUX_COMPONENTS:
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            continue
        model_class = getattr(importlib.import_module(entry[0]), entry[1], None)
        counts[name] = folder_params(base / name, model_class)
    return counts


@dataclass
class MemoryEstimate:
    """Where the weights of a run go and how much memory that takes, against what is free."""

    params: dict[str, ParamCount]
    dtype: torch.dtype
    device: torch.device
    offload: str
    activations: int  # bytes, rough
    gpu_free: int | None = None
    ram_free: int | None = None
    alternatives: dict[str, int] = field(default_factory=dict)  # offload mode -> GPU bytes
    labels: dict[str, str] = field(default_factory=dict)  # a method's own names for its parts

    #: Components that stay on the GPU when offloading (small, used at every step).
    RESIDENT = ("resampler",)
    #: Components that visit the GPU whole, once per reference, when offloading.
    VISITING = ("siglip", "dinov2", "projector")
    #: Components that go to the GPU together with the FLUX transformer (the adapter's per-block layers).
    WITH_TRANSFORMER = ("attention",)
    #: Groups that pass through RAM together on their way to the GPU (no offload), beside each FLUX component.
    RAM_GROUPS = (("siglip", "dinov2"), ("projector", "resampler", "attention"))

    @property
    def bytes_per_param(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _bytes(self, *names: str) -> int:
        return sum(self.params[n].total for n in names if n in self.params) * self.bytes_per_param

    @property
    def total_params(self) -> int:
        return sum(p.total for p in self.params.values())

    @property
    def on_gpu(self) -> bool:
        return self.device.type != "cpu"

    @property
    def gpu_bytes(self) -> int:
        """Peak GPU memory (0 on CPU)."""
        if not self.on_gpu:
            return 0
        resident = self._bytes(*self.RESIDENT) + self.activations + BASELINE_GPU
        visiting = max(self._bytes(n) for n in self.VISITING)
        if self.offload == "model":
            largest = max(
                self._bytes("transformer", *self.WITH_TRANSFORMER),
                self._bytes("text_encoder_2"),
                self._bytes("text_encoder"),
                visiting,
            )
            return largest + resident
        if self.offload == "sequential":
            layer = max(p.largest for p in self.params.values()) * self.bytes_per_param
            return max(layer, visiting) + resident
        return self._bytes(*self.params) + self.activations + BASELINE_GPU

    @property
    def ram_bytes(self) -> int:
        """Peak system RAM: everything when running on the CPU or offloading; otherwise one FLUX component,
        the two encoders or the adapter at a time pass through RAM on their way to the GPU."""
        if not self.on_gpu:
            return self._bytes(*self.params) + self.activations + BASELINE_RAM
        if self.offload in ("model", "sequential"):
            return self._bytes(*self.params) + BASELINE_RAM
        groups = [(n,) for n in FLUX_COMPONENTS] + list(self.RAM_GROUPS)
        return max(self._bytes(*group) for group in groups) + BASELINE_RAM

    def summary(self) -> str:
        labels = {**LABELS, **self.labels}
        parts = ", ".join(f"{labels.get(n, n)} {_number(p.total)}" for n, p in self.params.items())
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [
            f"memory estimate ({dtype}, offload {self.offload}, on {self.device}): {_number(self.total_params)} "
            f"parameters ({parts})"
        ]
        need = []
        if self.on_gpu:
            need.append(f"≈ {self.gpu_bytes / GiB:.1f} GiB GPU memory" + _free(self.gpu_free))
        need.append(f"≈ {self.ram_bytes / GiB:.1f} GiB RAM" + _free(self.ram_free, "available"))
        lines.append("  needs " + ", ".join(need))
        return "\n".join(lines)

    def fits(self) -> bool:
        gpu_ok = not self.on_gpu or self.gpu_free is None or self.gpu_bytes <= self.gpu_free
        ram_ok = self.ram_free is None or self.ram_bytes <= self.ram_free
        return gpu_ok and ram_ok

    def check(self) -> None:
        """Raise a clear :class:`IdcraftError` when the run does not fit, with what would."""
        if self.fits():
            return
        problems = []
        if self.on_gpu and self.gpu_free is not None and self.gpu_bytes > self.gpu_free:
            problems.append(
                f"≈ {self.gpu_bytes / GiB:.1f} GiB of GPU memory needed, {self.gpu_free / GiB:.1f} GiB free"
            )
        if self.ram_free is not None and self.ram_bytes > self.ram_free:
            problems.append(
                f"≈ {self.ram_bytes / GiB:.1f} GiB of RAM needed, {self.ram_free / GiB:.1f} GiB available"
            )
        hints = []
        if self.on_gpu and self.gpu_free is not None and self.gpu_bytes > self.gpu_free:
            for mode, need in self.alternatives.items():
                if mode != self.offload and need < self.gpu_bytes:
                    hints.append(f"--offload {mode} (≈ {need / GiB:.1f} GiB GPU)")
        if self.bytes_per_param > 2:
            hints.append("--dtype bfloat16 (half the memory)")
        hint = f" Try {' or '.join(hints)}." if hints else ""
        raise IdcraftError(
            f"this run does not fit in memory: {'; '.join(problems)}.{hint} (Estimate from the parameter counts; "
            "--skip-memory-check runs anyway.)"
        )


def _number(count: int) -> str:
    """``11.90B``, ``428.2M``, ``96.3K``: parameter counts at a glance."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.{2 if unit == 'B' else 1}f}{unit}"
    return str(count)


def _free(value: int | None, word: str = "free") -> str:
    return f" ({value / GiB:.1f} GiB {word})" if value is not None else ""


def free_memory(device: torch.device) -> tuple[int | None, int | None]:
    """``(free GPU bytes or None, available RAM bytes or None)``."""
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        ram = psutil.virtual_memory().available
    except ImportError:
        ram = None
    return gpu, ram


def vae_scale_factor(vae_config: dict) -> int:
    """Pixels per latent position, as ``FluxPipeline`` computes it from the VAE's block count."""
    return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)


def activation_bytes(
    transformer_config: dict, vae_config: dict, dtype: torch.dtype, width: int, height: int
) -> int:
    """A rough allowance for activations: ~16 live tensors of (text + image tokens) x width in a block,
    and the VAE decoder's widest layers at full resolution."""
    size = torch.empty((), dtype=dtype).element_size()
    scale = vae_scale_factor(vae_config) * 2  # FLUX packs 2 x 2 latents into one token
    tokens = (height // scale) * (width // scale) + 512
    inner = transformer_config.get("num_attention_heads", 24) * transformer_config.get(
        "attention_head_dim", 128
    )
    channels = min(vae_config.get("block_out_channels", [128]))
    return 16 * tokens * inner * size + 6 * height * width * channels * size


def estimate_memory(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    siglip: str | os.PathLike,
    dinov2: str | os.PathLike,
    *,
    device: torch.device,
    dtype: torch.dtype,
    offload: str = "none",
    width: int | None = None,
    height: int | None = None,
) -> MemoryEstimate | None:
    """The estimate for local folders and files; ``None`` when something is a hub id (nothing to read)."""
    from transformers import Dinov2Model, SiglipVisionModel

    local = all(Path(p).exists() for p in (base, adapter, siglip, dinov2))
    if not local or not (Path(base) / "model_index.json").is_file():
        return None
    params = flux_params(base)
    params["siglip"] = folder_params(siglip, SiglipVisionModel)
    params["dinov2"] = folder_params(dinov2, Dinov2Model)
    params.update(adapter_params(adapter))
    transformer_config = json.loads((Path(base) / "transformer" / "config.json").read_text())
    vae_config = json.loads((Path(base) / "vae" / "config.json").read_text())
    side = 128 * vae_scale_factor(vae_config)  # FluxPipeline's default size (1024 for FLUX.1)
    activations = activation_bytes(transformer_config, vae_config, dtype, width or side, height or side)
    gpu_free, ram_free = free_memory(device)
    estimate = MemoryEstimate(params, dtype, device, offload, activations, gpu_free, ram_free)
    for mode in ("none", "model", "sequential"):
        estimate.alternatives[mode] = MemoryEstimate(params, dtype, device, mode, activations).gpu_bytes
    return estimate
