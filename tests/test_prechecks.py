"""Issue 28: refusals that need a model come before the load when a header, torch.cuda or a directory
listing already tells -- an adapter for another base, a device the machine lacks, nothing to train on."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from idcraft.errors import IdcraftError, IncompatibleAdapterError
from idcraft.prechecks import adapter_width, check_adapter_fits_base, check_training_data

WORLD = Path(__file__).parents[1] / "src" / "idcraft" / "world" / "bundle"
ASTRONAUT = Path(__file__).parent / "data" / "astronaut.jpg"

#: Runs the command line in a fresh interpreter and says whether torch / diffusers were imported.
PROBE = (
    "import sys; from idcraft.cli import main; rc = main(sys.argv[1:]); "
    "print(sorted({'torch', 'diffusers'} & set(sys.modules)), rc)"
)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)


def _header_only_safetensors(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A safetensors file with the given shapes (zero-filled float32), written without torch."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 4
        for n in shape:
            size *= n
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def _sdxl_like_adapter(tmp_path: Path) -> Path:
    return _header_only_safetensors(
        tmp_path / "ip-adapter_sdxl.safetensors",
        {"image_proj.proj.weight": [8192, 1280], "ip_adapter.1.to_k_ip.weight": [640, 2048]},
    )


def test_an_adapter_for_another_base_is_refused_from_the_headers(tmp_path):
    adapter = _sdxl_like_adapter(tmp_path)
    assert adapter_width(adapter) == 2048
    with pytest.raises(IncompatibleAdapterError, match=r"width 2048 \(SDXL\).*has 64"):
        check_adapter_fits_base(WORLD / "sd", adapter)
    check_adapter_fits_base(WORLD / "sd", WORLD / "adapters" / "ip-adapter_world.safetensors")  # fits
    check_adapter_fits_base("h94/some-hub-id", adapter)  # nothing local to read: the load checks it


def test_a_bin_adapter_is_read_for_its_shapes_only(tmp_path):
    import torch

    path = tmp_path / "a.bin"
    torch.save({"image_proj": {}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 768)}}, path)
    assert adapter_width(path) == 768
    with pytest.raises(IncompatibleAdapterError, match=r"768 \(SD1.x\)"):
        check_adapter_fits_base(WORLD / "sd", path)


def test_generate_refuses_the_wrong_base_before_torch_loads(tmp_path):
    run = _cli(
        "generate", "--base", str(WORLD / "sd"), "--adapter", str(_sdxl_like_adapter(tmp_path)),
        "--image-encoder", str(WORLD / "image_encoder"), "--reference", str(ASTRONAUT), "--prompt", "p",
        "--device", "cpu", "--output", str(tmp_path / "o.png"),
    )  # fmt: skip
    assert "cross-attention width 2048" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert run.stdout.split() == ["[]", "2"], (run.stdout, run.stderr)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_generate_refuses_cuda_without_cuda_before_any_model_loads(tmp_path):
    run = _cli(
        "generate", "--base", str(WORLD / "sd"), "--adapter", str(WORLD / "adapters" / "ip-adapter_world.safetensors"),
        "--image-encoder", str(WORLD / "image_encoder"), "--reference", str(ASTRONAUT), "--prompt", "p",
        "--device", "cuda", "--output", str(tmp_path / "o.png"),
    )  # fmt: skip
    assert "--device cuda: this machine has no CUDA GPU" in run.stderr, run.stderr
    assert run.stdout.split() == ["['torch']", "2"], (run.stdout, run.stderr)  # torch asked, diffusers never


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["serve", "batch"])
def test_serve_and_batch_refuse_cuda_without_cuda_before_any_model_loads(tmp_path, command):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"reference": str(ASTRONAUT), "prompt": "p"}) + "\n")
    extra = ["--port", "0"] if command == "serve" else ["--requests", str(jobs), "--output", str(tmp_path / "out")]
    run = _cli(command, "--device", "cuda", *extra)
    assert "--device cuda: this machine has no CUDA GPU" in run.stderr, run.stderr
    assert "diffusers" not in run.stdout, (run.stdout, run.stderr)  # refused before any model loads


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no images in this folder"),
        ({"notes.md": "x", "sub/readme.txt": "y"}, "no images in this folder"),
        ({"a.jpg": "", "b.png": ""}, r"2 image\(s\) but none has a caption"),
    ],
)
def test_training_data_with_nothing_to_train_on_is_refused(tmp_path, files, message):
    data = tmp_path / "data"
    data.mkdir()
    for name, text in files.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(text)
    with pytest.raises(IdcraftError, match=message):
        check_training_data(data)
    (data / "deep").mkdir()
    (data / "deep" / "c.webp").write_text("")
    (data / "deep" / "c.txt").write_text("a caption")
    check_training_data(data)  # one captioned image: go


def test_an_empty_manifest_is_refused(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n  \n")
    with pytest.raises(IdcraftError, match="manifest is empty"):
        check_training_data(manifest)


def test_train_refuses_an_empty_data_folder_before_torch_loads(tmp_path):
    (tmp_path / "empty").mkdir()
    run = _cli(
        "train", "--method", "ip-adapter", "--base", str(WORLD / "sd"), "--data", str(tmp_path / "empty"),
        "--output", str(tmp_path / "run"),
    )  # fmt: skip
    assert "no images in this folder" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert run.stdout.split() == ["[]", "2"], (run.stdout, run.stderr)
