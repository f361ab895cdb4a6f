"""What ``pip install idcraft`` gets: a wheel built from this tree carries every file of the package, and
installed in a fresh virtual environment it serves every bundled world method.

An editable install reads the source tree and hides a package-data rule that stops short: wheels once
lacked InstantID's IdentityNet (``world/bundle/adapters/instantid/ControlNetModel/``), and the demo, the
server and ``world_engine()`` left InstantID out without a word. This builds the wheel offline
(``--no-build-isolation``: the build backend of this environment), installs it with ``--no-deps`` into a
virtual environment that sees this environment's torch & co. (``--system-site-packages``), and checks
that the ``idcraft`` imported there is the wheel's, not this checkout's.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "idcraft"

pytestmark = pytest.mark.packaging


def _setuptools_ok() -> bool:
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 68  # pyproject.toml's build requirement


def source_files() -> list[str]:
    """The package's files as shipped in the source tree, relative to ``src/`` (``idcraft/...``): the
    tracked ones in a git checkout, else every file but Python's caches."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", "src/idcraft"], cwd=REPO, capture_output=True, check=True
        ).stdout.decode()
        files = [name.removeprefix("src/") for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [
            str(p.relative_to(PACKAGE.parent))
            for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    return sorted(f for f in files if (PACKAGE.parent / f).is_file())


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not _setuptools_ok():
        pytest.skip("building the wheel offline needs setuptools>=68 in this environment")
    work = tmp_path_factory.mktemp("wheel")
    tree = work / "tree"  # a copy: the build writes build/ and egg-info beside its sources
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(work),
            str(tree),
        ],
        env=env,
    )
    (built,) = work.glob("idcraft-*.whl")
    return built


def test_the_wheel_carries_every_file_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = source_files()
    assert (
        "idcraft/world/bundle/adapters/instantid/ControlNetModel/diffusion_pytorch_model.safetensors"
        in expected
    )
    missing = [f for f in expected if f not in names]
    assert not missing, f"{len(missing)} file(s) of src/ are not in the wheel, e.g. {missing[:5]}"


INSTALLED_CHECK = """
import json, sys
import idcraft
from idcraft.world import bundle
from idcraft.world.generate import available_methods, world_engine

engine = world_engine(device="cpu")
print(json.dumps({"file": idcraft.__file__, "bundle": str(bundle.bundle_dir()),
                  "available": list(available_methods()), "engine": list(engine.methods)}))
"""


def test_every_world_method_loads_from_the_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    # no pip of its own (no ensurepip needed): this environment's pip, run by the venv's python, installs there
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IDCRAFT_WORLD_BUNDLE", "VIRTUAL_ENV")
    }
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    # --force-reinstall: this environment's (editable) idcraft has the same version; it stays untouched
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--force-reinstall",
            str(wheel),
        ],
        env=env,
    )
    done = _run([str(python), "-c", INSTALLED_CHECK], env=env, cwd=tmp_path)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    installed = Path(found["file"]).resolve()
    assert installed.is_relative_to(venv.resolve()), f"imported {installed}, not the wheel's copy in {venv}"
    assert Path(found["bundle"]).resolve().is_relative_to(venv.resolve())
    assert found["available"] == ["ip-adapter", "ip-adapter-plus", "faceid", "instantid"]
    assert sorted(found["engine"]) == sorted(found["available"])
    assert "Traceback" not in done.stderr
