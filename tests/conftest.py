"""Shared test set-up: offline hub, tiny models, and the shared reference fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IDCRAFT_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A file under the shared material (``../shared`` beside the checkout); skips the test when absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared material not found: {path} (set IDCRAFT_SHARED)")
    return path


@pytest.fixture
def sd15():
    from idcraft.tiny import tiny_sd15_pipeline

    return tiny_sd15_pipeline()


@pytest.fixture
def sdxl():
    from idcraft.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture
def encoder():
    from idcraft.encoders import ClipImageEncoder
    from idcraft.tiny import tiny_image_encoder

    return ClipImageEncoder(tiny_image_encoder())


@pytest.fixture
def reference_image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    img = np.stack([x * 2 % 256, y * 2 % 256, (x + y) % 256], -1).astype(np.uint8)
    img[30:60, 40:80] = rng.integers(0, 255, size=(30, 40, 3))
    return Image.fromarray(img)


@pytest.fixture(scope="session")
def tiny_face_pack(tmp_path_factory) -> Path:
    """An antelopev2-like pack of tiny ONNX models (detector + ArcFace recogniser); the tiny detector reads
    a white square as a face (:func:`tests.faces.tiny_onnx.tiny_face_photo`)."""
    for module in ("cv2", "onnxruntime", "onnx"):
        pytest.importorskip(module)
    from .faces.tiny_onnx import build_arcface, build_scrfd

    folder = tmp_path_factory.mktemp("pack") / "antelopev2"
    build_scrfd(folder / "scrfd_10g_bnkps.onnx")
    build_arcface(folder / "glintr100.onnx")
    return folder
