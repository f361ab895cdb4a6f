"""PuLID-FLUX training on a tiny FLUX: only the IDFormer and the ID cross-attention change, the alignment
loss is zero without identity and positive with it, and the release written loads back into generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.training import TrainConfig, Trainer

from ..faces.tiny_onnx import tiny_face_photo
from ..pulid.training_data import TRAIN_SETTINGS, write_face_data
from .conftest import CASE, EVA

STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_face_data(tmp_path_factory.mktemp("pulid-train"), "portrait of the cat")


def _config(data, output, **overrides) -> TrainConfig:
    settings = dict(
        method="pulid-flux",
        base=str(CASE / "base"),
        image_encoder=str(EVA),
        data=str(data / "data.jsonl"),
        output=str(output),
        **TRAIN_SETTINGS,
        max_steps=STEPS,
        extra={
            "max_sequence_length": 16,
            "face_parsing": "none",
            "ca_heads": 1,
            "idformer": {
                "dim": 32,
                "depth": 5,
                "heads": 1,
                "num_id_token": 2,
                "num_queries": 8,
                "output_dim": 32,
                "mapping_dim": 20,
            },
        },
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_train_save_load_generate(data, tiny_face_pack, tmp_path):
    config = _config(
        data,
        tmp_path / "run",
        image_encoder_2=str(data / "bisenet.pth"),
        sample_every=STEPS,  # a preview through the engine at the last step
        sample_reference=str(tiny_face_photo(tmp_path / "me.png")),
        sample_steps=2,
        face_models=str(tiny_face_pack),
    )
    config.extra.pop("face_parsing")  # the official preprocessing: BiSeNet labels
    result = Trainer(config).run()
    release = tmp_path / "run" / "adapter.safetensors"
    assert release in result.files and result.step == STEPS
    assert list((tmp_path / "run" / "samples").glob(f"step-{STEPS:08d}-*.png"))
    assert len(result.losses) == STEPS and np.isfinite(result.losses).all()
    from safetensors.torch import load_file

    tensors = load_file(str(release))
    assert {k.split(".")[0] for k in tensors} == {"pulid_encoder", "pulid_ca"}
    assert sorted({int(k.split(".")[1]) for k in tensors if k.startswith("pulid_ca.")}) == [0, 1, 2, 3]

    from diffusers import FluxPipeline

    from idcraft.pulid.encoder import FaceStages
    from idcraft.pulid.eva_clip import load_eva_tower
    from idcraft.pulid.flux_pipeline import PulidFluxAdapter, PulidFluxPipeline

    adapter = PulidFluxAdapter.from_file(release)
    pipe = PulidFluxPipeline(FluxPipeline.from_pretrained(str(CASE / "base")), adapter, device="cpu")
    try:
        pipe.encoder.eva = load_eva_tower(EVA)
        face = FaceStages(
            embedding=np.load(data / "emb0.npy"),
            aligned_face=np.asarray(Image.open(data / "face0.png")),
            parsing=np.ones((512, 512), np.uint8),
        )
        tokens = pipe.encode([face])
        image = pipe("portrait of the cat", tokens, steps=2, width=32, height=32, seed=0)[0]
        base = pipe("portrait of the cat", tokens, scale=0, steps=2, width=32, height=32, seed=0)[0]
    finally:
        adapter.pulid_ca.detach()
    assert image.size == (32, 32)
    assert not np.array_equal(np.asarray(image), np.asarray(base))


def test_only_the_adapter_trains_and_alignment_loss_behaves(data, tmp_path):
    from accelerate.utils import set_seed

    from idcraft.training.data import SampleLoader, collate, list_records
    from idcraft.training.recipe import recipe_for

    config = _config(data, tmp_path / "unused")
    recipe = recipe_for("pulid-flux")(config)
    set_seed(0)
    recipe.build(torch.device("cpu"), torch.float32)
    names = {n for n, _ in recipe.adapter.named_parameters()}
    assert {n.split(".")[0] for n in names} == {"pulid_ca", "pulid_encoder"}
    frozen = {k: v.clone() for k, v in recipe.pipe.transformer.state_dict().items()}
    loader = SampleLoader(list_records(config.data)[0], recipe.resolution, recipe.reference_preprocessor())
    batch = collate([loader[i] for i in range(2)])
    features = recipe.encode_references(batch)
    id_cond, hidden = recipe.unpack_features(features)
    assert id_cond.shape == (2, 512 + 24) and len(hidden) == 5
    assert torch.allclose(id_cond[:, :512], batch["embedding"])
    # the alignment terms: zero when no sample keeps its identity, positive when they do
    args = _model_inputs(recipe, batch)
    _, sem, layout = recipe.model(*args, id_cond, hidden, torch.tensor([True, True]), True)
    assert sem > 0 and layout > 0
    _, sem0, layout0 = recipe.model(*args, id_cond, hidden, torch.tensor([False, False]), True)
    assert sem0 == 0 and layout0 == 0
    loss = recipe.loss(recipe.model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in recipe.adapter.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in recipe.pipe.transformer.parameters())
    for key, value in recipe.pipe.transformer.state_dict().items():
        assert torch.equal(value, frozen[key])

    # Gradient checkpointing: the blocks recomputed in backward() must see the ID tokens, which travel in a
    # context variable (idcraft.training.checkpointing); without that torch stops or the gradients differ.
    from idcraft.training.checkpointing import enable_gradient_checkpointing

    plain = [p.grad.clone() for p in recipe.adapter.parameters()]
    recipe.adapter.zero_grad(set_to_none=True)
    enable_gradient_checkpointing(recipe.pipe.transformer)
    recipe.loss(recipe.model, batch, torch.Generator().manual_seed(0)).backward()
    assert all(
        torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, recipe.adapter.parameters(), strict=True)
    )
    recipe.adapter.pulid_ca.detach()


def _model_inputs(recipe, batch):
    from diffusers import FluxPipeline

    latents = recipe.encode_latents(batch["pixels"], torch.Generator().manual_seed(0))
    count, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, count, channels, height, width)
    ids = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, "cpu", torch.float32)
    text, pooled, text_ids = recipe.encode_text(list(batch["caption"]))
    sigmas = torch.full((count,), 0.6)
    guidance = torch.full((count,), 3.5)
    return packed, sigmas, text, pooled, text_ids, ids, guidance


def test_bf16_mixed_precision_trains_float32_weights(data, tmp_path):
    from safetensors.torch import load_file

    result = Trainer(_config(data, tmp_path / "bf16", max_steps=1, mixed_precision="bf16", cpu=True)).run()
    assert np.isfinite(result.losses).all()
    written = load_file(str(tmp_path / "bf16" / "adapter.safetensors"))
    assert written and all(v.dtype == torch.float32 for v in written.values())
