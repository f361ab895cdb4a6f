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
        "recogniser; inputs sharing a file name get <stem>-2, <stem>-3 ... in the order given",
    )
    p.add_argument(
        "--annotate", metavar="DIR", help="write DIR/<image stem>.png with boxes and keypoints drawn"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files already in the --save-embeddings / --annotate folders (refused otherwise)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import IdcraftError
    from ..faces import annotate_faces, get_face_analyser, select_face
    from ..images import load_image
    from ..outputs import atomic_save_image

    if args.face_index < 0:
        raise IdcraftError("--face-index must be 0 (largest face) or more.")
    # Every output name is decided, and checked free and writable, before the analyser loads.
    stems = _unique_stems(args.images)
    embeddings_dir = _output_dir(args.save_embeddings, "--save-embeddings")
    annotate_dir = _output_dir(args.annotate, "--annotate")
    _check_outputs(stems, embeddings_dir, annotate_dir, overwrite=args.overwrite)
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
    status = 0
    for path, stem in zip(args.images, stems, strict=True):
        faces: list = []
        error = None
        try:
            image = load_image(path)
            faces = analyser.detect(image, embed=embed)
            chosen = select_face(faces, args.face_index, name=path, analyser=analyser, image_size=image.size)
            if embeddings_dir is not None:
                _save_embedding(
                    embeddings_dir, stem, path, analyser.name, args.face_index, chosen, args.overwrite
                )
        except IdcraftError as exc:
            error = str(exc)
            status = 1
        if annotate_dir is not None and faces:
            atomic_save_image(
                annotate_faces(image, faces), annotate_dir / f"{stem}.png", overwrite=args.overwrite
            )
        _report(path, analyser.name, faces, error, as_json=args.json)
    return status


def _output_dir(name: str | None, flag: str) -> Path | None:
    """The folder ``name``, created and proven writable (or ``None`` when the flag was not given)."""
    if name is None:
        return None
    from ..errors import OutputError
    from ..outputs import check_writable_folder

    folder = Path(name)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder}: is a file; give a folder to write into.")
    return check_writable_folder(folder, flag=flag)


def _unique_stems(images: list[str]) -> list[str]:
    """One output name per input: the file's stem, or ``stem-2``, ``stem-3`` ... (the first free one, in the
    order given) when inputs share a file name (a/x.jpg, b/x.jpg), compared without case so that
    case-insensitive file systems cannot merge them either. Each renamed input is reported on stderr."""
    used: set[str] = set()
    stems = []
    for path in images:
        stem = base = Path(path).stem
        number = 1
        while stem.casefold() in used:
            number += 1
            stem = f"{base}-{number}"
        used.add(stem.casefold())
        if stem != base:
            print(
                f"idcraft faces: note: {path} shares its file name with an earlier input; its outputs are "
                f"named {stem}.*",
                file=sys.stderr,
            )
        stems.append(stem)
    return stems


def _check_outputs(
    stems: list[str], embeddings: Path | None, annotate: Path | None, *, overwrite: bool
) -> None:
    """Refuse, before any work, to replace existing output files unless ``--overwrite``."""
    from ..errors import OutputError

    planned = []
    for stem in stems:
        if embeddings is not None:
            planned += [embeddings / f"{stem}.npy", embeddings / f"{stem}.json"]
        if annotate is not None:
            planned.append(annotate / f"{stem}.png")
    for path in planned:
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; cannot write a file there.")
    existing = [str(p) for p in planned if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise OutputError(
            f"{', '.join(existing[:3])}{more} already exist; pass --overwrite to replace them, or choose "
            "another folder."
        )


def _save_embedding(
    folder: Path, stem: str, image: str, backend: str, face_index: int, face, overwrite: bool
) -> None:
    from ..outputs import atomic_save_npy, atomic_write_text

    atomic_save_npy(face.embedding, folder / f"{stem}.npy", overwrite=overwrite)
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
    atomic_write_text(folder / f"{stem}.json", json.dumps(note, indent=2) + "\n", overwrite=overwrite)


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
