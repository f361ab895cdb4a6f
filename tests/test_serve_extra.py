"""``idcraft serve`` without its extra: one line naming ``pip install 'idcraft[serve]'``, before any model
loads (it used to load the world, print a URL, then die with a ModuleNotFoundError traceback). Outside
tests/serve, whose set-up skips everything when fastapi is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

# A fresh interpreter in which importing some server modules fails, as on an install without the extra.
PROGRAM = """
import sys
for name in {modules!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
from idcraft.cli import main
status = main(["serve", "--port", "0", "--device", "cpu"{check}])
print("torch imported:", "torch" in sys.modules)
sys.exit(status)
"""


@pytest.mark.parametrize(
    ("modules", "package", "flags"),
    [
        (["fastapi"], "fastapi", ""),
        (["uvicorn"], "uvicorn", ', "--check"'),  # --check loads models too: refused first as well
        (["python_multipart", "multipart"], "python-multipart", ""),  # either name will do: both gone
    ],
)
def test_serve_without_its_extra_fails_first_in_one_line(modules, package, flags):
    program = PROGRAM.format(modules=modules, check=flags)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("idcraft serve: error:") and package in lines[0], lines[0]
    assert "pip install 'idcraft[serve]'" in lines[0]
    assert "torch imported: False" in done.stdout  # refused before anything was loaded
    assert "http://" not in done.stdout


@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None, reason="the serve extra is not installed")
def test_the_extra_is_accepted_when_installed():
    from idcraft.serve.requirements import require_server_packages

    require_server_packages()
