"""Face analysis with insightface model packs (antelopev2, buffalo_l) and onnxruntime alone.

The ``insightface`` package needs a C++ build and pulls in heavy dependencies; what FaceID and InstantID
actually need from it is two ONNX models: an SCRFD detector and an ArcFace recogniser. This backend finds
them in a pack folder, runs them with onnxruntime and reproduces insightface's ``FaceAnalysis`` results
(detector size 640, score threshold 0.5, NMS 0.4), adding retries at smaller detector sizes for close-ups.

Packs: ``antelopev2`` (``scrfd_10g_bnkps.onnx`` + ``glintr100.onnx``) is what InstantID was trained with;
``buffalo_l`` (``det_10g.onnx`` + ``w600k_r50.onnx``) is what IP-Adapter FaceID was trained with. Both are
distributed by the insightface project for non-commercial research only; idcraft does not download them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import FaceError
from ..images import ImageInput, load_image
from . import onnx_runtime
from .arcface import ArcFaceRecognizer
from .scrfd import SCRFD, SMALLEST_ANCHOR
from .types import ARCFACE, Face, FaceAnalyser, sort_largest_first

#: Packs looked for under ``~/.insightface/models`` when no folder is given, in this order.
DEFAULT_PACKS = ("antelopev2", "buffalo_l")
#: Detector files, most preferred first.
DETECTOR_FILES = ("scrfd_10g_bnkps.onnx", "det_10g.onnx", "det_2.5g.onnx", "det_500m.onnx")
#: Recogniser files, most preferred first, and what they are for.
RECOGNIZER_FILES = {
    "glintr100.onnx": "antelopev2, used by InstantID",
    "w600k_r50.onnx": "buffalo_l, used by IP-Adapter FaceID",
    "w600k_mbf.onnx": "buffalo_s/buffalo_sc",
}
#: Other models of the packs (3D/2D landmarks, gender/age): not needed, never loaded.
UNUSED_FILES = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")


def insightface_models_root() -> Path:
    """Where insightface keeps its packs, ``~/.insightface/models``; ``$IDCRAFT_INSIGHTFACE_HOME/models`` when
    that variable is set (a shared or read-only model store)."""
    home = os.environ.get("IDCRAFT_INSIGHTFACE_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".insightface") / "models"


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*.onnx") if path.is_file()) if folder.is_dir() else []


def _subfolders(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if child.is_dir()) if folder.is_dir() else []


def find_model_pack(models_dir: str | os.PathLike | None = None, pack: str | None = None) -> Path:
    """The folder holding a pack's ``.onnx`` files.

    ``models_dir`` may be the pack folder itself, a folder with the pack one level deeper (the zip often
    unpacks to ``antelopev2/antelopev2/*.onnx``), or insightface's root holding ``models/<pack>``. Without
    ``models_dir`` the pack (``pack``, else antelopev2 then buffalo_l) is looked for in
    :func:`insightface_models_root`, also one folder too deep. The error lists the places looked at.
    """
    packs = (pack,) if pack else DEFAULT_PACKS
    if models_dir is not None:
        base = Path(models_dir).expanduser()
        if not base.is_dir():
            raise FaceError(f"insightface model folder {base} does not exist (or is not a folder).")
        candidates = [base, *(base / name for name in packs), *(base / "models" / name for name in packs)]
    else:
        root = insightface_models_root()
        candidates = [root / name for name in packs]
    for folder in candidates:
        if _onnx_files(folder):
            return folder
    # One folder too deep: inside the pack-named folders first, then any folder in the one named.
    deeper = candidates[1:] + candidates[:1] if models_dir is not None else candidates
    for folder in deeper:
        for option in sorted(_subfolders(folder), key=lambda child: child.name not in packs):
            if _onnx_files(option):
                return option
    listed = "\n  ".join(f"{path} (and the folders in it)" for path in candidates)
    raise FaceError(
        f"no insightface model pack found ({' or '.join(packs)}): no .onnx files in\n  {listed}\n"
        "Put the pack's .onnx files (antelopev2 for InstantID, buffalo_l for IP-Adapter FaceID; both "
        "non-commercial research licence) in one of these folders, or name the folder (`idcraft faces --models DIR`, "
        "`idcraft generate/train --face-models DIR`, models_dir= in Python). With a saved ArcFace embedding "
        "(`--face-embedding FILE.npy`) no pack is needed."
    )


def classify_pack(folder: Path) -> tuple[Path, Path | None]:
    """The detector and recogniser files of a pack folder (recogniser None when the pack has none).

    Known file names decide without loading anything; other ``.onnx`` files are opened and classified the
    way insightface's model router does (5+ outputs: detector; 112x112 input: recogniser).
    """
    files = _onnx_files(folder)
    names = {path.name: path for path in files}
    detector = next((names[name] for name in DETECTOR_FILES if name in names), None)
    recognizer = next((names[name] for name in RECOGNIZER_FILES if name in names), None)
    known = set(DETECTOR_FILES) | set(RECOGNIZER_FILES) | set(UNUSED_FILES)
    for path in files:
        if detector is not None and recognizer is not None:
            break
        if path.name in known:
            continue
        session = onnx_runtime.create_session(path, [onnx_runtime.CPU])
        outputs, shape = session.get_outputs(), session.get_inputs()[0].shape
        if detector is None and len(outputs) >= 5:
            detector = path
        elif recognizer is None and len(shape) == 4 and shape[2] == 112 and shape[3] == 112:
            recognizer = path
    if detector is None:
        found = ", ".join(path.name for path in files) or "no .onnx files"
        raise FaceError(
            f"{folder}: no SCRFD face detector in this model pack (found: {found}). "
            f"Expected one of {', '.join(DETECTOR_FILES)}."
        )
    return detector, recognizer


class InsightFacePackAnalyser(FaceAnalyser):
    """SCRFD + ArcFace from an insightface pack, with onnxruntime; embeddings are ArcFace (``is_arcface``)."""

    embedding_kind = ARCFACE

    def __init__(
        self,
        models_dir: str | os.PathLike | None = None,
        *,
        pack: str | None = None,
        providers: Sequence[str] | str | None = None,
        det_size: int = 640,
        retry_sizes: Sequence[int] = (480, 320),
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
    ) -> None:
        self.pack_dir = find_model_pack(models_dir, pack)
        self.providers = onnx_runtime.resolve_providers(providers)
        detector_path, recognizer_path = classify_pack(self.pack_dir)
        self.detector = SCRFD(onnx_runtime.create_session(detector_path, self.providers), detector_path)
        self.recognizer = (
            ArcFaceRecognizer(onnx_runtime.create_session(recognizer_path, self.providers), recognizer_path)
            if recognizer_path is not None
            else None
        )
        if self.recognizer is None:
            self.embedding_kind = None
        self.det_thresh = det_thresh
        self.nms_thresh = nms_thresh
        if self.detector.fixed_input_size is not None:
            self.det_sizes: tuple[int, ...] = (max(self.detector.fixed_input_size),)
        else:
            sizes = [det_size] + [size for size in retry_sizes if size < det_size]
            self.det_sizes = tuple(dict.fromkeys(int(size) for size in sizes))
        self.name = f"insightface:{self.pack_dir.name}"
        #: Execution providers the sessions really run on (what onnxruntime accepted).
        self.active_providers = list(self.detector.session.get_providers())

    def detect(self, image: ImageInput, *, embed: bool = True) -> list[Face]:
        rgb = np.asarray(load_image(image))
        dets = np.zeros((0, 5), np.float32)
        kpss = np.zeros((0, 5, 2), np.float32)
        for size in self.det_sizes:
            dets, kpss = self.detector.detect(rgb, (size, size), self.det_thresh, self.nms_thresh)
            if len(dets):
                break
        faces = []
        for det, kps in zip(dets, kpss, strict=True):
            embedding = None
            if embed and self.recognizer is not None:
                embedding = self.recognizer.embed(rgb, kps)
            faces.append(
                Face(
                    bbox=det[:4],
                    score=float(det[4]),
                    kps=kps,
                    embedding=embedding,
                    embedding_kind=ARCFACE if embedding is not None else None,
                    embedding_model=self.recognizer.model_name if embedding is not None else None,
                    backend=self.name,
                )
            )
        return sort_largest_first(faces)

    def search_limits(self, width: int, height: int) -> str:
        sizes = ", ".join(str(size) for size in self.det_sizes)
        smallest = SMALLEST_ANCHOR * max(width, height) / max(self.det_sizes)
        return (
            f"SCRFD ({self.detector.path.name}) was run at detector size(s) {sizes} px (score >= "
            f"{self.det_thresh}); at {max(self.det_sizes)} px it finds faces down to about "
            f"{SMALLEST_ANCHOR} px there, i.e. about {smallest:.0f} px in this {width}x{height} image"
        )

    def describe(self) -> str:
        recognizer = (
            f"{self.recognizer.model_name} "
            f"(ArcFace, {RECOGNIZER_FILES.get(self.recognizer.model_name, 'custom recogniser')})"
            if self.recognizer is not None
            else "no recogniser"
        )
        return (
            f"{self.name}: detector {self.detector.path.name}, recogniser {recognizer}; "
            f"onnxruntime providers {', '.join(self.active_providers)}"
        )
