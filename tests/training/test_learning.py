"""Training learns, and trains only what it should: the adapter moves, every frozen weight stays put."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from idcraft.training import Trainer
from idcraft.training.data import list_records
from idcraft.training.recipe import recipe_for

from .helpers import config

STEPS = 40
WINDOW = 8


def _eval_loss(recipe, draws: int = 6) -> float:
    """Mean loss over every sample, with a fixed generator: identical draws for any adapter weights."""
    from idcraft.training.data import SampleLoader, collate

    loader = SampleLoader(
        list_records(recipe.config.data)[0], recipe.resolution, recipe.reference_preprocessor()
    )
    batch = collate([loader[i] for i in range(len(loader))])
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return float(np.mean([recipe.loss(recipe.model, batch, generator).item() for _ in range(draws)]))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base weights only: attached adapter processors are UNet submodules too, and are meant to change."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".processor." not in k}


@pytest.mark.parametrize(
    "method, base",
    [
        ("ip-adapter", "sd15"),
        ("ip-adapter-plus", "sd15"),
        ("ip-adapter-full-face", "sd15"),
        ("ip-adapter", "sdxl"),
    ],
)
def test_loss_goes_down_and_only_the_adapter_changes(models, data, tmp_path, method, base):
    # Fixed small data (4 images, batch 2), no CFG drops, a high learning rate: the loss has to fall.
    cfg = config(
        models,
        data,
        tmp_path / "run",
        method=method,
        base=base,
        max_steps=STEPS,
        learning_rate=1e-2,
        drop_image=0.0,
        drop_text=0.0,
        drop_both=0.0,
        seed=1,
    )
    trainer = Trainer(cfg)
    result = trainer.run()
    recipe = trainer.recipe

    losses = np.array(result.losses)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    first, last = losses[:WINDOW].mean(), losses[-WINDOW:].mean()
    assert last < 0.97 * first, f"{method}/{base}: training loss {first:.4f} -> {last:.4f}"

    # A second, untrained build from the same seed and the same files: what the run started from.
    set_seed(cfg.seed)
    fresh = recipe_for(cfg.method)(cfg)
    fresh.build(torch.device("cpu"), torch.float32)

    # Frozen weights: bit-identical to freshly loaded ones (and still frozen).
    frozen, pristine = recipe.frozen_modules(), fresh.frozen_modules()
    assert set(frozen) >= {"unet", "vae", "text_encoder", "image_encoder"}
    for name, module in frozen.items():
        now, then = _state(module), _state(pristine[name])
        assert now.keys() == then.keys()
        changed = [k for k in now if not torch.equal(now[k], then[k])]
        assert not changed, f"frozen {name} changed: {changed[:3]}"
        assert not any(p.requires_grad for n, p in module.named_parameters() if ".processor." not in n)

    # Every adapter tensor moved.
    trained = {k: v.clone() for k, v in recipe.trainable_state_dict().items()}
    initial = {k: v.clone() for k, v in fresh.trainable_state_dict().items()}
    assert trained.keys() == initial.keys()
    moved = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert len(moved) == len(trained), f"adapter tensors that never moved: {set(trained) - set(moved)}"

    # Paired check without timestep noise: the same batch, noise and timesteps through the initial and
    # the trained adapter.
    after = _eval_loss(recipe)
    recipe.load_trainable_state_dict(initial)
    before = _eval_loss(recipe)
    assert after < 0.95 * before, f"{method}/{base}: fixed-batch loss {before:.4f} -> {after:.4f}"

    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert any(k.startswith("image_proj.") for k in saved) and any(".to_k_ip.weight" in k for k in saved)


def test_fresh_adapter_starts_from_the_text_projections(models, data, tmp_path):
    """to_k_ip / to_v_ip begin as copies of each layer's to_k / to_v (the official initialisation)."""
    from idcraft.injection import attention_module, cross_attention_layers

    cfg = config(models, data, tmp_path / "run", max_steps=1)
    recipe = recipe_for(cfg.method)(cfg)
    recipe.build(torch.device("cpu"), torch.float32)
    unet = recipe.unet
    for index, name in cross_attention_layers(unet).items():
        attn = attention_module(unet, name)
        layer = recipe.adapter.layers[str(index)]
        assert torch.equal(layer.to_k_ip.weight, attn.to_k.weight)
        assert torch.equal(layer.to_v_ip.weight, attn.to_v.weight)
    trainable = {id(p) for p in recipe.trainable_parameters()}
    assert trainable == {id(p) for p in recipe.adapter.parameters()}
    assert all(p.requires_grad for p in recipe.adapter.parameters())


def test_gradient_checkpointing_and_bf16(models, data, tmp_path):
    """Checkpointing recomputes the same forward: identical weights. bf16 autocast trains float32 weights."""
    common = dict(method="ip-adapter-plus", max_steps=2, learning_rate=1e-3, cpu=True)
    plain = Trainer(config(models, data, tmp_path / "plain", **common))
    plain.run()
    checkpointed = Trainer(config(models, data, tmp_path / "gc", gradient_checkpointing=True, **common))
    checkpointed.run()
    assert checkpointed.recipe.unet.is_gradient_checkpointing
    a, b = (
        load_file(str(tmp_path / "plain" / "adapter.safetensors")),
        load_file(str(tmp_path / "gc" / "adapter.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)

    mixed = Trainer(config(models, data, tmp_path / "bf16", mixed_precision="bf16", **common))
    result = mixed.run()
    assert np.isfinite(result.losses).all()
    assert mixed.recipe.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in mixed.recipe.trainable_parameters())
    c = load_file(str(tmp_path / "bf16" / "adapter.safetensors"))
    assert all(v.dtype == torch.float32 for v in c.values())
    assert all(torch.allclose(a[k], c[k], atol=0.02) for k in a)  # the same training, in lower precision


def test_fp16_on_the_cpu_is_refused_before_loading(models, data, tmp_path):
    """accelerate autocasts float16 only on accelerators: on the CPU the run would fail inside the model at
    step one, so it is refused with what to use instead."""
    from idcraft.errors import IdcraftError

    with pytest.raises(IdcraftError, match="fp16 needs a GPU; on the CPU use --mixed-precision bf16"):
        Trainer(config(models, data, tmp_path / "fp16", mixed_precision="fp16", cpu=True, max_steps=1)).run()
