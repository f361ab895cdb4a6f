"""onnxruntime sessions with execution providers chosen explicitly and reported.

onnxruntime quietly runs on CPU when a requested provider cannot be used (not installed: ``onnxruntime``
instead of ``onnxruntime-gpu``; or installed but CUDA/cuDNN libraries missing). A face analysis that takes
seconds instead of milliseconds with no explanation is a support ticket, so here every request that cannot
be honoured produces a :class:`ProviderWarning` naming what was asked, what is available and what to install.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import FaceError
from ._optional import import_optional

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: Short names accepted for ``--providers`` / ``providers=``.
PROVIDER_ALIASES = {
    "cpu": CPU,
    "cuda": CUDA,
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


class ProviderWarning(UserWarning):
    """A requested onnxruntime execution provider is not available; another one is used instead."""


def onnxruntime() -> ModuleType:
    return import_optional("onnxruntime", "onnxruntime", "The insightface-pack face backend")


def _canonical(name: str) -> str:
    name = name.strip()
    return PROVIDER_ALIASES.get(name.lower(), name)


def resolve_providers(
    requested: Sequence[str] | str | None = None, available: Sequence[str] | None = None
) -> list[str]:
    """The execution providers to use, most preferred first.

    ``None`` picks CUDA when onnxruntime offers it, else CPU. An explicit list keeps its order; providers
    that this onnxruntime cannot offer are dropped with a :class:`ProviderWarning` (never silently), and
    CPU is appended as the last resort so a session can always be created.
    """
    if available is None:
        available = onnxruntime().get_available_providers()
    available = list(available)
    if requested is None:
        return [CUDA, CPU] if CUDA in available else [CPU]
    if isinstance(requested, str):
        requested = [part for part in requested.split(",") if part.strip()]
    wanted = [_canonical(name) for name in requested]
    if not wanted:
        raise FaceError(
            "no execution provider was named (expected e.g. 'cuda', 'cpu' or 'CUDAExecutionProvider')."
        )
    missing = [name for name in wanted if name not in available]
    chosen = [name for name in dict.fromkeys(wanted) if name in available]
    if missing:
        hint = (
            " For CUDA install 'onnxruntime-gpu' (in place of 'onnxruntime') with matching CUDA/cuDNN."
            if CUDA in missing
            else ""
        )
        fallback = chosen[0] if chosen else CPU
        warnings.warn(
            f"onnxruntime execution provider(s) {', '.join(missing)} requested but not available "
            f"(available: {', '.join(available) or 'none'}); face analysis will run on {fallback}.{hint}",
            ProviderWarning,
            stacklevel=2,
        )
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def create_session(path: str | Path, providers: Sequence[str]) -> Any:
    """An ``InferenceSession`` for ``path`` on ``providers``; warns when onnxruntime dropped one of them."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's own warnings are not actionable here
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
        raise FaceError(
            f"{path}: cannot load this ONNX model with onnxruntime ({exc}). "
            "The file may be truncated: download it again."
        ) from exc
    active = session.get_providers()
    dropped = [name for name in providers if name != CPU and name not in active]
    if dropped:
        warnings.warn(
            f"{Path(path).name}: onnxruntime could not start {', '.join(dropped)} (check the CUDA/cuDNN "
            f"libraries onnxruntime-gpu needs); running on {', '.join(active)}.",
            ProviderWarning,
            stacklevel=2,
        )
    return session
