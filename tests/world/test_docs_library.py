"""The Library page's first example (docs/library.md) runs as it is, on the bundled offline world, in a
fresh interpreter that prints nothing but what the example prints: no third-party notices a user cannot
act on (diffusers' "should be kept in float32: []", transformers' torchvision fallback, diffusers'
``torch_dtype`` deprecation)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "library.md"


def _library_example() -> str:
    return re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)


def _quiet_stderr(stderr: str) -> list[str]:
    """stderr without loading bars (tqdm redraws them with carriage returns; they are progress, not notices)."""
    lines = []
    for line in stderr.replace("\r", "\n").splitlines():
        if line.strip() and not re.match(r"\s*(Loading|Fetching) .*\d+%|\s*\d+%\|", line):
            lines.append(line)
    return lines


def test_library_example_runs_on_the_offline_world_and_prints_no_notices(tmp_path):
    from idcraft.world import bundle

    if not (bundle.bundle_dir() / bundle.ADAPTERS["instantid"]).exists():
        pytest.skip("the bundled world has no InstantID adapter")
    code = _library_example().replace("steps=20", "steps=2")
    assert "world_engine()" in code
    # the libraries' own switches off, as a user's environment has them: every notice would show
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "TRANSFORMERS_VERBOSITY",
            "DIFFUSERS_VERBOSITY",
            "PYTHONWARNINGS",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS",
        )
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "snow.png").is_file()
    assert done.stdout.startswith("1 {")  # print(result.seed, result.timings, result.warnings)
    assert _quiet_stderr(done.stderr) == []
