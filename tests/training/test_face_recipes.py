"""FaceID and InstantID training on tiny models: they learn, train only their parameters, resume bit for bit,
skip faceless samples, and what they save loads back into generation (and, for FaceID, into diffusers).

Face analysis runs on a tiny insightface-format pack (random SCRFD + ArcFace ONNX models, see
tests/faces/tiny_onnx.py): its detector finds "a face" wherever the photo has an all-white patch, so test
photos are dark noise with a white square, and a photo without one has no face. InstantID trains from
precomputed embeddings and keypoints in the manifest instead (the large-dataset path).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import load_file

from idcraft.training import Trainer, train
from idcraft.training.recipe import recipe_for

from .helpers import FAST, Killed, kill_at

KPS = [[10.0, 12.0], [22.0, 12.0], [16.0, 18.0], [11.0, 24.0], [21.0, 24.0]]
WINDOW = 6


@pytest.fixture(scope="module")
def face_pack(tiny_face_pack) -> Path:
    """The session's tiny antelopev2-like ONNX pack (tests/conftest.py)."""
    return tiny_face_pack


def face_photo(path: Path, seed: int, *, face: bool = True) -> Path:
    """64x64 dark noise with (if ``face``) a white 20 px square the tiny detector reads as a face."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 110, (64, 64, 3)).astype(np.uint8)
    image[:, :, seed % 3] = np.linspace(0, 100, 64, dtype=np.uint8)[None]  # something to learn per image
    if face:
        top, left = 12 + 4 * (seed % 3), 14 + 3 * (seed % 4)
        image[top : top + 20, left : left + 20] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def manifest(folder: Path, lines: list[dict]) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def face_config(models, data, output, method, base="sd15", **overrides):
    from idcraft.training import TrainConfig

    settings = dict(
        FAST,
        method=method,
        base=str(models[base]),
        data=str(data),
        output=str(output),
        image_encoder=str(models["encoder"]),
        lora_rank=4,
        drop_image=0.0,
        drop_text=0.0,
        drop_both=0.0,
        learning_rate=1e-2,
        seed=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".processor." not in k}


def _eval_loss(recipe, draws: int = 4) -> float:
    """Mean loss over every usable sample with a fixed generator: identical draws for any weights."""
    from idcraft.training.data import SampleLoader, collate, list_records

    loader = SampleLoader(
        list_records(recipe.config.data)[0], recipe.resolution, recipe.reference_preprocessor()
    )
    batch = collate([item for item in (loader[i] for i in range(len(loader))) if "error" not in item])
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return float(np.mean([recipe.loss(recipe.model, batch, generator).item() for _ in range(draws)]))


def _check_learned_and_frozen(result, trainer, cfg) -> dict[str, torch.Tensor]:
    """Loss fell; frozen modules bit-identical to a fresh build; every trainable tensor moved. Returns the
    fresh build's trainable state."""
    losses = np.array(result.losses)
    assert np.isfinite(losses).all()
    first, last = losses[:WINDOW].mean(), losses[-WINDOW:].mean()
    assert last < 0.97 * first, f"{cfg.method}: training loss {first:.4f} -> {last:.4f}"

    recipe = trainer.recipe
    set_seed(cfg.seed)
    fresh = recipe_for(cfg.method)(cfg)
    fresh.build(torch.device("cpu"), torch.float32)
    frozen, pristine = recipe.frozen_modules(), fresh.frozen_modules()
    assert {"unet", "vae", "text_encoder"} <= set(frozen)
    for name, module in frozen.items():
        now, then = _base_state(module), _base_state(pristine[name])
        assert now.keys() == then.keys()
        changed = [k for k in now if not torch.equal(now[k], then[k])]
        assert not changed, f"frozen {name} changed: {changed[:3]}"
        assert not any(p.requires_grad for n, p in module.named_parameters() if ".processor." not in n)
    trained = {k: v.clone() for k, v in recipe.trainable_state_dict().items()}
    initial = {k: v.clone() for k, v in fresh.trainable_state_dict().items()}
    assert trained.keys() == initial.keys()

    # Paired check: the same batch, noise and timesteps through the initial and the trained weights.
    after = _eval_loss(recipe)
    recipe.load_trainable_state_dict(initial)
    before = _eval_loss(recipe)
    recipe.load_trainable_state_dict(trained)
    assert after < 0.95 * before, f"{cfg.method}: fixed-batch loss {before:.4f} -> {after:.4f}"
    return initial


# ---------------------------------------------------------------------------- FaceID
@pytest.fixture(scope="module")
def faceid_run(models, face_pack, tmp_path_factory):
    """FaceID on SD1.5 from photos analysed with the tiny pack; one photo has no face."""
    root = tmp_path_factory.mktemp("faceid")
    lines = [{"image": str(face_photo(root / f"p{i}.png", i)), "text": f"person {i}"} for i in range(4)]
    lines.append({"image": str(face_photo(root / "empty.png", 9, face=False)), "text": "nobody"})
    cfg = face_config(
        models, manifest(root, lines), root / "run", "faceid", face_models=str(face_pack), max_steps=30
    )
    trainer = Trainer(cfg)
    result = trainer.run()
    return root, cfg, trainer, result


def test_faceid_learns_lora_and_adapter_only(faceid_run):
    root, cfg, trainer, result = faceid_run
    initial = _check_learned_and_frozen(result, trainer, cfg)
    trained = trainer.recipe.trainable_state_dict()
    moved = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert any("_lora.up" in k for k in moved) and any("to_k_ip" in k for k in moved)
    assert any(k.startswith("image_proj.") or "proj" in k for k in moved)
    assert len(moved) == len(trained), f"never moved: {sorted(set(trained) - moved)[:5]}"
    assert all(p.lora_rank == 4 for p in trainer.recipe.adapter.layers.values())


def test_faceless_sample_is_skipped_and_reported(faceid_run):
    root, _, _, result = faceid_run
    assert list(result.skipped.skipped) == [str(root / "empty.png")]
    assert "no face" in result.skipped.skipped[str(root / "empty.png")]
    report = (root / "run" / "skipped.txt").read_text()
    assert "empty.png" in report and "no face" in report
    cached = list((root / "run" / "cache" / "faces").glob("*.npz"))
    assert len(cached) == 5  # every photo analysed once, the faceless one included (as "no face")


def test_faceid_output_loads_in_idcraft_and_diffusers(faceid_run, models):
    from diffusers import StableDiffusionPipeline

    from idcraft.pipeline import IPAdapterPipeline

    root, _, trainer, _ = faceid_run
    out = root / "run"
    saved = load_file(str(out / "adapter.safetensors"))
    assert any("_lora." in k for k in saved) and any(k.startswith("image_proj.") for k in saved)
    embedding = np.random.default_rng(0).standard_normal(512).astype(np.float32) * 20
    settings = dict(steps=2, guidance=5.0, width=64, height=64, seed=3, progress=False)
    ours = IPAdapterPipeline.from_pretrained(
        models["sd15"], out / "adapter.safetensors", device="cpu", dtype="float32"
    )
    assert ours.adapter.method.name == "faceid"
    mine = np.asarray(ours("a cat", face_embedding=embedding, **settings)[0], np.int16)

    pipe = StableDiffusionPipeline.from_pretrained(
        models["sd15"], safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(out), subfolder="", weight_name="adapter.safetensors", image_encoder_folder=None)
    unit = torch.nn.functional.normalize(torch.tensor(embedding), dim=0)[None, None]
    theirs = pipe(
        "a cat",
        ip_adapter_image_embeds=[torch.cat([torch.zeros_like(unit), unit])],
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(mine - np.asarray(theirs, np.int16)).max() <= 2


def test_cli_trains_faceid_with_face_flags_and_samples(models, face_pack, tmp_path):
    from idcraft.cli import main

    lines = [{"image": str(face_photo(tmp_path / f"p{i}.png", i)), "text": f"p {i}"} for i in range(2)]
    out = tmp_path / "run"
    args = ["train", "--method", "ip-adapter-faceid", "--base", str(models["sd15"])]
    args += ["--data", str(manifest(tmp_path, lines)), "--output", str(out), "--max-steps", "2"]
    args += ["--resolution", "32", "--batch-size", "2", "--format", "bin", "--lora-rank", "2"]
    args += ["--face-backend", "insightface", "--face-models", str(face_pack), "--no-progress"]
    args += ["--sample-every", "2", "--sample-reference", str(tmp_path / "p0.png"), "--sample-steps", "2"]
    assert main(args) == 0
    assert (out / "adapter.safetensors").is_file() and (out / "adapter.bin").is_file()
    assert list((out / "samples").glob("step-00000002-*.png"))
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "faceid" and config["lora_rank"] == 2


def test_default_face_backend_is_refused_for_training(models, tmp_path):
    """The offline backend's embeddings are not ArcFace: training from it must fail before any step."""
    from idcraft.errors import FaceError

    data = manifest(tmp_path, [{"image": str(face_photo(tmp_path / "p.png", 0)), "text": "x"}])
    cfg = face_config(models, data, tmp_path / "run", "faceid", face_backend="default", max_steps=1)
    with pytest.raises(FaceError, match="ArcFace"):
        train(cfg)


# ---------------------------------------------------------------------------- InstantID
@pytest.fixture(scope="module")
def instantid_run(models, face_pack, tmp_path_factory):
    """InstantID on SDXL from a manifest with precomputed embeddings and keypoints (no face analysis for
    training; the sample image at the last step analyses its reference with the tiny pack)."""
    root = tmp_path_factory.mktemp("instantid")
    rng = np.random.default_rng(7)
    lines = []
    for i in range(4):
        np.save(root / f"e{i}.npy", (rng.standard_normal(512) * 20).astype(np.float32))
        kps = (np.array(KPS) + 3 * i).tolist()
        image = face_photo(root / f"p{i}.png", i)
        lines.append({"image": image.name, "text": f"person {i}", "embedding": f"e{i}.npy", "kps": kps})
    cfg = face_config(
        models,
        manifest(root, lines),
        root / "run",
        "instantid",
        base="sdxl",
        max_steps=30,
        face_models=str(face_pack),
        sample_every=30,
        sample_reference=str(root / "p0.png"),
        sample_steps=2,
    )
    trainer = Trainer(cfg)
    result = trainer.run()
    return root, cfg, trainer, result


def test_instantid_learns_adapter_and_identitynet_only(instantid_run):
    root, cfg, trainer, result = instantid_run
    initial = _check_learned_and_frozen(result, trainer, cfg)
    trained = trainer.recipe.trainable_state_dict()
    moved = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert any(k.startswith("controlnet.") for k in moved), "IdentityNet trains"
    assert any(k.startswith("adapter.image_proj.") for k in moved)
    assert any("to_k_ip" in k for k in moved)
    assert not (root / "run" / "cache" / "faces").exists(), "manifest data needs no face analysis"


def test_instantid_output_loads_with_its_identitynet(instantid_run, models):
    from idcraft.pipeline import IPAdapterPipeline

    root, _, trainer, result = instantid_run
    out = root / "run"
    assert (out / "ControlNetModel" / "config.json").is_file()
    assert (out / "samples" / "step-00000030-0.png").is_file()
    assert sorted(p.name for p in result.files) == ["ControlNetModel", "adapter.safetensors"]
    pipe = IPAdapterPipeline.from_pretrained(
        models["sdxl"],
        out / "adapter.safetensors",
        controlnet=out / "ControlNetModel",
        device="cpu",
        dtype="float32",
    )
    assert pipe.adapter.method.name == "instantid"
    trained = trainer.recipe.controlnet.state_dict()
    loaded = pipe.pipe.controlnet.state_dict()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    embedding = np.load(root / "e0.npy")
    image = pipe(
        "a portrait",
        face_embedding=embedding,
        keypoints=np.array(KPS) * 2,
        steps=2,
        width=64,
        height=64,
        seed=1,
        progress=False,
    )[0]
    assert image.size == (64, 64)

    from idcraft.cli import main

    (root / "kps.json").write_text(json.dumps((np.array(KPS) * 2).tolist()))
    args = ["generate", "--method", "instantid", "--base", str(models["sdxl"])]
    args += ["--adapter", str(out / "adapter.safetensors"), "--controlnet", str(out / "ControlNetModel")]
    args += ["--face-embedding", str(root / "e0.npy"), "--keypoints", str(root / "kps.json")]
    args += ["--prompt", "a portrait", "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu"]
    assert main([*args, "--output", str(root / "gen.png")]) == 0
    assert Image.open(root / "gen.png").size == (64, 64)


# ---------------------------------------------------------------------------- resume, Plus/Portrait
def test_faceid_plusv2_killed_and_resumed_equals_uninterrupted(models, face_pack, tmp_path):
    """Kill + resume is bit-identical (FaceID-PlusV2: identity + CLIP crops, drops on), and the face cache
    of the killed run is reused, not recomputed."""

    lines = [{"image": str(face_photo(tmp_path / f"p{i}.png", i)), "text": f"p {i}"} for i in range(3)]
    data = manifest(tmp_path, lines)
    common = dict(
        face_models=str(face_pack),
        max_steps=4,
        checkpoint_every=2,
        learning_rate=1e-3,
        drop_image=0.3,
        drop_text=0.2,
        drop_both=0.2,
        seed=3,
    )
    whole = train(face_config(models, data, tmp_path / "whole", "faceid-plusv2", **common))
    with pytest.raises(Killed):
        train(face_config(models, data, tmp_path / "killed", "faceid-plusv2", **common), [kill_at(3)])
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "cache" / "faces").glob("*.npz")}
    assert len(cached) == 3
    resumed = train(face_config(models, data, tmp_path / "killed", "faceid-plusv2", resume=True, **common))
    assert resumed.step == 4 and resumed.losses == whole.losses[2:]
    a = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("image_proj.perceiver_resampler.") for k in a)
    assert {p: p.stat().st_mtime_ns for p in cached} == cached, "the face cache is reused on resume"


def test_faceid_portrait_several_references_per_sample(models, face_pack, tmp_path):
    """Portrait: 16 tokens per reference photo side by side, no LoRA; references listed per sample."""
    photos = [face_photo(tmp_path / f"p{i}.png", i) for i in range(5)]
    lines = [
        {"image": str(photos[0]), "text": "a", "reference": [str(photos[1]), str(photos[2])]},
        {"image": str(photos[3]), "text": "b", "reference": [str(photos[4])]},
    ]
    cfg = face_config(
        models,
        manifest(tmp_path, lines),
        tmp_path / "run",
        "faceid-portrait",
        face_models=str(face_pack),
        max_steps=2,
    )
    trainer = Trainer(cfg)
    result = trainer.run()
    recipe = trainer.recipe
    assert result.step == 2 and np.isfinite(result.losses).all()
    assert recipe.slots == 2 and recipe.adapter.layout.num_tokens == 32
    assert not any(p.lora_rank for p in recipe.adapter.layers.values())
    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert not any("_lora." in k for k in saved)
