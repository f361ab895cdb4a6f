"""Per-image face-analysis time for each backend.

    python benchmarks/face_analysis.py [--repeat 10] [--models DIR] [--providers cuda,cpu]

* default backend (dlib + MediaPipe face mesh): the test photos in tests/data, as stored (256 px) and
  upscaled to 1024 px, with and without the embedding;
* insightface backend: on a real pack when ``--models DIR`` is given; otherwise on TINY GENERATED STAND-IN
  ONNX models (the tests' models, built here with torch.onnx): those numbers measure idcraft's pre/post-
  processing and onnxruntime overhead only, not the cost of the real SCRFD-10G / ArcFace-R100 networks.

Reports the median and minimum of ``--repeat`` runs after one warm-up run. Plain script, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def timed(function: Callable[[], object], repeat: int) -> tuple[float, float, object]:
    result = function()  # warm-up (first-call allocations, delegate creation)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000, min(samples) * 1000, result


def row(label: str, median_ms: float, min_ms: float, faces: object) -> None:
    count = len(faces) if isinstance(faces, list) else "?"
    print(f"  {label:<52} {median_ms:9.1f} ms  (min {min_ms:7.1f})  faces={count}")


def photos() -> list[tuple[str, Image.Image]]:
    out = []
    for path in sorted(DATA.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        out.append((f"{path.name} {image.width}x{image.height}", image))
        scale = 1024 / max(image.size)
        big = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
        )
        out.append((f"{path.name} upscaled {big.width}x{big.height}", big))
    return out


def bench_default(repeat: int) -> None:
    from idcraft.faces import get_face_analyser

    start = time.perf_counter()
    analyser = get_face_analyser("default")
    built = 1000 * (time.perf_counter() - start)
    print(f"default backend: {analyser.describe()}")
    print(f"  {'build (load models)':<52} {built:9.1f} ms")
    for label, image in photos():
        row(f"{label}, with embedding", *timed(lambda image=image: analyser.detect(image), repeat))
        row(
            f"{label}, boxes+kps only",
            *timed(lambda image=image: analyser.detect(image, embed=False), repeat),
        )


def tiny_pack(folder: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.faces.tiny_onnx import build_arcface, build_scrfd

    pack = folder / "antelopev2"
    build_scrfd(pack / "scrfd_10g_bnkps.onnx")
    build_arcface(pack / "glintr100.onnx")
    return pack


def bench_insightface(repeat: int, models: str | None, providers: str | None) -> None:
    from idcraft.faces import get_face_analyser
    from idcraft.faces.onnx_runtime import ProviderWarning

    with tempfile.TemporaryDirectory() as tmp:
        if models is None:
            label = "TINY GENERATED STAND-IN MODELS (overhead only, not real model compute)"
            pack = tiny_pack(Path(tmp))
        else:
            label = f"pack {models}"
            pack = Path(models)
        with warnings.catch_warnings():
            warnings.simplefilter("always", ProviderWarning)
            start = time.perf_counter()
            analyser = get_face_analyser("insightface", models_dir=pack, providers=providers)
            built = 1000 * (time.perf_counter() - start)
        print(f"insightface backend on {label}: {analyser.describe()}")
        print(f"  {'build (load models)':<52} {built:9.1f} ms")
        images = photos() if models is not None else stand_in_photos()
        for name, image in images:
            row(f"{name}, with embedding", *timed(lambda image=image: analyser.detect(image), repeat))
            row(
                f"{name}, boxes+kps only",
                *timed(lambda image=image: analyser.detect(image, embed=False), repeat),
            )


def stand_in_photos() -> list[tuple[str, Image.Image]]:
    """Black pictures with one white square where the stand-in detector's stride-32 cell (row 3, column 5)
    of the 640 px detector input falls: exactly one "face" for the stand-in models."""
    out = []
    for width, height in ((256, 256), (1024, 1024), (1920, 1080)):
        scale = 640 / max(width, height)
        image = Image.new("RGB", (width, height))
        box = tuple(round(v / scale) for v in (160 - 2, 96 - 2, 192 + 2, 128 + 2))
        image.paste((255, 255, 255), box)
        out.append((f"synthetic {width}x{height}", image))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--models", help="a real insightface pack folder (antelopev2 / buffalo_l)")
    parser.add_argument(
        "--providers", help="onnxruntime providers for the insightface backend, e.g. cuda,cpu"
    )
    parser.add_argument("--backend", choices=["all", "default", "insightface"], default="all")
    args = parser.parse_args()
    if args.backend in ("all", "default"):
        bench_default(args.repeat)
    if args.backend in ("all", "insightface"):
        bench_insightface(args.repeat, args.models, args.providers)


if __name__ == "__main__":
    main()
