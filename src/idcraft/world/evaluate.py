"""``idcraft eval``: how much identity each method transfers, and what it costs in prompt following.

On held-out identities (never seen by any training run) and ``K`` fixed random scenes each, every adapter
method generates at each adapter scale -- low scales follow the prompt, high scales copy the reference:
the fidelity/editability trade-off -- and the baselines are measured in the same run, with the same
requests and noise seeds (:mod:`.generate`). The judge (:mod:`.judge`) reads every output:

* **identity accuracy**: the fraction of the reference's attributes it sees in the output, over all
  attributes, the coarse ones (also named in the caption) and the fine ones (only in the reference);
* **prompt accuracy**: the fraction of the requested scene attributes it sees.

Writes ``eval.json`` (everything), ``eval.md`` (the table), ``eval.png`` (prompt accuracy on x, identity
accuracy on y, one line per method across scales, baselines as points) and ``samples.png`` (the first
outputs of every configuration).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import IdcraftError
from . import bundle
from .arrays import SCENE_NAMES, attribute_labels
from .generate import (
    ADAPTER_METHODS,
    BASELINES,
    DEFAULT_BATCH,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    Request,
    WorldGenerator,
    available_methods,
)
from .identity import held_out_ids, stable_hash
from .scene import SCENE_ATTRIBUTES, random_scene

if TYPE_CHECKING:
    from .judge import Judge

DEFAULT_SCALES: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
DEFAULT_SCENES_PER_ID = 4
BASELINE_LABELS = {
    "text-scene": "text, scene only",
    "text-coarse": "text, coarse identity",
    "copy": "copy reference",
    "vae": "render through the VAE (latent ceiling)",
    "render": "world render (ceiling)",
}


def eval_requests(ids: Sequence[int], scenes_per_id: int, seed: int = 0) -> list[Request]:
    """``scenes_per_id`` random scenes per identity and a noise seed per image, fixed by ``seed``."""
    requests = []
    for i in ids:
        for k in range(scenes_per_id):
            rng = np.random.default_rng(stable_hash("idcraft-eval", seed, int(i), k))
            requests.append(Request(int(i), random_scene(rng), int(rng.integers(2**31))))
    return requests


def score(judge: Judge, images: np.ndarray, requests: Sequence[Request]) -> dict:
    """Identity accuracy (all / coarse / fine), prompt accuracy and every head's hit rate on ``images``."""
    from .judge import identity_accuracy, per_attribute_accuracy, prompt_accuracy

    predicted = judge.predict(images)
    reference = np.array([attribute_labels(r.identity.attributes()) for r in requests])
    scene = np.array(
        [[SCENE_ATTRIBUTES[n].index(getattr(r.scene, n)) for n in SCENE_NAMES] for r in requests]
    )
    return {
        "identity": identity_accuracy(predicted, reference),
        "prompt": prompt_accuracy(predicted, scene),
        "per_attribute": per_attribute_accuracy(predicted, reference, scene),
    }


def evaluate(
    output: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    baselines: Sequence[str] = BASELINES,
    ids: int | Sequence[int] | None = None,
    scenes_per_id: int = DEFAULT_SCENES_PER_ID,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    bundle_root: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH,
    prompt: str = "coarse",
    device: str | None = "auto",
    progress: bool = True,
) -> dict:
    """Run the evaluation and write its files into ``output``; returns what ``eval.json`` holds.

    ``methods``: adapter methods (default: every one the bundle has). ``ids``: held-out ids, or an int N
    for the first N of them (default all). Each configuration (method x scale, then each baseline) sees
    the same requests.
    """
    from tqdm.auto import tqdm

    from .judge import Judge

    start = time.perf_counter()
    root = Path(bundle_root) if bundle_root is not None else bundle.bundle_dir()
    generator = WorldGenerator(root, device=device)
    judge = Judge.load(bundle.bundle_path(bundle.JUDGE, root), device=generator.device)
    methods = list(available_methods(root) if methods is None else methods)
    for method in methods:
        if method not in ADAPTER_METHODS:
            raise IdcraftError(f"unknown method {method!r}; choose from {', '.join(ADAPTER_METHODS)}.")
    for name in baselines:
        if name not in BASELINES:
            raise IdcraftError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}.")
    if not methods and not baselines:
        raise IdcraftError("nothing to evaluate: no methods and no baselines.")
    if scenes_per_id < 1:
        raise IdcraftError("--scenes-per-id must be at least 1.")
    held = held_out_ids()
    chosen = list(held[:ids] if isinstance(ids, int) else held if ids is None else ids)
    if not chosen:
        raise IdcraftError("no identities to evaluate (--ids must be at least 1).")
    requests = eval_requests(chosen, scenes_per_id, seed)
    configs = [(m, float(s)) for m in methods for s in scales] + [(b, None) for b in baselines]

    results, samples = [], []
    bar = tqdm(configs, desc="eval", unit="config", disable=not progress)
    for method, scale in bar:
        bar.set_postfix_str(f"{method}" + (f" @ {scale:g}" if scale is not None else ""))
        t0 = time.perf_counter()
        images = generator.generate(
            method,
            requests,
            scale=1.0 if scale is None else scale,
            prompt=prompt,
            steps=steps,
            guidance=guidance,
            batch_size=batch_size,
        )
        seconds = time.perf_counter() - t0
        row = {
            "method": method,
            "scale": scale,
            "kind": "adapter" if scale is not None else "baseline",
            **score(judge, images, requests),
            "images": len(images),
            "seconds": round(seconds, 2),
        }
        results.append(row)
        samples.append(images[: min(8, len(images))])
        bar.set_postfix_str(f"{method} id {row['identity']['all']:.2f} prompt {row['prompt']:.2f}")

    report = {
        "settings": {
            "methods": methods,
            "scales": [float(s) for s in scales],
            "baselines": list(baselines),
            "ids": chosen,
            "scenes_per_id": scenes_per_id,
            "images_per_config": len(requests),
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "prompt": prompt,
            "batch_size": batch_size,
            "bundle": str(root),
            "device": str(generator.device),
        },
        "judge": judge.metrics.get("held_out_accuracy", {}),
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_report(report, output, samples)
    return report


# ---------------------------------------------------------------------------- outputs
def font(size: int = 11):
    """Pillow's bundled scalable font at ``size`` px (the fixed bitmap font on Pillow without FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _label(row: dict) -> str:
    return row["method"] if row["scale"] is None else f"{row['method']} @ {row['scale']:g}"


def format_table(results: Sequence[dict]) -> str:
    """The results as a Markdown table (also what ``idcraft eval`` prints)."""
    head = "| method | scale | identity | coarse | fine | prompt | " + " | ".join(SCENE_NAMES) + " |"
    lines = [head, "|" + "---|" * (6 + len(SCENE_NAMES))]
    for row in results:
        scale = "-" if row["scale"] is None else f"{row['scale']:g}"
        ident, per = row["identity"], row["per_attribute"]
        cells = [row["method"], scale, *(f"{ident[k]:.3f}" for k in ("all", "coarse", "fine"))]
        cells += [f"{row['prompt']:.3f}", *(f"{per[n]:.3f}" for n in SCENE_NAMES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    s = report["settings"]
    judge = report["judge"]
    judge_line = (
        ", ".join(f"{k} {v:.2f}" for k, v in judge.items()) if judge else "not recorded in the judge's config"
    )
    return "\n".join(
        [
            "# idcraft eval: identity transfer in the offline world",
            "",
            f"{len(s['ids'])} held-out identities x {s['scenes_per_id']} scenes = {s['images_per_config']} images "
            f"per configuration; {s['steps']} steps, guidance {s['guidance']:g}, seed {s['seed']}, adapter "
            f"prompts name the {'coarse identity and ' if s['prompt'] == 'coarse' else ''}scene; "
            f"{report['seconds']:.0f} s on {s['device']}.",
            "",
            "identity = fraction of the reference's attributes the judge reads on the output (coarse: shape "
            "and colour, also in the caption; fine: only in the reference); prompt = fraction of the "
            "requested scene attributes it reads (per attribute in the last columns).",
            "",
            format_table(report["results"]),
            "",
            f"Judge accuracy on held-out renders: {judge_line}.",
            "",
        ]
    )


def write_report(
    report: dict, output: str | os.PathLike, samples: Sequence[np.ndarray] | None = None
) -> Path:
    """Write ``eval.json``, ``eval.md``, ``eval.png`` (and ``samples.png``) into ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "eval.md").write_text(_markdown(report))
    plot(report["results"], output / "eval.png")
    if samples:
        _samples_sheet([_label(r) for r in report["results"]], samples).save(output / "samples.png")
    return output


def _samples_sheet(labels: Sequence[str], samples: Sequence[np.ndarray]):
    from PIL import Image, ImageDraw

    tile, label_width = 64, 150
    columns = max(len(s) for s in samples)
    sheet = Image.new("RGB", (label_width + columns * (tile + 2), len(samples) * (tile + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(zip(labels, samples, strict=True)):
        y = r * (tile + 2)
        draw.text((4, y + tile // 2 - 6), label, fill="black", font=font(11))
        for c, image in enumerate(images):
            sheet.paste(Image.fromarray(image), (label_width + c * (tile + 2), y))
    return sheet


def plot(results: Sequence[dict], path: str | os.PathLike) -> Path:
    """Prompt accuracy (x) against identity accuracy (y): a line per adapter method through its scales,
    each baseline a labelled point. Drawn with matplotlib when installed, else with Pillow."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    points: list[tuple[str, float, float]] = []
    for row in results:
        xy = (row["prompt"], row["identity"]["all"])
        if row["scale"] is None:
            points.append((BASELINE_LABELS.get(row["method"], row["method"]), *xy))
        else:
            lines.setdefault(row["method"], []).append((row["scale"], *xy))
    for values in lines.values():
        values.sort()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _plot_pillow(lines, points, Path(path))
    return _plot_matplotlib(lines, points, Path(path))


def _plot_matplotlib(lines: dict, points: list, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5.5), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for method, values in lines.items():
        scales, x, y = zip(*values, strict=True)
        ax.plot(x, y, marker="o", label=method)
        for s, xi, yi in values:
            ax.annotate(f"{s:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    markers = ("s", "D", "^", "*", "P", "X")
    for k, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], marker=markers[k % len(markers)], s=50, color="0.2", zorder=3, label=label)
    if lines or points:
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("prompt accuracy (requested scene attributes seen)")
    ax.set_ylabel("identity accuracy (reference attributes seen)")
    ax.set_title("Identity vs prompt following (numbers: adapter scale)")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


#: Line colours of the Pillow plot (matplotlib's first ones).
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def _plot_pillow(lines: dict, points: list, path: Path) -> Path:
    from PIL import Image, ImageDraw

    width, height, left, bottom, top, right = 760, 600, 70, 60, 40, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small = font(11)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + x * (width - left - right), height - bottom - y * (height - top - bottom)

    for k in range(6):
        v = k / 5
        draw.line([at(v, 0), at(v, 1)], fill=(225, 225, 225))
        draw.line([at(0, v), at(1, v)], fill=(225, 225, 225))
        x, y = at(v, 0)
        draw.text((x - 8, y + 6), f"{v:.1f}", fill="black", font=small)
        x, y = at(0, v)
        draw.text((x - 30, y - 6), f"{v:.1f}", fill="black", font=small)
    draw.rectangle([at(0, 1), at(1, 0)], outline="black")
    draw.text(
        (left, height - 25), "prompt accuracy (requested scene attributes seen)", fill="black", font=small
    )
    draw.text(
        (10, 12), "identity accuracy (reference attributes seen) vs prompt accuracy", fill="black", font=small
    )
    for n, (method, values) in enumerate(lines.items()):
        colour = COLOURS[n % len(COLOURS)]
        xy = [at(x, y) for _, x, y in values]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for (s, _, _), (x, y) in zip(values, xy, strict=True):
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            draw.text((x + 5, y - 14), f"{s:g}", fill=colour, font=small)
        draw.text((left + 10, top + 10 + 16 * n), method, fill=colour, font=small)
    for label, x, y in points:
        px, py = at(x, y)
        draw.rectangle([px - 4, py - 4, px + 4, py + 4], fill="black")
        span = draw.textlength(label, font=small)
        draw.text(
            (px + 6 if px + 6 + span < width else px - 6 - span, py + 2), label, fill="black", font=small
        )
    image.save(path)
    return path
