"""``idcraft eval`` on real models, and ``idcraft compare``.

An evaluation is a grid of **cells** -- model x few-step recipe x adapter scale x steps (and the ``copy``
baseline: the reference itself, which every identity score rates perfect and the copy score must flag)
-- each run on the same **items**: every subject (a reference photo, optionally a second photo of the same
person) x prompt x seed, with the same seeds in every cell (paired comparisons). Generation goes through
:mod:`idcraft.batch` (so it resumes, and splits across processes under ``torchrun``/``accelerate
launch``); then every output is scored (:mod:`.scores`) and each cell's results are written atomically to
``cells/<cell>.json``. A cell whose file exists with the same items and scoring settings is not redone; a
cell with a new prompt or subject reuses the images it already has.

Output folder: ``eval.json`` (everything), ``eval.csv`` and ``eval.md`` (one row per cell; the Markdown
adds identity per few-step recipe), ``scatter.png`` (identity against prompt score, a point per cell),
``grid.png`` (the first items of every cell under their references), ``cells/``, ``generation/`` (the
batch output: ``images/``, ``manifest.jsonl``). ``compare.png`` for ``idcraft compare``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IdcraftError
from .scores import ScoringSettings

__all__ = [
    "Cell",
    "GridSettings",
    "Subject",
    "plan_cells",
    "read_prompts",
    "read_subjects",
    "run_compare",
    "run_eval",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
BASELINES = ("copy",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", str(text)).strip("-.") or "x"


# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Subject:
    """A reference photo, optionally a second photo of the same subject (the ground truth, never shown to
    the model) and prompts of its own (default: the evaluation's)."""

    id: str
    reference: str
    ground_truth: str | None = None
    prompts: tuple[str, ...] | None = None


def read_subjects(path: str | os.PathLike) -> list[Subject]:
    """Subjects from a folder or a JSONL manifest.

    Folder: every image is a subject named by its stem; ``NAME.gt.EXT`` beside ``NAME.EXT`` is its second
    photo. Every sub-folder with images is a subject too: its first image (sorted by name) the reference,
    the second the ground truth. JSONL: ``{"id": ..., "reference": ..., "ground_truth": ..., "prompts":
    [...]}`` per line (``ground_truth``, ``prompts`` optional; relative paths from the file's folder)."""
    source = Path(path).expanduser()
    if source.is_dir():
        subjects = _subjects_from_folder(source)
    elif source.is_file():
        subjects = _subjects_from_manifest(source)
    else:
        raise IdcraftError(f"--references {path}: no such folder or file.")
    if not subjects:
        raise IdcraftError(f"--references {path}: no reference images found.")
    ids = [s.id for s in subjects]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise IdcraftError(f"--references {path}: subject id(s) {', '.join(twice)} used twice.")
    return subjects


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subjects_from_folder(folder: Path) -> list[Subject]:
    files = _images_in(folder)
    gts = {p.name[: -len(".gt" + p.suffix)]: p for p in files if p.stem.endswith(".gt")}
    subjects = [
        Subject(_safe(p.stem), str(p), str(gts[p.stem]) if p.stem in gts else None)
        for p in files
        if not p.stem.endswith(".gt")
    ]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _images_in(sub)
        if images:
            subjects.append(
                Subject(_safe(sub.name), str(images[0]), str(images[1]) if len(images) > 1 else None)
            )
    return subjects


def _subjects_from_manifest(file: Path) -> list[Subject]:
    subjects = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise IdcraftError(f"{file} line {number}: not JSON ({exc}).") from exc
        if not isinstance(data, dict) or not data.get("reference"):
            raise IdcraftError(f"{file} line {number}: expected an object with a reference.")
        unknown = sorted(set(data) - {"id", "reference", "ground_truth", "gt", "prompts"})
        if unknown:
            raise IdcraftError(f"{file} line {number}: unknown key(s) {', '.join(unknown)}.")

        def resolve(value: str) -> str:
            text = os.path.expanduser(str(value))
            return text if os.path.isabs(text) else str(file.parent / text)

        gt = data.get("ground_truth") or data.get("gt")
        prompts = data.get("prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        subjects.append(
            Subject(
                _safe(data.get("id") or Path(str(data["reference"])).stem),
                resolve(data["reference"]),
                resolve(gt) if gt else None,
                tuple(str(p) for p in prompts) if prompts else None,
            )
        )
    return subjects


def read_prompts(values: Sequence[str]) -> list[str]:
    """Prompts from each value: a ``.txt`` file (one per line, ``#`` comments), a ``.json`` list, or the
    prompt itself."""
    prompts: list[str] = []
    for value in values:
        path = Path(os.path.expanduser(str(value)))
        if path.is_file():
            if path.suffix.lower() == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, list):
                    raise IdcraftError(f"--prompts {value}: expected a JSON list of prompts.")
                prompts.extend(str(p) for p in data)
            else:
                lines = path.read_text(encoding="utf-8").splitlines()
                prompts.extend(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
        else:
            prompts.append(str(value))
    return prompts


# ---------------------------------------------------------------------------- the grid
@dataclass
class GridSettings:
    """The evaluation grid: models (labels of models.yaml; default all), recipes (``none`` = without),
    scales, steps (``None``: the method's default; recipes use their own), seeds, size, baselines."""

    models: list[str] | None = None
    scales: list[float] = field(default_factory=lambda: [1.0])
    steps: list[int | None] = field(default_factory=lambda: [None])
    guidance: float | None = None
    recipes: list[str] = field(default_factory=lambda: ["none"])
    seeds: list[int] = field(default_factory=lambda: [0])
    width: int | None = None
    height: int | None = None
    negative_prompt: str = ""
    baselines: list[str] = field(default_factory=lambda: ["copy"])
    batch_size: int = 4
    sample_columns: int = 6
    #: Which face of each reference photo the face methods take (0 = largest); ``None``: each photo must
    #: show one face, as for ``idcraft generate``.
    face_index: int | None = None

    _KEYS = (
        "models",
        "scales",
        "steps",
        "guidance",
        "recipes",
        "seeds",
        "width",
        "height",
        "negative_prompt",
        "baselines",
        "batch_size",
        "sample_columns",
        "face_index",
        "references",
        "prompts",
    )

    @classmethod
    def resolve(cls, section: dict | None, **given: Any) -> GridSettings:
        """Settings from the config's ``grid`` section, overridden by ``given`` values that are not
        ``None`` (the command line's flags)."""
        section = dict(section or {})
        unknown = sorted(set(section) - set(cls._KEYS))
        if unknown:
            raise IdcraftError(f"grid: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(cls._KEYS)}.")
        values = {k: v for k, v in section.items() if k not in ("references", "prompts")}
        values.update({k: v for k, v in given.items() if v is not None})
        settings = cls(**values)
        for name in ("scales", "steps", "recipes", "seeds", "baselines", "models"):
            value = getattr(settings, name)
            if value is not None and not isinstance(value, (list, tuple)):
                setattr(settings, name, [value])
        settings.scales = [float(s) for s in settings.scales]
        settings.steps = [None if s in (None, "default") else int(s) for s in settings.steps] or [None]
        settings.seeds = [int(s) for s in settings.seeds]
        settings.recipes = [str(r) for r in settings.recipes] or ["none"]
        for baseline in settings.baselines:
            if baseline not in BASELINES:
                raise IdcraftError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}.")
        if not settings.seeds:
            raise IdcraftError("give at least one seed.")
        if any(s is not None and s < 1 for s in settings.steps) or settings.batch_size < 1:
            raise IdcraftError("--steps and --batch-size must be at least 1.")
        return settings


@dataclass(frozen=True)
class Cell:
    """One configuration: a model (or a baseline) with a recipe, scale, steps and guidance."""

    model: str
    recipe: str | None = None
    scale: float | None = None
    steps: int | None = None
    guidance: float | None = None
    kind: str = "method"
    method: str | None = None

    @property
    def id(self) -> str:
        if self.kind != "method":
            return _safe(f"baseline__{self.model}")
        parts = [
            self.model,
            self.recipe or "none",
            f"s{self.scale:g}" if self.scale is not None else "sdef",
            f"n{self.steps}" if self.steps is not None else "ndef",
            f"g{self.guidance:g}" if self.guidance is not None else "gdef",
        ]
        return "__".join(_safe(p) for p in parts)

    @property
    def label(self) -> str:
        if self.kind != "method":
            return f"{self.model} (baseline)"
        text = self.model
        if self.recipe:
            text += f" + {self.recipe}"
        if self.scale is not None:
            text += f" @ {self.scale:g}"
        if self.steps is not None:
            text += f", {self.steps} steps"
        if self.guidance is not None:
            text += f", cfg {self.guidance:g}"
        return text


def plan_cells(config, grid: GridSettings) -> list[Cell]:
    """Every cell of the grid, in table order: per model, without recipe then each recipe that applies to
    it, scales, steps; then the baselines."""
    from ..fewstep import recommended_settings

    labels = grid.models or list(config.models)
    cells: list[Cell] = []
    for label in labels:
        entry = config.model(label)
        for recipe_name in grid.recipes:
            recipe = config.recipe(recipe_name)
            if recipe is None:
                steps_list, guidance = grid.steps, grid.guidance
            elif not recipe.applies_to(entry):
                continue
            else:
                steps_list = recipe.steps or [recommended_settings(recipe.recipe, recipe.lora)[0]]
                guidance = recommended_settings(recipe.recipe, recipe.lora, guidance=recipe.guidance)[1]
            for scale in grid.scales:
                for steps in steps_list:
                    cells.append(
                        Cell(
                            entry.label,
                            recipe.name if recipe else None,
                            scale,
                            steps,
                            guidance,
                            "method",
                            entry.method,
                        )
                    )
    cells.extend(Cell(name, kind="baseline") for name in grid.baselines)
    if not cells:
        raise IdcraftError("nothing to evaluate: no models and no baselines.")
    return cells


@dataclass(frozen=True)
class Item:
    """One image of a cell: whose reference, which prompt and seed, and its batch job id."""

    cell: Cell
    subject: Subject
    prompt_index: int
    prompt: str
    seed: int

    def key(self, grid: GridSettings) -> str:
        text = "\n".join(
            map(
                str,
                (
                    self.subject.reference,
                    self.prompt,
                    self.seed,
                    grid.negative_prompt,
                    grid.width,
                    grid.height,
                ),
            )
        )
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]

    def job_id(self, grid: GridSettings) -> str:
        return f"{self.cell.id}/{self.subject.id}/p{self.prompt_index}-s{self.seed}-{self.key(grid)}"


def plan_items(
    cells: Sequence[Cell], subjects: Sequence[Subject], prompts: Sequence[str], grid: GridSettings
):
    """``{cell id: [Item, ...]}``: every subject x its prompts x seeds, the same in every cell."""
    out = {}
    for cell in cells:
        items = []
        for subject in subjects:
            own = list(subject.prompts) if subject.prompts else list(prompts)
            if not own:
                raise IdcraftError(f"no prompts for subject {subject.id}: give --prompts.")
            for k, prompt in enumerate(own):
                for seed in grid.seeds:
                    items.append(Item(cell, subject, k, prompt, seed))
        out[cell.id] = items
    return out


# ---------------------------------------------------------------------------- running
def run_eval(
    config,
    subjects: Sequence[Subject],
    prompts: Sequence[str],
    output: str | os.PathLike,
    grid: GridSettings,
    scoring: ScoringSettings,
    *,
    device: str | None = None,
    dtype: str | None = None,
    engine_loader=None,
    progress: bool | None = None,
    context=None,
) -> dict | None:
    """Generate what is missing, score what is not scored, write the report; returns it (``None`` on
    processes other than rank 0 of a multi-process run, which only generate)."""
    from tqdm.auto import tqdm

    from ..batch import Job, distributed_context, read_manifest, run_batch
    from ..methods import reads_faces
    from ..outputs import atomic_write_text

    start = time.perf_counter()
    output = Path(output)
    cells = plan_cells(config, grid)
    items = plan_items(cells, subjects, prompts, grid)
    fingerprint = scoring.fingerprint()
    cell_dir, gen_dir = output / "cells", output / "generation"
    pending = [c for c in cells if not _finished(cell_dir / f"{c.id}.json", items[c.id], grid, fingerprint)]

    jobs, index = [], 0
    for cell in cells:
        for item in items[cell.id]:
            if cell.kind == "method" and cell in pending:
                fields = {"prompt": item.prompt, "references": [item.subject.reference], "seed": item.seed}
                fields.update(scale=cell.scale, steps=cell.steps, guidance=cell.guidance)
                fields.update(negative_prompt=grid.negative_prompt, width=grid.width, height=grid.height)
                if grid.face_index is not None and reads_faces(cell.method):
                    fields["face_index"] = grid.face_index
                fields = {k: v for k, v in fields.items() if v is not None}
                jobs.append(Job(item.job_id(grid), index, cell.model, cell.recipe, fields))
            index += 1
    context = context or distributed_context(device)
    show = sys.stderr.isatty() if progress is None else progress
    if jobs:
        run_batch(
            jobs,
            config,
            gen_dir,
            batch_size=grid.batch_size,
            device=context.device or device,
            dtype=dtype,
            progress=show,
            engine_loader=engine_loader,
            context=context,
        )
    if context.rank != 0:
        return None

    records = read_manifest(gen_dir) if jobs else {}
    notes: list[str] = []
    if pending:
        from .scores import Scorer

        scorer = Scorer(scoring if scoring.device else _with_device(scoring, context.device or device))
        notes.extend(scorer.notes)
        embeddings: dict[str, Any] = {}
        for cell in tqdm(pending, desc="score", unit="cell", disable=not show):
            result = _score_cell(
                cell, items[cell.id], grid, scorer, embeddings, records, gen_dir, fingerprint
            )
            atomic_write_text(cell_dir / f"{cell.id}.json", json.dumps(result, indent=1) + "\n")

    rows, per_cell = [], {}
    for cell in cells:
        data = json.loads((cell_dir / f"{cell.id}.json").read_text())
        per_cell[cell.id] = data
        rows.append(data["row"])
    report = {
        "settings": {
            "grid": {k: v for k, v in asdict(grid).items()},
            "scoring": fingerprint,
            "subjects": [asdict(s) for s in subjects],
            "prompts": list(prompts),
            "config": getattr(config, "source", None),
        },
        "rows": rows,
        "notes": notes,
        "generated_cells": len([c for c in pending if c.kind == "method"]),
        "generated_images": len(jobs),
        "seconds": round(time.perf_counter() - start, 1),
    }
    _write_reports(report, per_cell, cells, items[cells[0].id], subjects, output, grid)
    return report


def _with_device(scoring: ScoringSettings, device: str | None) -> ScoringSettings:
    from dataclasses import replace

    return replace(scoring, device=device)


def _finished(path: Path, items: Sequence[Item], grid: GridSettings, fingerprint: dict) -> bool:
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return False
    return (
        data.get("items") == [i.job_id(grid) for i in items]
        and data.get("scoring") == fingerprint
        and not data.get("errors")
        and "row" in data
    )


def _score_cell(cell, items, grid, scorer, embeddings, records, gen_dir: Path, fingerprint) -> dict:
    from .scores import aggregate

    images, prompts, subjects, kept, errors, seconds = [], [], [], [], [], []
    used: dict = {}  # the settings a generated image was made with (the method's defaults filled in)
    for item in items:
        if cell.kind != "method":  # the copy baseline: the reference itself
            path = item.subject.reference
        else:
            record = records.get(item.job_id(grid))
            if record is None or record.get("error") is not None or not record.get("images"):
                errors.append(
                    {
                        "id": item.job_id(grid),
                        "error": "not generated" if record is None else record.get("error"),
                    }
                )
                continue
            path = str(gen_dir / record["images"][0])
            used = used or record.get("settings") or {}
            timings = record.get("timings") or {}
            seconds.append(float(timings.get("encode_s", 0.0)) + float(timings.get("generate_s", 0.0)))
        key = item.subject.id
        if key not in embeddings:
            embeddings[key] = scorer.subject(item.subject.reference, item.subject.ground_truth)
        images.append(path)
        prompts.append(item.prompt)
        subjects.append(embeddings[key])
        kept.append(item)
    scores = scorer.score(images, prompts, subjects) if images else []
    summary = aggregate(scores, scorer.settings.copy_threshold)
    row = {
        "label": cell.label,
        "kind": cell.kind,
        "model": cell.model,
        "method": cell.method,
        "recipe": cell.recipe,
        "scale": cell.scale,
        "steps": cell.steps if cell.steps is not None else used.get("steps"),
        "guidance": cell.guidance if cell.guidance is not None else used.get("guidance"),
        **summary,
        "seconds_per_image": (sum(seconds) / len(seconds)) if seconds else None,
        "errors": len(errors),
    }
    per_image = [
        {
            "id": item.job_id(grid),
            "subject": item.subject.id,
            "prompt": item.prompt,
            "seed": item.seed,
            "image": path,
            **(
                {k: v for k, v in s.items()}
                | {"copied": s["copy"] is not None and s["copy"] > scorer.settings.copy_threshold}
            ),
        }
        for item, path, s in zip(kept, images, scores, strict=True)
    ]
    return {
        "cell": asdict(cell) | {"id": cell.id, "label": cell.label},
        "items": [i.job_id(grid) for i in items],
        "scoring": fingerprint,
        "row": row,
        "images": per_image,
        "errors": errors,
    }


# ---------------------------------------------------------------------------- reports
def _write_reports(
    report: dict, per_cell: dict, cells, first_items, subjects, output: Path, grid: GridSettings
) -> None:
    from ..outputs import atomic_save_image, atomic_write_text
    from .grid import sample_grid
    from .report import fewstep_table, format_table, scatter, write_csv

    rows = report["rows"]
    atomic_write_text(output / "eval.json", json.dumps(report, indent=2) + "\n")
    write_csv(rows, output / "eval.csv")
    plot = scatter(rows, output / "scatter.png")
    if plot is None:
        report["notes"].append("no scatter plot: it needs the prompt score (--clip) and an identity score.")
    markdown = [
        "# idcraft eval",
        "",
        f"{len(subjects)} subject(s) x {len(report['settings']['prompts'])} prompt(s) x {len(grid.seeds)} seed(s) "
        f"per cell; {report['generated_images']} image(s) generated in this run, {report['seconds']:.0f} s.",
        "",
        "face = share of outputs with a face found; SimRef/SimGT = ArcFace cosine to the reference / to the "
        "other photo of the person; copy = (θ(out,gt) - θ(out,ref)) / θ(ref,gt) in ArcFace angles (1 = the "
        f"reference pasted, 0 = a new photo); copied = share with copy > {report['settings']['scoring']['copy_threshold']:g}; "
        "CLIP-T = prompt score; CLIP-I, DINO = image similarity to the reference; s/img = seconds per image.",
        "",
        format_table(rows),
        "",
    ]
    table = fewstep_table(rows)
    if table:
        markdown += [table, ""]
    markdown += [f"Note: {n}" for n in report["notes"]]
    atomic_write_text(output / "eval.md", "\n".join(markdown) + "\n")
    # the sample sheet: the first items, same columns in every row
    columns = [(i.subject.id, i.prompt, i.seed) for i in first_items][: grid.sample_columns]
    by_subject = {s.id: s for s in subjects}
    header = [("reference", [by_subject[c[0]].reference for c in columns])]
    if any(by_subject[c[0]].ground_truth for c in columns):
        header.append(
            ("ground truth (not shown to the models)", [by_subject[c[0]].ground_truth for c in columns])
        )
    lines = []
    for cell in cells:
        data = per_cell[cell.id]
        found = {(i["subject"], i["prompt"], i["seed"]): i["image"] for i in data.get("images", [])}
        row = data["row"]
        scores = [
            f"{name} {row[key]:.3f}"
            for name, key in (("SimRef", "sim_ref"), ("copy", "copy"), ("CLIP-T", "clip_t"), ("DINO", "dino"))
            if row.get(key) is not None
        ]
        label = (
            cell.label
            + ("\n" + ", ".join(scores[:2]) if scores else "")
            + ("\n" + ", ".join(scores[2:]) if len(scores) > 2 else "")
        )
        lines.append((label, [found.get(c) for c in columns]))
    seeds = " (seed {})" if len(grid.seeds) > 1 else ""
    titles = [f"{c[0]}: {c[1]}" + seeds.format(c[2]) for c in columns]
    atomic_save_image(
        sample_grid(lines, header=header, column_titles=titles), output / "grid.png", overwrite=True
    )


# ---------------------------------------------------------------------------- compare
def run_compare(
    config,
    reference: str,
    prompt: str,
    output: str | os.PathLike,
    grid: GridSettings,
    scoring: ScoringSettings,
    *,
    ground_truth: str | None = None,
    tile: int = 256,
    **kwargs: Any,
) -> dict | None:
    """One reference and prompt through every cell of ``grid`` (first seed), side by side in
    ``compare.png`` with each image's scores under it; the evaluation's files are written too."""
    from dataclasses import replace

    from ..outputs import atomic_save_image
    from .grid import compare_grid

    grid = replace(grid, seeds=grid.seeds[:1], sample_columns=1)
    subject = Subject(_safe(Path(reference).stem), str(reference), ground_truth)
    report = run_eval(config, [subject], [prompt], output, grid, scoring, **kwargs)
    if report is None:
        return None
    output = Path(output)
    columns = [("reference", reference, [])]
    if ground_truth:
        columns.append(("ground truth (not shown)", ground_truth, []))
    for cell in plan_cells(config, grid):
        data = json.loads((output / "cells" / f"{cell.id}.json").read_text())
        image = data["images"][0] if data.get("images") else None
        lines = (
            [] if image is not None else [f"error: {(data.get('errors') or [{}])[0].get('error', '?')}"[:60]]
        )
        if image is not None:
            for name, key in (
                ("SimRef", "sim_ref"),
                ("SimGT", "sim_gt"),
                ("copy", "copy"),
                ("CLIP-T", "clip_t"),
                ("CLIP-I", "clip_i"),
                ("DINO", "dino"),
            ):
                if image.get(key) is not None:
                    flag = "  COPY" if key == "copy" and image.get("copied") else ""
                    lines.append(f"{name} {image[key]:.3f}{flag}")
            if image.get("face") is False:
                lines.append("no face found")
        seconds = data["row"].get("seconds_per_image")
        if seconds is not None:
            lines.append(f"{seconds:.2f} s")
        columns.append((cell.label, None if image is None else image["image"], lines))
    sheet = compare_grid(columns, title=prompt, tile=tile)
    atomic_save_image(sheet, output / "compare.png", overwrite=True)
    report["compare"] = str(output / "compare.png")
    return report
