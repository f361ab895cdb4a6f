"""PuLID (SDXL) training on the fidelity fixture's tiny SDXL: only the IDFormer and the ID attention change,
the alignment loss is zero without identity and positive with it, the release written has
pulid_v1.1.safetensors' layout and `idcraft generate --method pulid` loads it, gradient checkpointing
trains the same weights, and the wrong inputs are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from idcraft.cli import main
from idcraft.errors import IdcraftError
from idcraft.training import TrainConfig, Trainer

from ..faces.tiny_onnx import tiny_face_photo
from ..training.helpers import killed_and_resumed
from .training_data import TRAIN_SETTINGS, write_face_data

CASE = Path(__file__).resolve().parents[1] / "fixtures" / "pulid-sdxl"
FLUX_RELEASE = Path(__file__).resolve().parents[1] / "fixtures" / "pulid-flux" / "pulid_flux_tiny.safetensors"
#: The fixture release's IDFormer (reads the tiny EVA tower: class token 24, width 16).
IDFORMER = {"dim": 32, "depth": 5, "heads": 1, "num_id_token": 2, "num_queries": 4, "output_dim": 64,
            "mapping_dim": 40}  # fmt: skip
STEPS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_face_data(tmp_path_factory.mktemp("pulid-sdxl-train"))


def _config(data, output, **overrides) -> TrainConfig:
    settings = dict(
        method="pulid",
        base=str(CASE / "base"),
        image_encoder=str(CASE / "eva_tiny.pt"),
        data=str(data / "data.jsonl"),
        output=str(output),
        **TRAIN_SETTINGS,
        max_steps=STEPS,
        extra={"face_parsing": "none", "idformer": dict(IDFORMER)},
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_train_save_load_generate(data, tiny_face_pack, tmp_path):
    """The official preprocessing (BiSeNet labels) and a preview through the engine at the last step, then
    `idcraft generate` on the written release."""
    config = _config(
        data,
        tmp_path / "run",
        image_encoder_2=str(data / "bisenet.pth"),
        drop_image=0.3,
        sample_every=STEPS,
        sample_reference=str(tiny_face_photo(tmp_path / "me.png")),
        sample_steps=2,
        face_models=str(tiny_face_pack),
    )
    config.extra.pop("face_parsing")
    result = Trainer(config).run()
    release = tmp_path / "run" / "adapter.safetensors"
    assert release in result.files and result.step == STEPS
    assert list((tmp_path / "run" / "samples").glob(f"step-{STEPS:08d}-*.png"))
    assert np.isfinite(result.losses).all()
    ours, official = load_file(str(release)), load_file(str(CASE / "pulid_tiny.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in official.items()}

    flags = ["--prompt", "a portrait photo", "--seed", "3", "--steps", "2", "--width", "32", "--height", "32",
             "--face-embedding", str(CASE / "embedding_0.npy"), "--aligned-face", str(CASE / "aligned_0.png"),
             "--face-parsing", str(CASE / "parsing_0.png"), "--base", str(CASE / "base"), "--adapter", str(release),
             "--eva-clip", str(CASE / "eva_tiny.pt"), "--device", "cpu"]  # fmt: skip
    assert main(["generate", *flags, "--output", str(tmp_path / "id.png")]) == 0
    assert main(["generate", *flags, "--scale", "0", "--output", str(tmp_path / "base.png")]) == 0
    with_id, without = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("id.png", "base.png"))
    assert with_id.shape == (32, 32, 3)
    assert np.abs(with_id - without).mean() > 0.5  # the trained identity branch acts


def test_only_the_adapter_trains_and_alignment_loss_behaves(data, tmp_path):
    from accelerate.utils import set_seed

    from idcraft.training.data import SampleLoader, collate, list_records
    from idcraft.training.recipe import recipe_for

    config = _config(data, tmp_path / "unused")
    recipe = recipe_for("pulid")(config)
    set_seed(0)
    recipe.build(torch.device("cpu"), torch.float32)
    names = {n.split(".")[0] for n, _ in recipe.adapter.named_parameters()}
    assert names == {"id_adapter", "id_adapter_attn_layers"}
    frozen = {k: v.clone() for k, v in recipe.unet.state_dict().items() if "id_to_" not in k}
    loader = SampleLoader(list_records(config.data)[0], recipe.resolution, recipe.reference_preprocessor())
    batch = collate([loader[i] for i in range(2)])
    id_cond, hidden = recipe.unpack_features(recipe.encode_references(batch))
    assert id_cond.shape == (2, 512 + 24) and len(hidden) == 5
    assert torch.allclose(id_cond[:, :512], batch["embedding"])

    inputs = recipe.diffusion_inputs(batch, torch.Generator().manual_seed(0))
    args = (inputs.noisy, inputs.timesteps, inputs.text, inputs.added, id_cond, hidden)
    prediction, sem, layout, _ = recipe.model(*args, torch.tensor([True, True]), True)
    assert sem > 0 and layout > 0
    dropped, sem0, layout0, _ = recipe.model(*args, torch.tensor([False, False]), True)
    assert sem0 == 0 and layout0 == 0
    # a dropped sample runs with the unconditional tokens (the negative branch's), not with its identity
    assert not torch.allclose(prediction, dropped)
    half, _, _, _ = recipe.model(*args, torch.tensor([True, False]), False)
    assert torch.allclose(half[0], prediction[0], atol=1e-5) and torch.allclose(
        half[1], dropped[1], atol=1e-5
    )

    loss = recipe.loss(recipe.model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in recipe.adapter.parameters()]
    assert all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in recipe.unet.named_parameters() if "id_to_" not in n)
    for key, value in recipe.unet.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key])

    # Gradient checkpointing: the blocks recomputed in backward() must see the ID tokens, which travel in a
    # context variable (idcraft.training.checkpointing); without that torch stops or the gradients differ.
    from idcraft.training.checkpointing import enable_gradient_checkpointing

    plain = [p.grad.clone() for p in recipe.adapter.parameters()]
    recipe.adapter.zero_grad(set_to_none=True)
    enable_gradient_checkpointing(recipe.unet)
    recipe.loss(recipe.model, batch, torch.Generator().manual_seed(0)).backward()
    assert all(
        torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, recipe.adapter.parameters(), strict=True)
    )


def test_bf16_mixed_precision_trains_float32_weights(data, tmp_path):
    result = Trainer(_config(data, tmp_path / "bf16", max_steps=1, mixed_precision="bf16", cpu=True)).run()
    assert np.isfinite(result.losses).all()
    written = load_file(str(tmp_path / "bf16" / "adapter.safetensors"))
    assert written and all(v.dtype == torch.float32 for v in written.values())


def test_killed_and_resumed_equals_uninterrupted(data, tmp_path):
    """Kill + resume ends bit-identical to a run that never stopped (identity and text drops on: every
    random draw, and the unconditional ID tokens of dropped samples, cross the checkpoint)."""
    common = dict(max_steps=3, checkpoint_every=1, drop_image=0.4, drop_text=0.2, seed=5)
    whole, resumed = killed_and_resumed(lambda out, **more: _config(data, out, **common, **more), tmp_path, 2)
    assert resumed.resumed_from.name == "step-00000002" and resumed.step == 3
    assert resumed.losses == whole.losses[2:]
    a, b = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_a_release_and_clear_refusals(data, tmp_path):
    from idcraft.training.recipe import recipe_for

    recipe = recipe_for("pulid")(
        _config(data, tmp_path / "init", init_from=str(CASE / "pulid_tiny.safetensors"))
    )
    recipe.build(torch.device("cpu"), torch.float32)
    official = load_file(str(CASE / "pulid_tiny.safetensors"))
    assert all(torch.equal(recipe.trainable_state_dict()[k], official[k].float()) for k in official)

    refusals = {
        "not a PuLID SDXL release": dict(init_from=str(FLUX_RELEASE)),
        "unknown extra setting": dict(extra={"face_parsing": "none", "ortho_mode": "v2"}),
        "--ortho must be one of": dict(extra={"face_parsing": "none", "ortho": "v3"}),
        "--image-encoder EVA02": dict(image_encoder=None),
        "--image-encoder-2 parsing_bisenet.pth": dict(extra={}),
        "use --method pulid-flux": dict(base=str(CASE.parent / "pulid-flux" / "base")),
    }
    for message, change in refusals.items():
        with pytest.raises(IdcraftError, match=message):
            recipe_for("pulid")(_config(data, tmp_path / "bad", **change)).build(
                torch.device("cpu"), torch.float32
            )


# ---------------------------------------------------------------------------- accurate-ID loss (--id-loss)
#: A narrow IR-SE network of facexlib's layout (load_recogniser reads its stages from the file).
TINY_ARCFACE = ((64, 16, 1), (16, 24, 1), (24, 32, 1), (32, 48, 1))
#: Five keypoints of a tilted face in a 150 x 190 photo.
TILTED_KPS = np.array([[70, 60], [120, 70], [92, 95], [72, 118], [112, 126]], np.float32)


@pytest.fixture(scope="module")
def arcface(tmp_path_factory) -> Path:
    """A tiny IR-SE recogniser saved as facexlib's file, its batch-norm statistics randomised so that the
    embedding depends on the crop's brightness and layout."""
    from idcraft.infiniteyou.recognition import WEIGHTS_FILE, ArcFaceIRSE

    torch.manual_seed(0)
    model = ArcFaceIRSE(TINY_ARCFACE).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("arcface") / WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


def test_differentiable_alignment_matches_norm_crop_and_embed_face(arcface):
    """The grid_sample warp is cv2's norm_crop (up to uint8 rounding), and the embedding it gives is
    embed_face's; half a pixel of misalignment would show (it moves the embedding ~200x more)."""
    from idcraft.faces import estimate_norm, norm_crop
    from idcraft.infiniteyou.recognition import embed_face, load_recogniser
    from idcraft.training.pulid_idloss import arcface_embeddings, warp_faces

    recogniser = load_recogniser(arcface)
    photo = np.random.default_rng(0).integers(0, 256, (150, 190, 3)).astype(np.uint8)
    rgb = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    matrix = estimate_norm(TILTED_KPS, 112)[None]
    crop = warp_faces(rgb.flip(1), matrix)[0].permute(1, 2, 0).numpy() * 255
    official = norm_crop(np.ascontiguousarray(photo[:, :, ::-1]), TILTED_KPS, 112).astype(np.float64)
    assert np.abs(crop - official).max() <= 0.6
    ours = arcface_embeddings(recogniser, rgb, matrix)[0].detach().numpy()
    assert np.abs(ours - embed_face(recogniser, photo, TILTED_KPS)).max() < 1e-3
    shifted = matrix.copy()
    shifted[:, :, 2] += 0.5
    moved = arcface_embeddings(recogniser, rgb, shifted)[0].detach().numpy()
    assert np.abs(moved - ours).max() > 5e-3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fast_path_is_lightnings_euler_sampler(prediction_type):
    """Lightning's trailing timesteps, and the update: the path gives what diffusers' EulerDiscreteScheduler
    with trailing spacing (SDXL-Lightning's scheduler) gives for the same model and noise."""
    from diffusers import EulerDiscreteScheduler

    from idcraft.training.pulid_idloss import FastPath, sample_latents, trailing_timesteps

    assert trailing_timesteps(4) == (999, 749, 499, 249) and trailing_timesteps(1) == (999,)
    config = json.loads((CASE / "base" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = EulerDiscreteScheduler.from_config(
        {**config, "timestep_spacing": "trailing", "prediction_type": prediction_type}
    )
    weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) / 4

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # depends on x and t, like a UNet
        return torch.einsum("oc,bchw->bohw", weights, x) + torch.cos(x) * t.float().view(-1, 1, 1, 1) / 1000

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    scheduler.set_timesteps(4)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(latents, t), t.expand(2))
        latents = scheduler.step(out, t, latents).prev_sample
    alphas = tuple(float(a) for a in scheduler.alphas_cumprod)
    path = FastPath(
        torch.arange(2), noise, torch.zeros(2, 1, 1), None, trailing_timesteps(4), alphas, prediction_type
    )
    assert [int(t) for t in scheduler.timesteps] == list(path.timesteps)
    assert torch.allclose(sample_latents(model, path), latents, atol=1e-4)


def _id_config(data, output, tiny_face_pack, **overrides) -> TrainConfig:
    return _config(data, output, id_loss=0.5, face_models=str(tiny_face_pack), **overrides)


def test_id_loss_gradient_reaches_the_idformer_and_id_attention(
    data, tiny_face_pack, arcface, tmp_path, monkeypatch
):
    """The fast path from pure noise, the decoder and the warp are differentiable: with the generated face's
    keypoints given, 1 - cos alone gives every trained tensor a gradient; the frozen parts get none. The
    run's detector finds the face of a white square and none in dark noise."""
    from idcraft.training.data import SampleLoader, collate, list_records
    from idcraft.training.recipe import recipe_for

    monkeypatch.setenv("IDCRAFT_ARCFACE", str(arcface))
    config = _id_config(
        data, tmp_path / "unused", tiny_face_pack, extra={**_config(data, tmp_path).extra, "id_loss_steps": 2}
    )
    recipe = recipe_for("pulid")(config)
    recipe.build(torch.device("cpu"), torch.float32)
    assert "arcface" in recipe.frozen_modules()
    loader = SampleLoader(list_records(config.data)[0], recipe.resolution, recipe.reference_preprocessor())
    batch = collate([loader[i] for i in range(2)])
    generator = torch.Generator().manual_seed(0)
    inputs = recipe.diffusion_inputs(batch, generator)
    keep = torch.tensor([True, False])
    noise = torch.randn(inputs.latents.shape, generator=generator)
    fast = recipe.identity.path(noise, keep, inputs.text, inputs.added, recipe.noise_scheduler)
    assert fast.timesteps == (999, 499) and fast.index.tolist() == [0]
    id_cond, hidden = recipe.unpack_features(recipe.encode_references(batch))
    latents = recipe.model(
        inputs.noisy, inputs.timesteps, inputs.text, inputs.added, id_cond, hidden, keep, False, fast
    )[3]
    images = recipe.decode(latents)
    assert images.shape == (1, 3, 32, 32)
    reference = recipe.identity.reference_embeddings(batch["face"][:1])
    kps = TILTED_KPS / 6  # a face in the 32 px image
    distance, found = recipe.identity.distance(images, reference, [kps])
    assert found == 1 and 0 < distance.item() < 2
    distance.backward()
    for name, parameter in recipe.adapter.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in recipe.identity.recogniser.parameters())
    assert all(p.grad is None for n, p in recipe.unet.named_parameters() if "id_to_" not in n)
    none, found = recipe.identity.distance(images, reference, [None])
    assert found == 0 and float(none) == 0

    photo = np.asarray(Image.open(tiny_face_photo(tmp_path / "face.png")), dtype=np.float32)
    square = torch.from_numpy(photo).permute(2, 0, 1)[None] / 127.5 - 1
    dark = torch.full_like(square, -0.9)
    face, nothing = recipe.identity.keypoints(torch.cat([square, dark]))
    assert face.shape == (5, 2) and nothing is None
    assert (face[:, 0] > 16).all() and (face[:, 0] < 40).all()  # inside the square


def test_training_with_id_loss_and_its_refusals(data, tiny_face_pack, arcface, tmp_path, monkeypatch, caplog):
    """A run with --id-loss (and gradient checkpointing, which then covers the VAE decoder too) goes through
    the fast path, decoder and detector at every step (the tiny VAE's images show no face the tiny detector
    knows, so the term is 0 there: the gradient test covers it); the wrong set-ups are refused."""
    import logging

    monkeypatch.setenv("IDCRAFT_ARCFACE", str(arcface))
    caplog.set_level(logging.DEBUG, logger="idcraft.training.pulid")
    trainer = Trainer(
        _id_config(data, tmp_path / "run", tiny_face_pack, max_steps=1, gradient_checkpointing=True)
    )
    result = trainer.run()
    assert result.step == 1 and np.isfinite(result.losses).all()
    assert trainer.recipe.pipe.vae.is_gradient_checkpointing  # the decoder runs with gradient
    assert "id loss: a face in 0 of 2 generated image(s)" in caplog.text

    with pytest.raises(IdcraftError, match="applies to pulid \\(SDXL\\) only, not to pulid-flux"):
        _config(data, tmp_path / "bad", method="pulid-flux", id_loss=0.5)
    with pytest.raises(IdcraftError, match="id_loss must be 0 or more"):
        _config(data, tmp_path / "bad", id_loss=-1.0)
    from idcraft.training.recipe import recipe_for

    refusals = {
        "train without --cache-features": dict(cache_features=True),
        "id_loss_steps must be at least 1": dict(extra={"face_parsing": "none", "id_loss_steps": 0}),
    }
    for message, change in refusals.items():
        with pytest.raises(IdcraftError, match=message):
            recipe_for("pulid")(_id_config(data, tmp_path / "bad", tiny_face_pack, **change)).build(
                torch.device("cpu"), torch.float32
            )
    monkeypatch.delenv("IDCRAFT_ARCFACE")
    with pytest.raises(
        IdcraftError, match="--id-loss embeds faces with facexlib's ArcFace: put recognition_arcface"
    ):
        recipe_for("pulid")(_id_config(data, tmp_path / "bad", tmp_path)).build(
            torch.device("cpu"), torch.float32
        )
