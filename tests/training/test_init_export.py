"""Starting from released weights (``--init-from``, ``--init-controlnet``) with clear refusals of ones that
do not fit, the written files' dtype (``--export-dtype``), and the face backend names a run accepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from idcraft.checkpoints import load_checkpoint, save_checkpoint
from idcraft.errors import IdcraftError
from idcraft.training import TrainConfig, train
from idcraft.training.recipe import recipe_for

from .helpers import config

KPS = [[10.0, 12.0], [22.0, 12.0], [16.0, 18.0], [11.0, 24.0], [21.0, 24.0]]


def _built(cfg: TrainConfig):
    set_seed(cfg.seed)
    recipe = recipe_for(cfg.method)(cfg)
    recipe.build(torch.device("cpu"), torch.float32)
    return recipe


def _adapter_file(path: Path, method: str, base: str = "sd15", **options) -> Path:
    """A random adapter of ``method`` for the tiny ``base`` and CLIP encoder, in the official layout."""
    from idcraft.tiny import random_adapter, tiny_image_encoder, tiny_sd15_unet, tiny_sdxl_unet

    unet = tiny_sd15_unet() if base == "sd15" else tiny_sdxl_unet()
    adapter = random_adapter(unet, method, tiny_image_encoder(), **options)
    checkpoint = adapter.to_checkpoint()
    checkpoint.metadata = {"method": method}
    return save_checkpoint(checkpoint, path)


def _assert_starts_from(recipe, path: Path, prefix: str = "") -> None:
    """The recipe's adapter holds exactly the file's tensors (as float32 master weights)."""
    file = load_checkpoint(path)
    adapter = recipe.trainable_state_dict()
    for key, tensor in file.image_proj.items():
        assert torch.equal(adapter[f"{prefix}image_proj.{key}"], tensor.float()), key
    for key, tensor in file.ip_adapter.items():
        assert torch.equal(adapter[f"{prefix}layers.{key}"], tensor.float()), key
    assert all(v.dtype == torch.float32 for v in adapter.values())


@pytest.fixture(scope="module")
def face_data(tmp_path_factory) -> Path:
    """A manifest with precomputed ArcFace-sized embeddings and keypoints: no face analysis needed."""
    from .helpers import make_images

    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(3)
    lines = []
    for i, image in enumerate(make_images(root, 2, captions=False)):
        np.save(root / f"e{i}.npy", (rng.standard_normal(512) * 20).astype(np.float32))
        kps = (np.array(KPS) + 2 * i).tolist()
        lines.append({"image": image.name, "text": f"person {i}", "embedding": f"e{i}.npy", "kps": kps})
    manifest = root / "data.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


# ---------------------------------------------------------------------------- IP-Adapter family
def test_ip_adapter_family_starts_from_a_file_and_refuses_misfits(models, data, tmp_path):
    plus = _adapter_file(tmp_path / "plus.safetensors", "ip-adapter-plus")
    # Plus-Face from Plus (how the official Plus-Face was made): same projection, so allowed
    recipe = _built(config(models, data, tmp_path / "r", method="ip-adapter-plus-face", init_from=str(plus)))
    _assert_starts_from(recipe, plus)
    assert recipe.adapter.method.name == "ip-adapter-plus-face"

    base = _adapter_file(tmp_path / "base.bin", "ip-adapter")
    refusals = [
        (dict(method="ip-adapter", init_from=str(plus)), r"--init-from .*plus\.safetensors.*resampler"),
        (dict(method="ip-adapter-plus", init_from=str(base)), r"--init-from .*base\.bin.*linear projection"),
        (dict(method="ip-adapter", init_from=str(base), base="sdxl"), r"cross-attention width 32.*has 64"),
        (
            dict(method="ip-adapter", init_from=str(base), num_tokens=8),
            r"makes 4 image tokens.*--num-tokens is 8",
        ),
    ]
    for overrides, message in refusals:
        with pytest.raises(IdcraftError, match=message):
            _built(config(models, data, tmp_path / "x", **overrides))


def test_init_from_is_refused_before_loading_for_a_missing_file(models, data, tmp_path):
    with pytest.raises(IdcraftError, match="init_from .*: no such file"):
        config(models, data, tmp_path / "x", init_from=str(tmp_path / "missing.bin"))
    with pytest.raises(IdcraftError, match="init_controlnet .*applies to instantid only"):
        config(models, data, tmp_path / "x", init_controlnet=str(tmp_path))


# ---------------------------------------------------------------------------- FaceID (LoRA) and InstantID
def test_faceid_starts_from_a_file_with_its_lora(models, face_data, tmp_path):
    path = _adapter_file(tmp_path / "faceid.bin", "faceid", lora_rank=4)
    common = dict(method="faceid", init_from=str(path), drop_image=0.0)
    recipe = _built(config(models, face_data, tmp_path / "r", **{**common, "lora_rank": 4}))
    _assert_starts_from(recipe, path)
    assert any("_lora.up" in k for k in recipe.trainable_state_dict())
    with pytest.raises(IdcraftError, match=r"LoRA rank is 4 but --lora-rank is 8 \(pass --lora-rank 4"):
        _built(config(models, face_data, tmp_path / "x", **{**common, "lora_rank": 8}))
    with pytest.raises(IdcraftError, match="--init-from .*faceid-plus.*--method faceid"):
        _built(
            config(models, face_data, tmp_path / "x", **{**common, "method": "faceid-plus", "lora_rank": 4})
        )


def test_instantid_starts_from_adapter_and_identitynet(models, face_data, tmp_path):
    """A first run's files (fp16, as released) start a second run: adapter and IdentityNet both; an
    IdentityNet made for another base is refused by name."""
    first = tmp_path / "first"
    common = dict(method="instantid", base="sdxl", lora_rank=4, drop_image=0.0, learning_rate=1e-2)
    result = train(config(models, face_data, first, max_steps=1, export_dtype="fp16", **common))
    assert sorted(p.name for p in result.files) == ["ControlNetModel", "adapter.safetensors"]
    assert {t.dtype for t in load_file(str(first / "adapter.safetensors")).values()} == {torch.float16}
    weights = load_file(str(first / "ControlNetModel" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}

    cfg = config(
        models,
        face_data,
        tmp_path / "second",
        init_from=str(first / "adapter.safetensors"),
        init_controlnet=str(first / "ControlNetModel"),
        **common,
    )
    recipe = _built(cfg)
    _assert_starts_from(recipe, first / "adapter.safetensors", prefix="adapter.")
    controlnet = recipe.trainable_state_dict()
    assert all(torch.equal(controlnet[f"controlnet.{k}"], v.float()) for k, v in weights.items()), (
        "IdentityNet starts from the saved one"
    )

    from diffusers import ControlNetModel

    from idcraft.tiny import tiny_sd15_unet

    ControlNetModel.from_unet(tiny_sd15_unet()).save_pretrained(tmp_path / "sd15-controlnet")
    cfg.init_controlnet, cfg.init_from = str(tmp_path / "sd15-controlnet"), None
    with pytest.raises(IdcraftError, match=r"--init-controlnet .*not an IdentityNet for base model .*shapes"):
        _built(cfg)


# ---------------------------------------------------------------------------- export dtype
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_export_dtype_writes_half_files_that_generate(models, data, tmp_path, dtype):
    from idcraft.cli import main

    out = tmp_path / "run"
    args = ["train", "--method", "ip-adapter", "--base", str(models["sd15"])]
    args += ["--image-encoder", str(models["encoder"]), "--data", str(data), "--output", str(out)]
    args += ["--resolution", "32", "--batch-size", "2", "--max-steps", "1", "--no-progress"]
    assert main([*args, "--export-dtype", dtype, "--format", "bin"]) == 0
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for name in ("adapter.safetensors", "adapter.bin"):
        checkpoint = load_checkpoint(out / name)
        assert {t.dtype for g in checkpoint.groups().values() for t in g.values()} == {want}, name
    checkpoint = out / "checkpoints" / "step-00000001"
    assert {t.dtype for t in load_file(str(checkpoint / "trainable.safetensors")).values()} == {torch.float32}
    code = main(
        [
            "generate",
            "--base",
            str(models["sd15"]),
            "--adapter",
            str(out / "adapter.safetensors"),
            "--image-encoder",
            str(models["encoder"]),
            "--reference",
            str(data / "img00.png"),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "32",
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 0
    with pytest.raises(IdcraftError, match="export_dtype must be one of fp32, fp16, bf16"):
        TrainConfig(method="ip-adapter", base="b", data="d", output="o", export_dtype="int8")


# ---------------------------------------------------------------------------- face backends
def test_face_backend_accepts_every_backend_idcraft_faces_knows(monkeypatch):
    from idcraft.faces import analyser

    settings = dict(method="faceid", base="b", data="d", output="o")
    for name in analyser.backend_names():
        assert TrainConfig(**settings, face_backend=name).face_backend == name
    monkeypatch.setattr(analyser, "_registered", {})
    analyser.register_face_backend("later", lambda models_dir, **options: None)  # added after this code
    assert TrainConfig(**settings, face_backend="later").face_backend == "later"
    listed = ", ".join(analyser.backend_names())
    with pytest.raises(IdcraftError, match=f"face_backend must be one of {listed} \\(got 'dlib'\\)"):
        TrainConfig(**settings, face_backend="dlib")
