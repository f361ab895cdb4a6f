"""Batch generation: a JSONL file of jobs -> images and a manifest, resumable, data-parallel.

``idcraft batch --requests jobs.jsonl --config models.yaml --output DIR``. One job per line::

    {"id": "alice-beach", "model": "faceid", "prompt": "a photo on a beach", "references": ["alice.jpg"],
     "seed": 3, "scale": 0.8, "steps": 30}

Keys are :class:`~idcraft.requests.GenerationRequest` fields (``prompt``, ``references`` or ``reference``,
``face_embeddings`` (``.npy`` paths), ``seed``, ``scale``, ``steps``, ``guidance``, ``width``, ``height``,
``negative_prompt``, ``num_images``, ``keypoints``, ...) plus ``id`` (default: the line number; letters,
digits, ``.-_`` and ``/`` for sub-folders), ``model`` (a label of ``models.yaml``; ``method`` works too;
may be left out when the config has one model) and ``recipe`` (a few-step recipe of ``models.yaml``).
Relative paths are taken from the jobs file's folder. A job without a seed gets one derived from its id
(CRC-32), so a re-run makes the same image. Settings a job leaves out come from its recipe (few-step
steps and guidance), then the model's ``defaults``, then the method's.

What is written (``DIR``):

* ``images/<id>.png`` (``<id>-<k>.png`` for several images), each written atomically;
* ``manifest.jsonl``: one record per job -- ``id``, ``index``, ``model``, ``method``, ``recipe``, ``images``
  (paths relative to ``DIR``), ``seed``, ``settings``, ``timings``, ``warnings``, ``error`` (``null`` when
  it worked), ``rank``. While running, each process appends to ``manifest.rank<R>.jsonl`` (one line per
  job, flushed); at the end rank 0 merges them into ``manifest.jsonl``. Readers take every file as one set
  (:func:`read_manifest`), so an interrupted run loses nothing.

A re-run skips every job with a successful record whose images exist, and retries failed ones. One job's
failure (an unreadable reference, no face found, out of memory) is recorded in its ``error`` and the
others go on. Jobs are grouped by (model, recipe): each model is loaded once, the jobs of one group run
``batch_size`` at a time through :meth:`~idcraft.engine.Engine.generate_batch`.

**Several processes** (``torchrun --nproc_per_node N -m idcraft batch ...`` or ``accelerate launch
--num_processes N -m idcraft batch ...``): process ``rank`` takes the jobs whose line index ``i`` has
``i % world_size == rank``, on its own device (``cuda:<local rank>``); all wait for each other at the end
and rank 0 merges the manifests. The environment's ``RANK``/``WORLD_SIZE`` decide; accelerate's
``PartialState`` sets up the process group.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IdcraftError
from .outputs import atomic_save_image, atomic_write_text, image_format
from .requests import METHOD_OPTIONS, GenerationRequest

__all__ = [
    "BatchSummary",
    "Job",
    "distributed_context",
    "finished_ids",
    "job_from_dict",
    "read_jobs",
    "read_manifest",
    "run_batch",
]

MANIFEST = "manifest.jsonl"
IMAGES = "images"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_REQUEST_KEYS = {
    "prompt",
    "negative_prompt",
    "references",
    "face_embeddings",
    "scale",
    "s_scale",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "num_images",
    "control_images",
    "controlnet_scales",
    "keypoints",
    "multi_person",
    "face_index",
    "true_cfg",
    "infusenet_start",
    "infusenet_end",
    "start_step",
    "aligned_faces",
    "face_parsings",
    "num_zero",
    "ortho",
    "sampler",
}
_JOB_KEYS = _REQUEST_KEYS | {"id", "model", "method", "recipe", "reference", "meta"}


@dataclass
class Job:
    """One line of the jobs file: its id, position, model label, recipe and request fields (paths resolved).
    ``error`` is set for a line that could not be read (recorded, never run)."""

    id: str
    index: int
    model: str | None = None
    recipe: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def seed(self) -> int:
        seed = self.fields.get("seed")
        return int(seed) if seed is not None else zlib.crc32(self.id.encode("utf-8"))

    def image_paths(self, ext: str = ".png") -> list[str]:
        count = int(self.fields.get("num_images") or 1)
        if count == 1:
            return [f"{IMAGES}/{self.id}{ext}"]
        return [f"{IMAGES}/{self.id}-{k}{ext}" for k in range(count)]


@dataclass
class BatchSummary:
    """What a run did: jobs done now, skipped as already finished, failed; its records by id (merged, all
    ranks, on rank 0; this rank's otherwise) and seconds."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    records: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1


# ---------------------------------------------------------------------------- jobs
def read_jobs(path: str | os.PathLike) -> list[Job]:
    """The jobs of a JSONL file (blank lines and ``#`` comments skipped). A line that is not a JSON object
    with known keys becomes a job carrying its ``error``; two jobs with one id are refused outright."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise IdcraftError(f"--requests {path}: cannot read it ({exc.strerror or exc}).") from exc
    jobs = []
    index = 0
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            data = json.loads(text)
        except ValueError as exc:
            jobs.append(Job(f"line-{number}", index, error=f"line {number} is not JSON ({exc})."))
        else:
            jobs.append(job_from_dict(data, index, base_dir=file.parent, where=f"line {number}"))
        index += 1
    check_unique(jobs)
    return jobs


def check_unique(jobs: Sequence[Job]) -> None:
    seen: dict[str, int] = {}
    for job in jobs:
        if job.id in seen:
            raise IdcraftError(f"job id {job.id!r} is used twice (jobs {seen[job.id]} and {job.index}).")
        seen[job.id] = job.index


def job_from_dict(data: Any, index: int, *, base_dir: Path | None = None, where: str = "job") -> Job:
    """A :class:`Job` from one parsed line; problems are kept in ``error`` rather than raised."""
    if not isinstance(data, dict):
        return Job(f"job-{index:06d}", index, error=f"{where}: expected a JSON object.")
    job_id = str(data.get("id", f"{index:06d}"))
    job = Job(job_id, index)
    if not _ID.match(job_id) or ".." in job_id or len(job_id) > 200:
        job.id = f"job-{index:06d}"
        job.error = (
            f"{where}: id {job_id!r} must be letters, digits, '.', '-', '_' (and '/' between folder names)."
        )
        return job
    unknown = sorted(set(data) - _JOB_KEYS)
    if unknown:
        job.error = f"{where}: unknown key(s) {', '.join(unknown)}."
        return job
    if "prompt" not in data or not isinstance(data["prompt"], str):
        job.error = f"{where}: a prompt (text) is required."
        return job
    values = {k: v for k, v in data.items() if k in _REQUEST_KEYS}
    references = data.get("references", [])
    if "reference" in data:
        references = [data["reference"], *references]
    if isinstance(references, str):
        references = [references]
    values["references"] = [_resolve(r, base_dir) for r in references]
    for key in ("face_embeddings", "control_images", "aligned_faces", "face_parsings"):
        if values.get(key) is not None:
            items = values[key] if isinstance(values[key], list) else [values[key]]
            values[key] = [_resolve(p, base_dir) if isinstance(p, str) else p for p in items]
    job.model = data.get("model") or data.get("method")
    job.recipe = data.get("recipe")
    job.fields = values
    job.meta = dict(data.get("meta") or {})
    return job


def _resolve(value: Any, base_dir: Path | None) -> Any:
    if not isinstance(value, str) or base_dir is None:
        return value
    text = os.path.expanduser(value)
    return text if os.path.isabs(text) else str(base_dir / text)


def build_request(job: Job, method: str, defaults: dict[str, Any]) -> GenerationRequest:
    """The job's :class:`GenerationRequest`: its fields, then ``defaults`` for what it leaves out; face
    embeddings given as ``.npy`` paths are read."""
    values = dict(job.fields)
    for key, value in defaults.items():
        if values.get(key) is None:
            values[key] = value
    embeddings = values.get("face_embeddings")
    if embeddings is not None:
        import numpy as np

        from .inputs import load_embedding

        values["face_embeddings"] = [
            load_embedding(e) if isinstance(e, str) else np.asarray(e, dtype=np.float32)
            for e in embeddings
        ]
    values["seed"] = job.seed
    for key, default in METHOD_OPTIONS.items():  # JSON null means "not given"
        if key in values and values[key] is None:
            values[key] = default
    return GenerationRequest(method=method, **values)


# ---------------------------------------------------------------------------- manifest
def _rank_manifest(output: Path, rank: int) -> Path:
    return output / f"manifest.rank{rank}.jsonl"


def read_manifest(output: str | os.PathLike) -> dict[str, dict]:
    """Every job's latest record in ``output`` (``manifest.jsonl`` and the per-rank files, read as one set;
    a successful record wins over a failed one, a torn last line is ignored)."""
    output = Path(output)
    files = [output / MANIFEST, *sorted(output.glob("manifest.rank*.jsonl"))]
    records: dict[str, dict] = {}
    for file in files:
        if not file.is_file():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or "id" not in record:
                continue
            previous = records.get(record["id"])
            if previous is None or record.get("error") is None or previous.get("error") is not None:
                records[record["id"]] = record
    return records


def finished_ids(output: str | os.PathLike, records: dict[str, dict] | None = None) -> set[str]:
    """Ids whose record is a success and whose images are all on disk."""
    output = Path(output)
    records = read_manifest(output) if records is None else records
    return {
        job_id
        for job_id, record in records.items()
        if record.get("error") is None
        and record.get("images")
        and all((output / p).is_file() for p in record["images"])
    }


def merge_manifests(output: str | os.PathLike, order: Sequence[Job] = ()) -> dict[str, dict]:
    """Merge ``manifest.jsonl`` and the per-rank files into ``manifest.jsonl`` (atomically, in job order),
    then remove the per-rank files."""
    output = Path(output)
    records = read_manifest(output)
    position = {job.id: job.index for job in order}
    ordered = sorted(
        records.values(), key=lambda r: (position.get(r["id"], r.get("index", 1 << 62)), str(r["id"]))
    )
    atomic_write_text(output / MANIFEST, "".join(json.dumps(r) + "\n" for r in ordered))
    for file in output.glob("manifest.rank*.jsonl"):
        file.unlink(missing_ok=True)
    return records


class _Appender:
    """Appends records to this rank's manifest, one flushed and fsynced line each."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


# ---------------------------------------------------------------------------- processes
@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None
    state: Any = None

    def wait_for_everyone(self) -> None:
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()


def distributed_context(device: str | None = None) -> DistributedContext:
    """This process's rank, the number of processes and its device. Under ``torchrun`` / ``accelerate
    launch`` (``WORLD_SIZE`` > 1) accelerate's ``PartialState`` joins the process group (gloo on CPU,
    NCCL on GPUs, a 48-hour barrier timeout: shards may take very different times)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistributedContext(device=device)
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device in (None, "auto") and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=timedelta(hours=48))
    chosen = device
    if device in (None, "auto"):
        chosen = str(state.device)
    return DistributedContext(
        state.process_index, state.num_processes, state.local_process_index, chosen, state
    )


# ---------------------------------------------------------------------------- running
EngineLoader = Callable[[str | None, str | None], tuple[Any, Any]]


def _default_loader(config, device: str | None, dtype: str | None) -> EngineLoader:
    from .model_config import load_engine

    def load(label: str | None, recipe: str | None):
        return load_engine(config, label, recipe, device=device, dtype=dtype)

    return load


def run_batch(
    jobs: Sequence[Job],
    config: Any,
    output: str | os.PathLike,
    *,
    batch_size: int = 4,
    device: str | None = None,
    dtype: str | None = None,
    image_ext: str = ".png",
    progress: bool | None = None,
    engine_loader: EngineLoader | None = None,
    context: DistributedContext | None = None,
    merge: bool = True,
) -> BatchSummary:
    """Run this process's share of ``jobs`` (see the module docstring) with the models of ``config`` (a
    :class:`~idcraft.model_config.ModelsConfig`); returns the summary (all ranks' records on rank 0).

    ``engine_loader(label, recipe) -> (engine, few-step settings or None)`` replaces loading from
    ``config`` (tests, or engines already held). ``merge=False`` leaves the per-rank manifests (the caller
    merges)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if batch_size < 1:
        raise IdcraftError("--batch-size must be at least 1.")
    image_format(f"x{image_ext}")
    check_unique(jobs)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    context = context or distributed_context(device)
    loader = engine_loader or _default_loader(config, context.device or device, dtype)
    mine = [job for job in jobs if job.index % context.world_size == context.rank]
    done_before = finished_ids(output)
    todo = [job for job in mine if job.id not in done_before]
    summary = BatchSummary(skipped=len(mine) - len(todo), rank=context.rank, world_size=context.world_size)
    appender = _Appender(_rank_manifest(output, context.rank))
    show = (sys.stderr.isatty() if progress is None else progress) and context.rank == 0
    bar = tqdm(total=len(todo), desc="batch", unit="image", disable=not show)

    def record(job: Job, **values: Any) -> None:
        entry = {
            "id": job.id,
            "index": job.index,
            "model": job.model,
            "recipe": job.recipe,
            "images": [],
            "seed": job.seed,
            "settings": {},
            "timings": {},
            "warnings": [],
            "error": None,
            "rank": context.rank,
            **({"meta": job.meta} if job.meta else {}),
            **values,
        }
        appender.write(entry)
        summary.records[job.id] = entry
        if entry["error"] is None:
            summary.done += 1
        else:
            summary.failed += 1
        bar.update(1)

    try:
        for job in [j for j in todo if j.error is not None]:
            record(job, error=job.error)
        for (label, recipe), group in _groups([j for j in todo if j.error is None]):
            _run_group(label, recipe, group, config, loader, output, batch_size, image_ext, record)
    finally:
        bar.close()
        appender.close()
    context.wait_for_everyone()
    if context.rank == 0 and merge:
        merged = merge_manifests(output, jobs)
        summary.records = {job.id: merged[job.id] for job in jobs if job.id in merged}
    summary.seconds = time.perf_counter() - start
    return summary


def _groups(jobs: Iterable[Job]) -> list[tuple[tuple[str | None, str | None], list[Job]]]:
    """Jobs by (model, recipe), in order of first appearance."""
    groups: dict[tuple[str | None, str | None], list[Job]] = {}
    for job in jobs:
        recipe = None if job.recipe in (None, "", "none") else job.recipe
        groups.setdefault((job.model, recipe), []).append(job)
    return list(groups.items())


def _run_group(label, recipe, group, config, loader, output, batch_size, ext, record) -> None:
    try:
        entry = _entry(config, label)
        engine, fewstep = loader(entry.label if entry is not None else label, recipe)
    except Exception as exc:  # noqa: BLE001 - recorded on every job of the group; the others go on
        what = f"{label or 'the model'}{' + ' + recipe if recipe else ''}"
        for job in group:
            record(job, error=f"cannot load {what}: {_message(exc)}")
        return
    label = entry.label if entry is not None else label
    try:
        method = engine.methods[0] if entry is None else entry.method
        defaults = {}
        if entry is not None:
            defaults.update(entry.defaults)
        if fewstep is not None:
            defaults.update(steps=fewstep.steps, guidance=fewstep.guidance)
        prepared = []
        for job in group:
            try:
                request = build_request(job, method, defaults)
                t0 = time.perf_counter()
                conditioning = engine.encode(request)
                encode_s = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - any failure is this job's, recorded
                record(job, model=label, error=_message(exc))
                continue
            from dataclasses import replace

            prepared.append((job, replace(request, conditioning=conditioning), encode_s))
        for chunk in _chunks(prepared, batch_size):
            _run_chunk(engine, chunk, output, ext, label, fewstep, record)
    finally:
        del engine
        gc.collect()
        _empty_cache()


def _entry(config, label):
    if config is None:
        return None
    return config.model(label)


def _chunks(prepared: list, size: int) -> list[list]:
    """Runs of jobs with the same settings (what one pipeline call can batch), at most ``size`` each."""
    from .engine import batch_key

    by_key: dict[tuple, list] = {}
    for item in prepared:
        key = batch_key(item[1])
        by_key.setdefault(key, []).append(item)
    out = []
    for items in by_key.values():
        out.extend(items[k : k + size] for k in range(0, len(items), size))
    return out


def _run_chunk(engine, chunk, output: Path, ext: str, label, fewstep, record) -> None:
    requests = [request for _, request, _ in chunk]
    t0 = time.perf_counter()
    try:
        results = engine.generate_batch(requests) if len(requests) > 1 else [engine.generate(requests[0])]
    except Exception:  # noqa: BLE001 - one at a time, so a failure belongs to its own job
        results = None
    seconds = time.perf_counter() - t0
    for k, (job, request, encode_s) in enumerate(chunk):
        try:
            if results is None:
                t1 = time.perf_counter()
                result = engine.generate(request)
                generate_s = time.perf_counter() - t1
            else:
                result, generate_s = results[k], seconds / len(chunk)
            t2 = time.perf_counter()
            paths = job.image_paths(ext)
            for image, path in zip(result.images, paths, strict=False):
                atomic_save_image(image, output / path, overwrite=True)
            save_s = time.perf_counter() - t2
        except Exception as exc:  # noqa: BLE001
            record(job, model=label, error=_message(exc))
            continue
        settings = {k: v for k, v in result.settings.items()}
        if fewstep is not None:
            settings["fewstep"] = fewstep.to_dict()
        record(
            job,
            model=label,
            method=result.method,
            images=paths[: len(result.images)],
            seed=result.seed,
            settings=settings,
            timings={
                "encode_s": round(encode_s, 4),
                "generate_s": round(generate_s, 4),
                "save_s": round(save_s, 4),
                "batch": len(chunk) if results is not None else 1,
            },
            warnings=list(result.warnings),
        )


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if isinstance(exc, IdcraftError) else f"{type(exc).__name__}: {text}"


def _empty_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
