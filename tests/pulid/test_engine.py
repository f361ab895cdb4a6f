"""PuLID through the engine on the fidelity fixture's tiny models: encoded identities reused, two threads at
once, float16/bfloat16, batch jobs, model configs, and the clear errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.engine import Engine
from idcraft.errors import CheckpointError, IdcraftError
from idcraft.pulid.preprocess import read_label_map
from idcraft.requests import GenerationRequest

CASE = Path(__file__).resolve().parents[1] / "fixtures" / "pulid-sdxl"
ARGS = json.loads((CASE / "args.json").read_text())


def load(dtype: str = "float32") -> Engine:
    return Engine.from_pretrained(
        CASE / "base",
        CASE / "pulid_tiny.safetensors",
        eva_clip=CASE / "eva_tiny.pt",
        device="cpu",
        dtype=dtype,
    )


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load()


def request(name: str, **changes) -> GenerationRequest:
    args = ARGS[name]
    faces = range(args["faces"])
    keys = ("prompt", "negative_prompt", "seed", "steps", "guidance", "scale", "width", "height", "num_zero",
            "ortho", "sampler")  # fmt: skip
    inputs = {
        "face_embeddings": [np.load(CASE / f"embedding_{i}.npy") for i in faces],
        "aligned_faces": [Image.open(CASE / f"aligned_{i}.png") for i in faces],
        "face_parsings": [read_label_map(CASE / f"parsing_{i}.png") for i in faces],
    }
    return GenerationRequest(**({k: args[k] for k in keys} | inputs | changes))


def expected(name: str) -> np.ndarray:
    return np.asarray(Image.open(CASE / f"expected_{name}.png").convert("RGB"), dtype=np.int16)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_encoded_identity_is_reused(engine):
    """Engine.encode once (the server's identity cache), then generate from the conditioning: the official
    image, with the encoders skipped (every case runs through `idcraft generate` in test_fidelity.py)."""
    conditioning = engine.encode(request("two_faces"))
    result = engine.generate(request("two_faces", conditioning=conditioning))
    assert np.abs(pixels(result.images[0]) - expected("two_faces")).max() <= 2
    assert result.timings["encode_s"] == 0.0
    assert result.settings["ortho"] == "v2" and result.settings["num_zero"] == 20


def test_two_threads_each_alone(engine):
    names = ["v1", "sde"]
    results: dict[str, np.ndarray] = {}
    barrier = threading.Barrier(2)

    def work(name):
        barrier.wait()
        results[name] = pixels(engine.generate(request(name)).images[0])

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in names:
        assert np.abs(results[name] - expected(name)).max() <= 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    engine = load(dtype)
    pipe = engine.pipeline()
    assert pipe.pipe.unet.dtype == getattr(torch, dtype) and pipe.encoder.idformer.dtype == getattr(
        torch, dtype
    )
    image = pixels(engine.generate(request("v2")).images[0])
    assert image.shape == expected("v2").shape
    assert np.abs(image - expected("v2")).mean() < 20  # same picture, half-precision rounding


def test_clear_errors(engine, tmp_path):
    with pytest.raises(IdcraftError, match="--face-embedding given for 2 faces"):
        engine.generate(request("two_faces", face_embeddings=[np.zeros(512, np.float32)]))
    with pytest.raises(IdcraftError, match="--s-scale: not used by pulid"):
        engine.generate(request("v2", s_scale=0.5))
    with pytest.raises(IdcraftError, match="--ortho must be off, v1 or v2"):
        engine.generate(request("v2", ortho="v3"))
    with pytest.raises(IdcraftError, match="antelopev2's raw 512-d"):
        engine.generate(request("v2", face_embeddings=[np.zeros(128, np.float32)]))
    # an EVA checkpoint of the wrong width is refused before the base model loads
    eva = torch.load(CASE / "eva_tiny.pt", weights_only=True)
    narrow = {k: v[..., :8] if v.ndim and v.shape[-1] == 16 else v for k, v in eva.items()}
    torch.save(narrow, tmp_path / "eva.pt")
    (tmp_path / "eva.json").write_text((CASE / "eva_tiny.json").read_text())
    with pytest.raises(CheckpointError):
        Engine.from_pretrained(CASE / "base", CASE / "pulid_tiny.safetensors", eva_clip=tmp_path / "eva.pt")
    with pytest.raises(IdcraftError, match="used by pulid only"):
        Engine.from_pretrained(
            CASE / "base", tmp_path / "x.bin", method="ip-adapter", eva_clip=tmp_path / "eva.pt"
        )


def test_batch_job_with_file_inputs(engine, tmp_path):
    from idcraft.batch import job_from_dict, run_batch

    args = ARGS["num_zero_0"]
    line = {k: args[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scale", "width",
                                 "height", "num_zero", "ortho", "sampler")}  # fmt: skip
    line |= {"face_embeddings": ["embedding_0.npy"], "aligned_faces": ["aligned_0.png"],
             "face_parsings": ["parsing_0.png"]}  # fmt: skip
    job = job_from_dict(line, 0, base_dir=CASE)
    assert job.error is None
    summary = run_batch(
        [job], None, tmp_path, engine_loader=lambda label, recipe: (engine, None), progress=False
    )
    record = summary.records[job.id]
    assert record["error"] is None, record["error"]
    image = pixels(Image.open(tmp_path / record["images"][0]))
    assert np.abs(image - expected("num_zero_0")).max() <= 2


def test_models_config_entry_loads_pulid():
    from idcraft.model_config import load_engines, models_config_from_dict

    config = models_config_from_dict(
        {
            "models": {
                "face": {
                    "method": "pulid",
                    "base": "base",
                    "adapter": "pulid_tiny.safetensors",
                    "eva_clip": "eva_tiny.pt",
                    "defaults": {"ortho": "v1", "num_zero": 20, "sampler": "dpmpp_2m"},
                }
            },
            "device": "cpu",
            "dtype": "float32",
        },
        relative_to=CASE,
    )
    assert not config.models["face"].is_sd
    engine = load_engines(config)["face"]
    assert engine.methods == ("pulid",)
    with pytest.raises(IdcraftError, match="for pulid only"):
        models_config_from_dict({"models": {"ip-adapter": {"base": "b", "adapter": "a", "eva_clip": "e"}}})


def test_sdxl_file_on_a_flux_base_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(IdcraftError, match="is FLUX.1"):
        Engine.from_pretrained(tmp_path, CASE / "pulid_tiny.safetensors", eva_clip=CASE / "eva_tiny.pt")
