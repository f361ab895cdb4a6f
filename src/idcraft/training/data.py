"""Training data: what a sample is, where samples come from, in which order they are seen.

Two sources:

* a folder of images with caption sidecars (``cat.png`` + ``cat.txt``), searched recursively;
* a JSONL manifest, one ``{"image": path, "text": caption, "reference": optional path}`` per line
  (relative paths are relative to the manifest's folder). With a ``reference`` the reference is what the
  adapter sees and ``image`` is the target; without, the image is its own reference (the official setup).
  An optional ``loss_mask`` (a grayscale image the size of ``image``) weights the denoising loss per
  pixel: 255 full weight, 0 ignored. Subjects that fill little of the frame (a face in a street scene)
  otherwise leave almost all of the loss, and so of the gradient, to the background.
  Face methods also read: ``reference`` as a list of paths (several photos of one person, FaceID-Portrait),
  ``embedding`` (a ``.npy`` raw ArcFace embedding, or a list, one per reference) and ``kps`` (the five
  ``[x, y]`` keypoints of the face in ``image``), so large datasets can be analysed once, offline.

Bad samples never stop a run. What can be seen cheaply is checked when the list is built (missing files,
malformed lines, an image with no caption: no ``.txt`` sidecar or no ``"text"``, or an unreadable one);
such samples are skipped. An explicitly empty caption (an empty sidecar, ``"text": ""``) trains as one
and is counted. An image that turns out to be unreadable when it is loaded is skipped then. All end in
the run's skip report (``skipped.txt``).

The order is a pure function of ``(seed, epoch)`` (:func:`epoch_order`); each process walks its own
stride of it with a *cursor*, taking the next readable samples until a batch is full. The cursor is the
whole data position, so a checkpoint holding ``(epoch, step, cursor)`` resumes exactly where a run was
killed, without replaying or re-reading anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import FaceError, IdcraftError, ImageError
from ..images import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Record:
    """One training sample as listed: the target image, its caption, the reference the adapter sees."""

    image: str
    caption: str
    reference: str | None = None
    #: every reference photo when the manifest lists several (``reference`` is the first of them)
    references: tuple[str, ...] = ()
    #: precomputed face data from the manifest (``embedding`` paths, ``kps``), read by face recipes
    face: dict = field(default_factory=dict, compare=False)
    #: grayscale per-pixel loss weights for ``image`` (255 = full weight), or None for uniform
    loss_mask: str | None = None

    @property
    def reference_paths(self) -> tuple[str, ...]:
        """All reference photos: the listed ones, else the single reference, else the image itself."""
        return self.references or (self.reference_path,)

    @property
    def reference_path(self) -> str:
        return self.reference or self.image

    def reference_key(self) -> str:
        """Identity of the reference file for the feature cache: path, size and modification time, so an
        edited or replaced file is never served stale features."""
        path = Path(self.reference_path)
        try:
            st = path.stat()
            ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            ident = f"{path}|missing"
        return hashlib.sha1(ident.encode()).hexdigest()


@dataclass
class SkipReport:
    """Samples left out of a run and why, plus samples that trained with an empty caption."""

    skipped: dict[str, str] = field(default_factory=dict)  # source -> reason
    empty_captions: list[str] = field(default_factory=list)

    def skip(self, source: str, reason: str) -> None:
        self.skipped.setdefault(source, reason)

    def merge(self, other: SkipReport) -> None:
        for source, reason in other.skipped.items():
            self.skip(source, reason)
        self.empty_captions.extend(c for c in other.empty_captions if c not in self.empty_captions)

    def lines(self) -> list[str]:
        out = [f"skipped\t{source}\t{reason}" for source, reason in sorted(self.skipped.items())]
        out += [
            f"empty-caption\t{source}\ttrained with an empty caption"
            for source in sorted(self.empty_captions)
        ]
        return out

    def write(self, path: Path) -> None:
        from ..outputs import atomic_write_text

        atomic_write_text(path, "".join(line + "\n" for line in self.lines()))


# ---------------------------------------------------------------------------- listing samples
def list_records(source: str | os.PathLike) -> tuple[list[Record], SkipReport]:
    """The samples of a folder or JSONL manifest, and what was left out while listing them."""
    path = Path(source)
    if path.is_dir():
        return _folder_records(path)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        return _manifest_records(path)
    if not path.exists():
        raise IdcraftError(f"--data {path}: no such folder or manifest.")
    raise IdcraftError(
        f"--data {path}: expected a folder of images with .txt captions, or a .jsonl manifest."
    )


def data_fingerprint(source: str | os.PathLike) -> str | None:
    """A cheap fingerprint of ``--data``, recorded in a run's ``config.json`` and checked on ``--resume``:
    a manifest's SHA-256; for a folder, the SHA-256 of its image and caption files' relative paths and
    sizes (no image is read, so it costs a directory walk). ``None`` when ``source`` does not exist."""
    path = Path(source)
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(b"manifest\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    elif path.is_dir():
        digest.update(b"folder\0")
        kinds = IMAGE_SUFFIXES | {".txt"}
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in kinds and p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\n".encode())
    else:
        return None
    return digest.hexdigest()[:16]


def _folder_records(root: Path) -> tuple[list[Record], SkipReport]:
    report = SkipReport()
    records = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            report.skip(str(image), f"no caption: no {caption_file.name} beside it")
            continue
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            report.skip(str(image), f"caption {caption_file.name} unreadable ({exc})")
            continue
        if not caption:
            report.empty_captions.append(str(image))
        records.append(Record(str(image), caption))
    return records, report


def _manifest_records(manifest: Path) -> tuple[list[Record], SkipReport]:
    report = SkipReport()
    records = []
    root = manifest.parent
    with manifest.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            where = f"{manifest}:{number}"
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                report.skip(where, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(entry, Mapping) or not isinstance(entry.get("image"), str):
                report.skip(where, 'expected an object with an "image" path')
                continue
            image = _resolve(root, entry["image"])
            if not Path(image).is_file():
                report.skip(where, f"image {image}: no such file")
                continue
            listed = entry.get("reference")
            listed = [] if listed is None else listed if isinstance(listed, list) else [listed]
            references = [_resolve(root, str(r)) for r in listed]
            missing = [r for r in references if not Path(r).is_file()]
            if missing:
                report.skip(where, f"reference {missing[0]}: no such file")
                continue
            face = _face_fields(entry, root)
            if isinstance(face, str):
                report.skip(where, face)
                continue
            loss_mask = entry.get("loss_mask")
            if loss_mask is not None:
                loss_mask = _resolve(root, str(loss_mask))
                if not Path(loss_mask).is_file():
                    report.skip(where, f"loss_mask {loss_mask}: no such file")
                    continue
            caption = entry.get("text")
            if caption is None:
                report.skip(where, 'no caption: no "text" (give "text": "" to train with an empty one)')
                continue
            if not isinstance(caption, str):
                report.skip(where, f'"text" must be a string, found {type(caption).__name__}')
                continue
            if not caption.strip():
                report.empty_captions.append(where)
            records.append(
                Record(
                    image,
                    caption.strip(),
                    references[0] if references else None,
                    tuple(references) if len(references) > 1 else (),
                    face,
                    loss_mask,
                )
            )
    return records, report


def _face_fields(entry: Mapping, root: Path) -> dict | str:
    """The manifest's precomputed face data (``embedding`` paths resolved, ``kps`` checked as 5x2), or a
    reason to skip the line."""
    face: dict = {}
    embedding = entry.get("embedding")
    if embedding is not None:
        paths = embedding if isinstance(embedding, list) else [embedding]
        face["embedding"] = tuple(_resolve(root, str(p)) for p in paths)
        missing = [p for p in face["embedding"] if not Path(p).is_file()]
        if missing:
            return f"embedding {missing[0]}: no such file"
    kps = entry.get("kps")
    if kps is not None:
        try:
            array = np.asarray(kps, dtype=np.float32)
        except (TypeError, ValueError):
            array = np.zeros(0)
        if array.shape != (5, 2) or not np.isfinite(array).all():
            return 'expected "kps" as five [x, y] keypoints'
        face["kps"] = array.tolist()
    return face


def _resolve(root: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else root / path)


# ---------------------------------------------------------------------------- images -> tensors
@dataclass(frozen=True)
class CropGeometry:
    """How :func:`resize_and_crop` maps a ``width x height`` image to the ``size x size`` training crop:
    resize to ``resized`` (w, h), then crop at ``(top, left)``. Recipes map image coordinates (face
    keypoints) into the crop with :meth:`to_crop`."""

    width: int
    height: int
    size: int
    resized: tuple[int, int]
    top: int
    left: int

    @classmethod
    def of(cls, width: int, height: int, size: int) -> CropGeometry:
        if width <= height:
            new_w, new_h = size, max(size, int(size * height / width))
        else:
            new_w, new_h = max(size, int(size * width / height)), size
        return cls(width, height, size, (new_w, new_h), (new_h - size) // 2, (new_w - size) // 2)

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """``[N, 2]`` pixel ``(x, y)`` in the original image -> the same points in the crop."""
        scale = np.array([self.resized[0] / self.width, self.resized[1] / self.height], dtype=np.float32)
        return np.asarray(points, dtype=np.float32) * scale - np.array([self.left, self.top], np.float32)


def resize_and_crop(image: Image.Image, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Short side to ``size`` (bilinear), then a centre ``size x size`` crop, as the official scripts do.
    Returns the crop and its top-left corner ``(top, left)`` (SDXL's crop-coordinate conditioning)."""
    geometry = CropGeometry.of(*image.size, size)
    resized = image.resize(geometry.resized, Image.BILINEAR)
    top, left = geometry.top, geometry.left
    return resized.crop((left, top, left + size, top + size)), (top, left)


def load_loss_mask(path: str, image_size: tuple[int, int], resolution: int) -> torch.Tensor:
    """The loss mask at ``path`` as ``[1, resolution, resolution]`` weights in ``[0, 1]``, through the very
    resize and crop its image gets, so every weight stays on the pixel it was drawn for."""
    mask = load_image(path)
    if mask.size != image_size:
        raise ImageError(
            f"{path}: loss mask is {mask.size[0]}x{mask.size[1]} but its image is "
            f"{image_size[0]}x{image_size[1]}; draw the mask at the image's size."
        )
    crop, _ = resize_and_crop(mask.convert("L"), resolution)
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0)[None]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 image -> ``[3, H, W]`` float in ``[-1, 1]`` (the VAE's input range)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


# ---------------------------------------------------------------------------- order
def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(count)`` that depends only on ``(seed, epoch)`` (PCG64 via SeedSequence:
    stable across numpy versions and platforms)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def rank_stream(count: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This process's share of the epoch order: every ``world``-th sample from position ``rank``."""
    return epoch_order(count, seed, epoch)[rank::world]


def steps_per_epoch(count: int, batch_size: int, world: int) -> int:
    """Micro-batches per process per epoch (the last incomplete global batch is dropped, as with
    ``drop_last``; it is a different one every epoch)."""
    steps = count // (batch_size * world)
    if steps < 1:
        raise IdcraftError(
            f"{count} usable samples are fewer than one global batch ({batch_size} per process x {world} "
            "processes); lower --batch-size or add data."
        )
    return steps


# ---------------------------------------------------------------------------- loading
class SampleLoader(torch.utils.data.Dataset):
    """Loads sample ``i`` of ``records`` into tensors; failures come back as ``{"error": ...}`` instead of
    raising, so a DataLoader worker never dies on a bad file and the trainer decides what to skip.

    ``reference_inputs`` turns the reference image into the recipe's encoder input (e.g. CLIP pixels);
    with a feature cache, the cached features are returned instead and the reference is not decoded.
    A preprocessor that needs more than the reference image (face recipes: the record's precomputed
    identity, keypoints mapped into the training crop) has a ``record_inputs(record, geometry)`` method,
    called instead; an exception it raises skips the sample with its message as the reason.

    When any record has a ``loss_mask``, every item carries one (all ones where a record has none), so
    batches stack.
    """

    def __init__(
        self,
        records: list[Record],
        resolution: int,
        reference_inputs: Callable[[Image.Image], dict[str, torch.Tensor]],
        features: Callable[[Record], torch.Tensor | None] | None = None,
    ):
        self.records = records
        self.resolution = resolution
        self.reference_inputs = reference_inputs
        self.features = features
        self.masked = any(record.loss_mask for record in records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            target = load_image(record.image)
            item: dict = {"index": index, "caption": record.caption}
            crop, (top, left) = resize_and_crop(target, self.resolution)
            item["pixels"] = to_tensor(crop)
            item["original_size"] = torch.tensor([target.height, target.width])
            item["crop_top_left"] = torch.tensor([top, left])
            if self.masked:
                item["loss_mask"] = (
                    load_loss_mask(record.loss_mask, target.size, self.resolution)
                    if record.loss_mask
                    else torch.ones(1, self.resolution, self.resolution)
                )
            if self.features is not None:
                cached = self.features(record)
                if cached is None:  # the reference file changed after the cache was built
                    return {
                        "index": index,
                        "error": f"{record.reference_path}: changed since its features were cached",
                    }
                item["features"] = cached
            elif hasattr(self.reference_inputs, "record_inputs"):
                geometry = CropGeometry.of(target.width, target.height, self.resolution)
                item.update(self.reference_inputs.record_inputs(record, geometry))
            else:
                reference = target if record.reference is None else load_image(record.reference)
                item.update(self.reference_inputs(reference))
            return item
        except (ImageError, FaceError) as exc:
            return {"index": index, "error": str(exc)}
        except Exception as exc:  # a decoder bug on one file must not end a week-long run
            return {"index": index, "error": f"{record.image}: cannot load ({type(exc).__name__}: {exc})"}


class _Positions(torch.utils.data.Sampler):
    """Stream positions ``start, start+1, ...`` mapped through ``stream`` cyclically, without end."""

    def __init__(self, stream: np.ndarray, start: int):
        self.stream = stream
        self.start = start

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while True:
            yield int(self.stream[position % len(self.stream)])
            position += 1


@dataclass
class DataPosition:
    """Where a process is in the data: epoch, micro-batch within it, and cursor into its stream."""

    epoch: int = 0
    step: int = 0
    cursor: int = 0


class BatchStream:
    """Batches of ``batch_size`` readable samples for one process, following :func:`rank_stream` from a
    :class:`DataPosition`, skipping (and reporting) samples that fail to load."""

    def __init__(
        self,
        loader: SampleLoader,
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        num_workers: int = 0,
        bad: dict[int, str] | None = None,
    ):
        self.loader = loader
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.num_workers = num_workers
        self.bad: dict[int, str] = dict(bad or {})  # record index -> reason, found while loading
        self.steps_per_epoch = steps_per_epoch(len(loader), batch_size, world)

    def epoch(self, position: DataPosition) -> Iterator[dict]:
        """Batches from ``position`` to the end of its epoch; ``position`` is advanced in place after each
        batch, so it is always the exact point to resume from."""
        if position.step >= self.steps_per_epoch:  # a checkpoint taken right after an epoch's last batch
            _next_epoch(position)
        stream = rank_stream(len(self.loader), self.seed, position.epoch, self.rank, self.world)
        loader = torch.utils.data.DataLoader(
            self.loader,
            batch_size=None,
            sampler=_Positions(stream, position.cursor),
            num_workers=self.num_workers,
            collate_fn=_identity,
        )
        items = iter(loader)
        try:
            while position.step < self.steps_per_epoch:
                batch, misses = [], 0
                while len(batch) < self.batch_size:
                    item = next(items)
                    position.cursor += 1
                    if "error" in item:
                        self.bad.setdefault(item["index"], item["error"])
                        misses += 1
                        if misses >= len(stream):
                            raise IdcraftError(
                                "no sample of this process's share of the data can be loaded; "
                                "see the skip report for the reasons."
                            )
                        continue
                    batch.append(item)
                position.step += 1
                yield collate(batch)
        finally:
            del items  # shuts down worker processes
        _next_epoch(position)


def _next_epoch(position: DataPosition) -> None:
    position.epoch += 1
    position.step = 0
    position.cursor = 0


def _identity(item):
    return item


def collate(items: list[dict]) -> dict:
    """Stack tensors by key; lists for everything else (indices, captions)."""
    batch: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
