"""Import layers: the library never imports its shells (the command line, the server) or the offline world,
and the world generates through the public engine API like any user."""

from __future__ import annotations

import ast
from pathlib import Path

import idcraft

ROOT = Path(idcraft.__file__).parent
#: Packages that sit on top of the library and may import anything.
SHELLS = ("cli", "serve", "world")


def _imports(path: Path) -> set[str]:
    """Absolute names of the idcraft modules ``path`` imports (relative imports resolved)."""
    package = ".".join(("idcraft", *path.relative_to(ROOT).with_suffix("").parts[:-1]))
    if path.name == "__init__.py":
        package = ".".join(("idcraft", *path.relative_to(ROOT).parts[:-1]))
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {n for n in out if n == "idcraft" or n.startswith("idcraft.")}


def _library_modules() -> list[Path]:
    return [
        p
        for p in ROOT.rglob("*.py")
        if p.relative_to(ROOT).parts[0] not in SHELLS and p.name != "__main__.py"
    ]


def test_the_library_imports_no_shell_and_not_the_world():
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            n for n in _imports(path) if any(n.startswith(f"idcraft.{s}") for s in SHELLS)
        )
        for path in _library_modules()
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders
    assert len(_library_modules()) > 30  # the walk sees the library


def test_the_check_sees_relative_imports(tmp_path):
    module = ROOT / "faces" / "analyser.py"
    assert "idcraft.faces.types" in _imports(module)


def test_the_world_generates_through_the_engine():
    """No reaching into pipelines: adapter state, the wrapped diffusers pipeline, token layouts."""
    source = (ROOT / "world" / "generate.py").read_text()
    for private in ("set_scale", ".layout", "pipe.pipe", ".adapter.", "encode_prompt"):
        assert private not in source, private
    assert "engine.generate_batch" in source and "engine.encode" in source
