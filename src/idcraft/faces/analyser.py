"""Choosing a backend and getting *the* face of a reference photo, with errors that say what to do.

Generation code calls :func:`analyse_reference` (one photo, one face) and never deals with backends'
details; ``idcraft faces`` uses :func:`get_face_analyser` and :func:`select_face` to list everything.
A photo with several faces and no face index is refused (:class:`SeveralFacesError`) rather than read as
its largest face: a group photo given as one person's reference is more likely a mistake than a choice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import FaceError
from ..images import ImageInput, load_image
from .types import Face, FaceAnalyser, NoFaceError, SeveralFacesError

#: Backends built into the library; others register themselves (:func:`register_face_backend`) or are
#: found through the ``idcraft.face_backends`` entry-point group (the offline world's ``"world"`` is).
BUILTIN_BACKENDS = ("default", "insightface")
ENTRY_POINT_GROUP = "idcraft.face_backends"

_registered: dict[str, Callable[..., FaceAnalyser]] = {}


def register_face_backend(name: str, factory: Callable[..., FaceAnalyser]) -> None:
    """Make ``factory(models_dir, **options)`` available as face backend ``name`` (``--face-backend NAME``)."""
    if name in BUILTIN_BACKENDS:
        raise ValueError(f"{name!r} is a built-in face backend.")
    _registered[name] = factory


def _plugin(name: str) -> Callable[..., FaceAnalyser] | None:
    """A registered backend, or one declared by an installed package under :data:`ENTRY_POINT_GROUP`."""
    if name in _registered:
        return _registered[name]
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            _registered[name] = entry.load()
            return _registered[name]
    return None


def backend_names() -> tuple[str, ...]:
    """Every face backend name that can be used here: built-in, registered and installed."""
    from importlib.metadata import entry_points

    names = [*BUILTIN_BACKENDS, *_registered, *(e.name for e in entry_points(group=ENTRY_POINT_GROUP))]
    return tuple(dict.fromkeys(names))


_shared: dict[tuple[Any, ...], FaceAnalyser] = {}
_shared_lock = threading.Lock()


def get_face_analyser(
    backend: str = "default",
    models_dir: str | os.PathLike | None = None,
    providers: Sequence[str] | str | None = None,
    **options: Any,
) -> FaceAnalyser:
    """A new face analyser.

    ``"default"``: offline, models from PyPI packages; boxes and keypoints for every method, embeddings NOT
    ArcFace-compatible. ``"insightface"``: an insightface model pack (``models_dir``, else
    ``~/.insightface/models/{antelopev2,buffalo_l}``; ``pack=`` picks one) run with onnxruntime on
    ``providers`` (default CUDA when available, else CPU); ArcFace embeddings for FaceID/InstantID.
    Other names are registered backends (:func:`register_face_backend`, or installed under the
    ``idcraft.face_backends`` entry points), e.g. ``"world"``: the offline world's character detector +
    recogniser, whose embeddings play ArcFace's part inside the world only. Other keyword options go to
    the backend's constructor.
    """
    if backend == "default":
        if models_dir is not None or providers is not None:
            raise FaceError(
                "models_dir (--models) and providers (--providers) apply to the insightface backend; "
                "the default backend uses the models of its Python packages."
            )
        from .default_backend import DefaultFaceAnalyser

        return DefaultFaceAnalyser(**options)
    if backend == "insightface":
        from .insightface_pack import InsightFacePackAnalyser

        return InsightFacePackAnalyser(models_dir, providers=providers, **options)
    factory = _plugin(backend)
    if factory is None:
        raise FaceError(f"unknown face backend {backend!r}; choose one of: {', '.join(backend_names())}.")
    if providers is not None:
        raise FaceError(f"providers (--providers) apply to the insightface backend, not to {backend!r}.")
    return factory(models_dir, **options)


def shared_face_analyser(
    backend: str = "default",
    models_dir: str | os.PathLike | None = None,
    providers: Sequence[str] | str | None = None,
    **options: Any,
) -> FaceAnalyser:
    """Like :func:`get_face_analyser`, but built once per set of arguments and reused (loading the models
    takes far longer than analysing a photo)."""
    key = (
        backend,
        str(Path(models_dir).expanduser().resolve()) if models_dir is not None else None,
        providers if providers is None or isinstance(providers, str) else tuple(providers),
        tuple(sorted((name, repr(value)) for name, value in options.items())),
    )
    with _shared_lock:
        if key not in _shared:
            _shared[key] = get_face_analyser(backend, models_dir, providers, **options)
        return _shared[key]


def image_name(source: ImageInput) -> str:
    """How error messages name an image: its path, or the file a PIL image was read from."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "image"
    return "array image"


def select_face(
    faces: Sequence[Face],
    face_index: int | None,
    *,
    name: str,
    analyser: FaceAnalyser,
    image_size: tuple[int, int],
) -> Face:
    """``faces[face_index]`` (0 = largest), or the only face when ``face_index`` is ``None``.

    Raises :class:`NoFaceError` naming the image and what was searched when there is no (such) face, and
    :class:`SeveralFacesError` when ``face_index`` is ``None`` and the photo shows more than one face.
    """
    if not faces:
        width, height = image_size
        raise NoFaceError(
            f"{name}: no face found. {analyser.search_limits(width, height)}. Use a photo where the face is "
            "clearly visible and roughly frontal, or crop closer to it."
        )
    if face_index is None:
        if len(faces) > 1:
            raise SeveralFacesError(
                f"{name}: {len(faces)} faces found, and the identity must be one of them: pass --face-index 0 "
                f"for the largest, 1 for the next, and so on (up to {len(faces) - 1}); or crop the photo "
                "to one face."
            )
        return faces[0]
    if not 0 <= face_index < len(faces):
        raise NoFaceError(
            f"{name}: face index {face_index} requested but {len(faces)} face(s) found "
            f"(0 = largest, up to {len(faces) - 1})."
        )
    return faces[face_index]


def analyse_reference(
    source: ImageInput,
    backend: str | FaceAnalyser = "default",
    face_index: int | None = None,
    *,
    models_dir: str | os.PathLike | None = None,
    providers: Sequence[str] | str | None = None,
    embed: bool = True,
    name: str | None = None,
    **options: Any,
) -> Face:
    """The face of a reference photo: its only face, or ``face_index`` in largest-first order (0 = the
    largest; ``None`` refuses a photo with several faces, see :func:`select_face`).

    ``backend`` is a backend name (the analyser is built once and reused, see :func:`shared_face_analyser`)
    or an analyser; ``name`` is how errors name the photo (default: its path or file name). Raises
    :class:`~idcraft.errors.ImageError` for unreadable images, :class:`NoFaceError` (a
    :class:`~idcraft.errors.FaceError`) when there is no such face and :class:`SeveralFacesError` for an
    unchosen face of a group photo. Methods that need ArcFace embeddings must still check with
    :func:`~idcraft.faces.require_arcface`.
    """
    analyser = (
        backend
        if isinstance(backend, FaceAnalyser)
        else shared_face_analyser(backend, models_dir, providers, **options)
    )
    image = load_image(source)
    faces = analyser.detect(image, embed=embed)
    return select_face(
        faces, face_index, name=name or image_name(source), analyser=analyser, image_size=image.size
    )


def analyse_references(
    sources: Sequence[ImageInput],
    backend: str | FaceAnalyser = "default",
    face_index: int | None = None,
    **kwargs: Any,
) -> list[Face]:
    """:func:`analyse_reference` for several photos of one person (average them with
    :func:`~idcraft.faces.average_embeddings`)."""
    if not sources:
        raise FaceError("no reference photos given.")
    return [analyse_reference(source, backend, face_index, **kwargs) for source in sources]
