"""Evaluation on real models: identity, copy-paste, prompt and character scores over a grid of methods and
settings (``idcraft eval --config``), and side-by-side comparisons (``idcraft compare``).

| module | job |
|---|---|
| :mod:`.scores` | ArcFace SimRef / SimGT, the copy-paste score, face rate, CLIP-T, CLIP-I, DINO |
| :mod:`.run` | subjects and prompts in, the grid of cells, generation through :mod:`idcraft.batch`, per-cell results (resumable) |
| :mod:`.report` | CSV and Markdown tables (with identity per few-step recipe), the scatter plot |
| :mod:`.grid` | the labelled sample sheet and the compare view |
"""

from __future__ import annotations

from .run import Cell, GridSettings, Subject, plan_cells, read_prompts, read_subjects, run_compare, run_eval
from .scores import Scorer, ScoringSettings, aggregate, copy_score

__all__ = [
    "Cell",
    "GridSettings",
    "Scorer",
    "ScoringSettings",
    "Subject",
    "aggregate",
    "copy_score",
    "plan_cells",
    "read_prompts",
    "read_subjects",
    "run_compare",
    "run_eval",
]
