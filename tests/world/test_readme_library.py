"""The README's Library example runs as it is, on the bundled offline world."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _library_example() -> str:
    section = README.read_text().split("## Library\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_library_example_runs_on_the_offline_world(tmp_path, monkeypatch):
    from idcraft.world import bundle

    if not (bundle.bundle_dir() / bundle.ADAPTERS["instantid"]).exists():
        pytest.skip("the bundled world has no InstantID adapter")
    code = _library_example().replace("steps=20", "steps=2")
    assert "world_engine()" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "snow.png").is_file()
    assert scope["result"].method == "instantid" and scope["result"].images[0].size == (64, 64)
