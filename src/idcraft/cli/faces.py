"""``idcraft faces IMAGE...``: what the face analyser finds in each image.

Prints each face (box, score, 5 keypoints), largest first, or one JSON object per image with ``--json``;
optionally saves the chosen face's embedding (``--save-embeddings``) and annotated previews
(``--annotate``). Every image is processed even when some fail; the exit status is 1 when any image was
unreadable or had no (such) face, 2 when the analyser itself cannot be built (missing packages or models).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "faces",
        help="detect faces, keypoints and identity embeddings in images",
        description=(
            "Detect faces in each IMAGE and print their boxes, scores and 5 keypoints (left eye, right eye, "
            "nose, mouth left, mouth right), largest face first. The default backend works offline but its "
            "embeddings are not ArcFace-compatible (FaceID/InstantID need --backend insightface)."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to analyse")
    p.add_argument(
        "--backend",
        choices=["default", "insightface", "world"],
        default="default",
        help="default (the default): offline dlib + MediaPipe models, embeddings not ArcFace-compatible; "
        "insightface: an antelopev2/buffalo_l ONNX pack, ArcFace embeddings; world: the offline world's "
        "character analyser (embeddings play ArcFace's role inside the world only)",
    )
    p.add_argument(
        "--models",
        metavar="DIR",
        help="insightface pack folder (default: ~/.insightface/models/antelopev2, then buffalo_l)",
    )
    p.add_argument("--pack", help="insightface pack name to look for (antelopev2 or buffalo_l)")
    p.add_argument(
        "--providers",
        metavar="LIST",
        help="onnxruntime execution providers, comma-separated, e.g. cuda,cpu (default: CUDA if "
        "available, else CPU)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per image per line")
    p.add_argument(
        "--face-index",
        type=int,
        default=0,
        help="face whose embedding is saved, in largest-first order (default 0: the largest)",
    )
    p.add_argument(
        "--save-embeddings",
        metavar="DIR",
        help="write DIR/<image stem>.npy (raw embedding of the chosen face) and a .json note of its "
        "recogniser",
    )
    p.add_argument(
        "--annotate", metavar="DIR", help="write DIR/<image stem>.png with boxes and keypoints drawn"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import IdcraftError
    from ..faces import annotate_faces, get_face_analyser, select_face
    from ..images import load_image

    if args.face_index < 0:
        raise IdcraftError("--face-index must be 0 (largest face) or more.")
    options: dict[str, Any] = {}
    if args.backend == "insightface":
        options = {"models_dir": args.models, "providers": args.providers}
        if args.pack:
            options["pack"] = args.pack
    elif args.backend == "world" and not (args.providers or args.pack):
        options = {"models_dir": args.models}  # None: the bundled identity/ models
    elif args.models or args.providers or args.pack:
        raise IdcraftError("--models, --pack and --providers apply to --backend insightface only.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analyser = get_face_analyser(args.backend, **options)
    for warning in caught:
        print(f"idcraft faces: warning: {warning.message}", file=sys.stderr)
    if not args.json:
        print(f"# {analyser.describe()}")

    embed = args.save_embeddings is not None
    embeddings_dir = _output_dir(args.save_embeddings)
    annotate_dir = _output_dir(args.annotate)
    used_stems: dict[str, int] = {}
    status = 0
    for path in args.images:
        stem = _unique_stem(Path(path).stem, used_stems)
        faces: list = []
        error = None
        try:
            image = load_image(path)
            faces = analyser.detect(image, embed=embed)
            chosen = select_face(faces, args.face_index, name=path, analyser=analyser, image_size=image.size)
            if embeddings_dir is not None:
                _save_embedding(embeddings_dir, stem, path, analyser.name, args.face_index, chosen)
        except IdcraftError as exc:
            error = str(exc)
            status = 1
        if annotate_dir is not None and faces:
            annotate_faces(image, faces).save(annotate_dir / f"{stem}.png")
        _report(path, analyser.name, faces, error, as_json=args.json)
    return status


def _output_dir(name: str | None) -> Path | None:
    if name is None:
        return None
    from ..errors import IdcraftError

    folder = Path(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdcraftError(f"cannot create output folder {folder}: {exc}") from exc
    return folder


def _unique_stem(stem: str, used: dict[str, int]) -> str:
    """``stem``, or ``stem-2``, ``stem-3`` ... when two inputs share a file name (a/x.jpg, b/x.jpg)."""
    count = used.get(stem, 0) + 1
    used[stem] = count
    return stem if count == 1 else f"{stem}-{count}"


def _save_embedding(folder: Path, stem: str, image: str, backend: str, face_index: int, face) -> None:
    np.save(folder / f"{stem}.npy", face.embedding)
    note = {
        "image": image,
        "backend": backend,
        "face_index": face_index,
        "embedding_kind": face.embedding_kind,
        "embedding_model": face.embedding_model,
        "is_arcface": face.is_arcface,
        "normalized": False,
        **face.to_dict(),
    }
    (folder / f"{stem}.json").write_text(json.dumps(note, indent=2) + "\n")


def _report(path: str, backend: str, faces: list, error: str | None, *, as_json: bool) -> None:
    if as_json:
        record: dict[str, Any] = {
            "image": path,
            "backend": backend,
            "faces": [face.to_dict() for face in faces],
        }
        if error is not None:
            record["error"] = error
        print(json.dumps(record), flush=True)
    elif faces or error is None:
        print(f"{path}: {len(faces)} face(s)")
        for index, face in enumerate(faces):
            x1, y1, x2, y2 = (float(v) for v in face.bbox)
            points = " ".join(f"({x:.1f},{y:.1f})" for x, y in face.kps)
            print(
                f"  [{index}] box ({x1:.1f},{y1:.1f})-({x2:.1f},{y2:.1f}) score {face.score:.3f} kps {points}"
            )
        sys.stdout.flush()
    if error is not None:
        print(f"idcraft faces: {error}", file=sys.stderr, flush=True)
