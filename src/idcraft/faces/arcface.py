"""ArcFace recognisers of the insightface packs (``glintr100.onnx``, ``w600k_r50.onnx``) run with onnxruntime.

As insightface's ``ArcFaceONNX``: the face is aligned with :func:`~idcraft.faces.align.norm_crop` to the
model's input size (112), normalised ``(pixel - mean) / std`` in RGB order, and the raw (not normalised)
output is the embedding. Models converted from MXNet carry their own normalisation (a ``Sub``/``Mul`` pair
among the first graph nodes) and take 0..255 input; insightface detects that by node names, and so do we
when the ``onnx`` package is installed. The two recognisers FaceID and InstantID use are known to take
``mean = std = 127.5``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceError
from .align import norm_crop

logger = logging.getLogger(__name__)

#: Recognisers whose input normalisation is known, so their graph need not be inspected.
KNOWN_NORMALISATION: dict[str, tuple[float, float]] = {
    "glintr100.onnx": (127.5, 127.5),
    "w600k_r50.onnx": (127.5, 127.5),
}


def input_normalisation(path: str | Path) -> tuple[float, float]:
    """``(mean, std)`` the recogniser at ``path`` expects, decided as insightface decides it."""
    path = Path(path)
    if path.name in KNOWN_NORMALISATION:
        return KNOWN_NORMALISATION[path.name]
    try:
        import onnx
    except ImportError:
        logger.warning(
            "%s: 'onnx' is not installed, so the input normalisation of this unknown recogniser "
            "cannot be checked; assuming mean 127.5, std 127.5.",
            path.name,
        )
        return 127.5, 127.5
    model = onnx.load(str(path), load_external_data=False)
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(name.startswith(("Sub", "_minus")) for name in names)
    has_mul = any(name.startswith(("Mul", "_mul")) for name in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class ArcFaceRecognizer:
    """An ArcFace ONNX session: aligned face crops in, raw identity embeddings out."""

    def __init__(
        self, session: Any, path: str | Path, normalisation: tuple[float, float] | None = None
    ) -> None:
        self.session = session
        self.path = Path(path)
        inputs = session.get_inputs()
        outputs = session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) != 4 or shape[2] != shape[3] or not isinstance(shape[2], int) or len(outputs) != 1:
            raise FaceError(
                f"{self.path}: not an ArcFace recogniser (expected one square NCHW input such as 1x3x112x112 "
                f"and one embedding output; got inputs {[i.shape for i in inputs]}, {len(outputs)} outputs)."
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_size = int(shape[2])
        self.mean, self.std = normalisation or input_normalisation(self.path)
        dim = outputs[0].shape[-1]
        self.embedding_dim = int(dim) if isinstance(dim, int) else None

    @property
    def model_name(self) -> str:
        return self.path.name

    def embed(self, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """The raw embedding of the face at ``kps`` (5x2) in the RGB image ``rgb``."""
        crop = norm_crop(rgb, kps, self.input_size)
        return self.embed_aligned([crop])[0]

    def embed_aligned(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Raw embeddings ``(N, D)`` of already aligned RGB crops of the model's input size."""
        batch = np.stack([np.asarray(crop, dtype=np.float32) for crop in crops])
        if batch.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"aligned crops must be {self.input_size}x{self.input_size}x3, got {batch.shape[1:]}."
            )
        blob = ((batch - self.mean) / self.std).transpose(0, 3, 1, 2)
        # Run one crop at a time: the packs' recognisers are exported with batch size 1.
        out = [
            self.session.run([self.output_name], {self.input_name: blob[i : i + 1]})[0]
            for i in range(len(blob))
        ]
        return np.concatenate(out).reshape(len(blob), -1).astype(np.float32)
