"""``idcraft eval --config`` on tiny models: the table, scatter plot and sample grid are written; the copy
baseline is flagged as copy-paste; a re-run redoes nothing, a new setting generates only its own cells;
``idcraft compare`` draws one labelled row with scores; the world evaluation keeps its defaults."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from idcraft.cli import main

from .conftest import PROMPTS

#: 2 models x (no recipe, lcm) x 2 scales = 8 method cells, + the copy baseline.
CELLS = 8
ITEMS = 4  # 2 subjects x 2 prompts x 1 seed


def _argv(world, out, *extra):
    return [
        "eval",
        "--config",
        str(world["config"]),
        "--references",
        str(world["refs"]),
        "--prompts",
        *PROMPTS,
        "--scales",
        "0.5",
        "1",
        "--steps",
        "2",
        "--recipes",
        "none",
        "lcm",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        str(out),
        "--face-index",  # the tiny detector reads the bright square as many faces: FaceID takes the largest
        "0",
        *extra,
    ]


@pytest.fixture(scope="module")
def first_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(_argv(tiny_world, out)) == 0
    return out


def _rows(out):
    with open(out / "eval.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_eval_writes_table_plot_and_grid(first_run, tiny_world):
    rows = _rows(first_run)
    assert len(rows) == CELLS + 1
    cells = [(r["model"], r["recipe"], r["scale"], r["steps"]) for r in rows[:CELLS]]
    assert cells[:4] == [
        ("ip-adapter", "", "0.5", "2"),
        ("ip-adapter", "", "1.0", "2"),
        ("ip-adapter", "lcm", "0.5", "2"),
        ("ip-adapter", "lcm", "1.0", "2"),
    ]
    assert {r["model"] for r in rows[:CELLS]} == {"ip-adapter", "faceid"}
    for row in rows[:CELLS]:
        assert row["images"] == str(ITEMS) and row["errors"] == "0"
        for key in ("clip_t", "clip_i", "dino", "face_rate", "seconds_per_image"):
            assert row[key] != "", key
    lcm = [r for r in rows if r["recipe"] == "lcm"]
    assert {r["guidance"] for r in lcm} == {"1.0"}  # the recipe's guidance, not the method's 7.5
    assert {r["guidance"] for r in rows[:CELLS] if not r["recipe"]} == {"7.5"}  # the method's default, as run
    copy = rows[-1]
    assert copy["model"] == "copy" and copy["images"] == str(ITEMS)
    assert float(copy["sim_ref"]) == pytest.approx(1.0, abs=1e-4)
    assert float(copy["copy"]) == pytest.approx(1.0, abs=1e-3) and float(copy["copy_rate"]) == 1.0
    assert float(copy["face_rate"]) == 1.0

    markdown = (first_run / "eval.md").read_text()
    assert "| model | recipe | scale |" in markdown and "| copy |" in markdown
    assert "by few-step recipe" in markdown and "| model | scale | none | lcm |" in markdown
    report = json.loads((first_run / "eval.json").read_text())
    assert report["generated_images"] == CELLS * ITEMS and len(report["rows"]) == CELLS + 1
    manifest = (first_run / "generation" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == CELLS * ITEMS
    assert all(json.loads(line)["error"] is None for line in manifest)
    lcm_record = next(json.loads(line) for line in manifest if "__lcm__" in line)
    assert lcm_record["settings"]["fewstep"]["scheduler"] == "LCMScheduler"

    plot = Image.open(first_run / "scatter.png")
    assert plot.size == (900, 640) and len(plot.convert("RGB").getcolors(1 << 20)) > 10
    grid = Image.open(first_run / "grid.png")
    # columns: 4 items; rows: reference, ground truth, 9 cells
    assert grid.width == 230 + 4 * (128 + 4) and grid.height == 34 + 11 * (128 + 4)


def test_rerun_redoes_nothing_and_new_settings_only_their_cells(first_run, tiny_world, counted):
    before = _rows(first_run)
    assert main(_argv(tiny_world, first_run)) == 0
    assert counted == {"requests": 0, "calls": 0, "loads": 0}
    assert _rows(first_run) == before

    # a cell whose results are lost is scored again from its images, not generated again
    (first_run / "cells" / "faceid__none__s0.5__n2__gdef.json").unlink()
    assert main(_argv(tiny_world, first_run)) == 0
    assert counted["requests"] == 0 and counted["loads"] == 0
    assert _rows(first_run) == before

    # a third scale: only its cells (2 models x 2 recipes) are generated, each model + recipe loaded once
    assert main(_argv(tiny_world, first_run, "--scales", "0.5", "1", "0.25")) == 0
    assert counted["requests"] == 4 * ITEMS and counted["loads"] == 4
    rows = _rows(first_run)
    assert len(rows) == 4 * 3 + 1 and sum(r["scale"] == "0.25" for r in rows) == 4


def test_compare_draws_one_labelled_row(tiny_world, tmp_path, capsys):
    out = tmp_path / "compare"
    argv = [
        "compare",
        "--config",
        str(tiny_world["config"]),
        "--reference",
        str(tiny_world["refs"] / "alice.png"),
    ]
    argv += ["--ground-truth", str(tiny_world["refs"] / "alice.gt.png"), "--prompt", PROMPTS[0]]
    argv += ["--methods", "ip-adapter", "--scales", "0.5", "1", "--steps", "2", "--recipes", "none", "lcm"]
    argv += ["--width", "64", "--height", "64", "--baselines", "copy", "--tile", "96", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "compare.png" in printed and "| ip-adapter |" in printed
    sheet = Image.open(out / "compare.png")
    assert sheet.width == 8 + (2 + 4 + 1) * (96 + 8)  # reference, ground truth, 4 settings, copy
    assert len(_rows(out)) == 5


def test_the_world_evaluation_keeps_its_defaults(monkeypatch):
    from idcraft.world import evaluate as world_evaluate
    from idcraft.world.generate import BASELINES, DEFAULT_BATCH, DEFAULT_GUIDANCE, DEFAULT_STEPS

    seen = {}

    def fake(output, **kwargs):
        seen.update(kwargs)
        return {"results": [], "seconds": 0.0}

    monkeypatch.setattr(world_evaluate, "evaluate", fake)
    monkeypatch.setattr(world_evaluate, "format_table", lambda rows: "")
    assert main(["eval", "--ids", "2", "--output", "x"]) == 0
    assert seen["scales"] == list(world_evaluate.DEFAULT_SCALES) and seen["baselines"] == list(BASELINES)
    assert (seen["steps"], seen["guidance"], seen["seed"], seen["batch_size"]) == (
        DEFAULT_STEPS,
        DEFAULT_GUIDANCE,
        0,
        DEFAULT_BATCH,
    )
    assert main(["eval", "--methods", "nope", "--output", "x"]) == 2


def test_compare_runs_pulid_next_to_faceid(tiny_world, tmp_path, capsys):
    """A pulid model config (tiny SDXL PuLID release, EVA tower and BiSeNet from the fidelity fixture) in
    `idcraft compare` beside FaceID: both rows are drawn and scored from the same reference photo, the
    face taken by --face-index."""
    from pathlib import Path

    from ..pulid.training_data import tiny_bisenet

    case = Path(__file__).resolve().parents[1] / "fixtures" / "pulid-sdxl"
    tiny_bisenet(tmp_path / "bisenet.pth")
    root = tiny_world["root"]
    config = tmp_path / "models.yaml"
    config.write_text(
        "models:\n"
        f"  faceid:\n    base: {root / 'sd15'}\n    adapter: {root / 'faceid.safetensors'}\n"
        f"  pulid:\n    base: {case / 'base'}\n    adapter: {case / 'pulid_tiny.safetensors'}\n"
        f"    eva_clip: {case / 'eva_tiny.pt'}\n    face_parser: {tmp_path / 'bisenet.pth'}\n"
        "device: cpu\n"
        "face_backend: insightface\n"
        f"face_models: {tiny_world['pack']}\n"
        f"scoring: {{clip: {tiny_world['clip']}, dino: {tiny_world['dino']}}}\n"
    )
    out = tmp_path / "compare"
    argv = ["compare", "--config", str(config), "--reference", str(tiny_world["refs"] / "alice.png")]
    argv += ["--prompt", PROMPTS[0], "--methods", "faceid", "pulid", "--scales", "0.8", "--steps", "2"]
    argv += ["--recipes", "none", "--width", "64", "--height", "64", "--tile", "64", "--output", str(out)]
    argv += ["--face-index", "0"]  # the tiny detector reads the bright square as many faces
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| pulid |" in printed and "| faceid |" in printed
    rows = {row["method"]: row for row in _rows(out)}
    assert {"faceid", "pulid"} <= set(rows)
    for method in ("faceid", "pulid"):
        assert rows[method]["images"] == "1" and rows[method]["errors"] in ("", "0"), method
        assert rows[method]["clip_t"] and rows[method]["face_rate"]  # scored like every method
