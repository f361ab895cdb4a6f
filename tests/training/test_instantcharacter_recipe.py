"""InstantCharacter training on a tiny FLUX: the flow-matching loss falls, only the adapter changes, the
result loads for generation, and stage 2 starts from a stage-1 result."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from idcraft.training import TrainConfig, Trainer
from idcraft.training.data import SampleLoader, collate, list_records
from idcraft.training.recipe import recipe_for

from .helpers import FAST, make_images

STEPS = 30
WINDOW = 8


@pytest.fixture(scope="module")
def ic_models(tmp_path_factory):
    """A saved tiny FLUX pipeline, SigLIP and DINOv2 folders, and 4 captioned images."""
    from idcraft.instantcharacter.tiny import save_tiny_encoders, tiny_flux_pipeline

    root = tmp_path_factory.mktemp("ic-train")
    tiny_flux_pipeline().save_pretrained(root / "flux")
    siglip, dinov2 = save_tiny_encoders(root)
    make_images(root / "data", 4)
    return {"flux": root / "flux", "siglip": siglip, "dinov2": dinov2, "data": root / "data", "root": root}


def _config(ic_models, output, **overrides) -> TrainConfig:
    from idcraft.instantcharacter.tiny import tiny_projector_config

    projector = dataclasses.asdict(tiny_projector_config())
    projector.pop("width"), projector.pop("output_width")  # the recipe reads these from the models
    settings = dict(
        FAST,
        method="instantcharacter",
        base=str(ic_models["flux"]),
        image_encoder=str(ic_models["siglip"]),
        image_encoder_2=str(ic_models["dinov2"]),
        data=str(ic_models["data"]),
        output=str(output),
        drop_image=0.0,
        drop_text=0.0,
        drop_both=0.0,
        seed=1,
        extra={"max_sequence_length": 16, "projector": projector},
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _eval_loss(recipe, draws: int = 4) -> float:
    loader = SampleLoader(
        list_records(recipe.config.data)[0], recipe.resolution, recipe.reference_preprocessor()
    )
    batch = collate([loader[i] for i in range(len(loader))])
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return float(np.mean([recipe.loss(recipe.model, batch, generator).item() for _ in range(draws)]))


def _base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".processor." not in k}


@pytest.fixture(scope="module")
def stage1(ic_models, tmp_path_factory):
    """A stage-1 run (unpaired, the image is its own reference) on the fixed 4-image set."""
    output = tmp_path_factory.mktemp("ic-run") / "s1"
    cfg = _config(ic_models, output, stage=1, max_steps=STEPS, learning_rate=3e-3)
    trainer = Trainer(cfg)
    result = trainer.run()
    return cfg, trainer, result


def test_loss_goes_down_and_only_the_adapter_changes(stage1):
    cfg, trainer, result = stage1
    recipe = trainer.recipe
    losses = np.array(result.losses)
    assert len(losses) == STEPS and np.isfinite(losses).all()

    set_seed(cfg.seed)
    fresh = recipe_for(cfg.method)(cfg)
    fresh.build(torch.device("cpu"), torch.float32)

    frozen, pristine = recipe.frozen_modules(), fresh.frozen_modules()
    assert set(frozen) == {"transformer", "vae", "text_encoder", "text_encoder_2", "siglip", "dinov2"}
    for name, module in frozen.items():
        now, then = _base_state(module), _base_state(pristine[name])
        assert now.keys() == then.keys()
        changed = [k for k in now if not torch.equal(now[k], then[k])]
        assert not changed, f"frozen {name} changed: {changed[:3]}"
        assert not any(p.requires_grad for n, p in module.named_parameters() if ".processor." not in n)

    trained = {k: v.clone() for k, v in recipe.trainable_state_dict().items()}
    initial = {k: v.clone() for k, v in fresh.trainable_state_dict().items()}
    assert trained.keys() == initial.keys()
    assert any(k.startswith("projector.") for k in trained)
    for part in ("to_k_ip", "to_v_ip", "norm_ip_q", "norm_ip_k", "projector.resampler", "cross_layer_blocks"):
        keys = [k for k in trained if part in k]
        assert keys and any(not torch.equal(trained[k], initial[k]) for k in keys), f"{part} never moved"
    assert {id(p) for p in recipe.trainable_parameters()} == {id(p) for p in recipe.adapter.parameters()}

    # The same batch, noise and noise levels through the initial and the trained adapter.
    after = _eval_loss(recipe)
    recipe.load_trainable_state_dict(initial)
    before = _eval_loss(recipe)
    recipe.load_trainable_state_dict(trained)
    assert after < 0.95 * before, f"fixed-batch loss {before:.4f} -> {after:.4f}"
    first, last = losses[:WINDOW].mean(), losses[-WINDOW:].mean()
    assert last < first, f"training loss {first:.4f} -> {last:.4f}"


def test_saved_adapter_generates(stage1, ic_models):
    from idcraft.instantcharacter.pipeline import InstantCharacterPipeline

    cfg, trainer, _ = stage1
    path = cfg.output_dir / "adapter.safetensors"
    saved = load_file(str(path))
    assert any(k.startswith("image_proj.") for k in saved)
    assert any(k.startswith("ip_adapter.0.to_k_ip") for k in saved)
    pipe = InstantCharacterPipeline.from_pretrained(
        ic_models["flux"], path, ic_models["siglip"], ic_models["dinov2"], check_memory=False
    )
    reference = sorted(ic_models["data"].glob("*.png"))[0]
    images = pipe("a photo of a cat", reference, seed=0, steps=2, width=32, height=32, progress=False)
    assert images[0].size == (32, 32)


def test_stage2_starts_from_stage1(stage1, ic_models, tmp_path):
    cfg1, trainer1, _ = stage1
    images = sorted(ic_models["data"].glob("*.png"))
    manifest = tmp_path / "pairs.jsonl"
    lines = [
        {"image": str(img), "text": "a photo", "reference": str(images[(i + 1) % len(images)])}
        for i, img in enumerate(images)
    ]
    lines.append({"image": str(images[0]), "text": "no pair"})  # stage 2 skips unpaired samples
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    init = cfg1.output_dir / "adapter.safetensors"

    cfg = _config(ic_models, tmp_path / "s2", stage=2, data=str(manifest), init_from=str(init), max_steps=1)
    recipe = recipe_for(cfg.method)(cfg)
    recipe.build(torch.device("cpu"), torch.float32)
    assert recipe.resolution == 32 and recipe.pairing == "paired"
    start = recipe.trainable_state_dict()
    stage1_weights = trainer1.recipe.trainable_state_dict()
    assert start.keys() == stage1_weights.keys()
    assert all(torch.equal(start[k], stage1_weights[k]) for k in start)

    result = Trainer(cfg).run()
    assert result.step == 1 and np.isfinite(result.losses).all()
    assert any("stage 2 trains on pairs" in reason for reason in result.skipped.skipped.values())
    assert (tmp_path / "s2" / "adapter.safetensors").is_file()


def test_stage_defaults_and_cfg_drops(ic_models, tmp_path):
    """Stages set the resolution and pairing; a batch whose references are all dropped trains too (the
    subject branch is off for it, as in a reference-free generation)."""
    from idcraft.training.instantcharacter import STAGES

    assert STAGES[1] == (512, "self") and STAGES[2] == (512, "paired") and STAGES[3][0] == 1024
    cfg = _config(ic_models, tmp_path / "drop", max_steps=1, drop_image=1.0)
    trainer = Trainer(cfg)
    result = trainer.run()
    assert np.isfinite(result.losses).all()


def test_killed_and_resumed_equals_uninterrupted(ic_models, tmp_path):
    """Kill + --resume ends bit-identical to a run that never stopped (CFG drops on, logit-normal noise
    levels, a cosine schedule: every random draw and the schedule cross the checkpoint)."""
    from .helpers import killed_and_resumed

    common = dict(
        max_steps=4,
        checkpoint_every=2,
        learning_rate=1e-3,
        drop_image=0.3,
        drop_text=0.2,
        drop_both=0.1,
        lr_scheduler="cosine",
        seed=5,
    )
    extra = {**_config(ic_models, tmp_path / "x").extra, "timestep_density": "logit_normal"}
    whole, resumed = killed_and_resumed(
        lambda out, **more: _config(ic_models, out, extra=extra, **common, **more), tmp_path, 3
    )
    assert resumed.resumed_from.name == "step-00000002" and resumed.step == 4
    assert resumed.losses == whole.losses[2:]
    a = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trained_adapter_runs_in_idcraft_generate(stage1, ic_models, tmp_path, capsys):
    """The stage-1 result through the command line, as a user would run it; and the same weights exported
    in float16 (``--export-dtype fp16``, as official releases ship)."""
    from idcraft.cli import main

    cfg, trainer, _ = stage1
    recipe = trainer.recipe
    recipe.config.export_dtype = "fp16"
    try:
        (half,) = recipe.export(tmp_path / "half", ("safetensors",), {"step": "30"})
    finally:
        recipe.config.export_dtype = "fp32"
    assert {t.dtype for t in load_file(str(half)).values()} == {torch.float16}
    reference = sorted(ic_models["data"].glob("*.png"))[0]
    for adapter in (cfg.output_dir / "adapter.safetensors", half):
        args = ["generate", "--method", "instantcharacter", "--base", str(ic_models["flux"])]
        args += ["--adapter", str(adapter), "--image-encoder", str(ic_models["siglip"])]
        args += ["--image-encoder-2", str(ic_models["dinov2"]), "--reference", str(reference)]
        args += ["--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32", "--device", "cpu"]
        out = tmp_path / f"{adapter.parent.name}.png"
        assert main([*args, "--output", str(out), "--skip-memory-check"]) == 0, capsys.readouterr().err
        assert out.is_file()
